"""Optimizers the experiments compare against that neither optax nor this library provides."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import optax_lamb16


def _moments(mu, nu, grads, b1: float, b2: float):
  """The moment EMAs without bias correction, as the references write them (1 - b formed in double precision)."""
  return (
    jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, mu, grads),
    jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, nu, grads),
  )


def pytorch_lamb_direction(
  weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
) -> optax.GradientTransformation:
  """LAMB as in the pytorch-lamb package the LAMB16 reference compares with (its `Lamb`, `adam=False`).

  It differs from `optax.lamb` in two ways that matter for the story: no bias correction of m and v, and the weight
  norm in the trust ratio clamped to at most 10 (a ratio of 1 where either norm is 0).
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros())

  def update(grads, state, params):
    mu, nu = _moments(state.mu, state.nu, grads, b1, b2)

    def direction(m, v, p):
      adam_step = m / (jnp.sqrt(v) + eps) + weight_decay * p
      weight_norm = jnp.minimum(jnp.linalg.norm(p), 10.0)
      adam_norm = jnp.linalg.norm(adam_step)
      trust = jnp.where((weight_norm > 0) & (adam_norm > 0), weight_norm / adam_norm, 1.0)
      return trust * adam_step

    updates = jax.tree.map(direction, mu, nu, params)
    return updates, optax.ScaleByAdamState(count=optax.safe_increment(state.count), mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def lamb16_with_float32_moments(
  lr: optax.ScalarOrSchedule, weight_decay: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6
) -> optax.GradientTransformation:
  """An ablation: LAMB16's step (`optax_lamb16.lamb16`'s chain, docs/SPEC.md section 1) with its moments kept in
  float32 (8 bytes per parameter) instead of float8. Against it, the float8 rows show what their storage costs, and
  AdamW shows what LAMB16's trust ratio does."""

  def init_fn(params):
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return zeros(), zeros()

  def update_fn(grads, state, params=None):
    del params
    m, v = _moments(*state, grads, b1, b2)
    return jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), m, v), (m, v)

  return optax.chain(
    optax.GradientTransformation(init_fn, update_fn),
    optax.add_decayed_weights(weight_decay),
    optax_lamb16.scale_by_lamb16_trust_ratio(lr, eps=eps),
    optax.scale_by_learning_rate(lr),
  )
