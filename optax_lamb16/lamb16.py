"""LAMB16: LAMB with float8 optimizer state and a learning-rate-adaptive trust ratio (SPEC.md section 1).

The building blocks compose the way `optax.lamb` chains `scale_by_adam`, `add_decayed_weights`,
`scale_by_trust_ratio` and `scale_by_learning_rate`:

1. `scale_by_lamb16` keeps m and v in float8 with per-leaf float32 scales and emits the Adam direction
   ``m / (sqrt(v) + eps)`` (no bias correction);
2. decoupled weight decay ``+ weight_decay * params`` (optionally masked);
3. `scale_by_lamb16_trust_ratio` multiplies each leaf by ``clip(((|p| / |u|) * (reference_lr / lr)) ** trust_scale,
   0, 2)`` with the reference's clipped norms;
4. the learning-rate scaling ``-lr``.

`lamb16` computes exactly that chain in one fused step per leaf (the norms chunk by chunk, then one element-wise
pass).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from optax_lamb16 import _checks, _chunked, _common, float8


class ScaleByLamb16State(NamedTuple):
  """State of `scale_by_lamb16`: 2 bytes per parameter plus 8 bytes per leaf.

  Attributes:
    count: int32 scalar, number of updates so far (the maths does not use it: LAMB16 has no bias correction).
    mu: first moments, normalised, float8_e4m3fn, one leaf per parameter leaf.
    nu: second moments, normalised, float8_e5m2.
    mu_scale: float32 scalar per leaf; ``m = float32(mu) * mu_scale``.
    nu_scale: float32 scalar per leaf; ``v = float32(nu) * nu_scale``.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  mu_scale: optax.Updates
  nu_scale: optax.Updates


# eps floors the moment scales and the trust norms: with 0, a leaf whose gradients are all zero divides 0 by 0.
_EPS_FIX = ("It floors the moment scales and the trust-ratio norms, so that all-zero leaves stay finite. "
            "Typical value: 1e-6.")
# With reference_lr = 0 the trust is 0 ** trust_scale (no training), and 0 / 0 = NaN when the learning rate is 0 too.
_REFERENCE_LR_FIX = "It is the learning rate at which the plain norm ratio applies; the reference uses 1e-3."
_LOW_PRECISION_HINT = ("Under `optax.inject_hyperparams` with bfloat16 params pass `hyperparam_dtype=jnp.float32`: "
                      "0.999 rounds to 1.0 in bfloat16.")


def _check_betas_and_eps(b1: Any, b2: Any, eps: Any) -> None:
  _checks.check_range("b1", b1, 0.0, 1.0, high_open=True, fix=f"Typical value: 0.9. {_LOW_PRECISION_HINT}")
  _checks.check_range("b2", b2, 0.0, 1.0, high_open=True, fix=f"Typical value: 0.999. {_LOW_PRECISION_HINT}")
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=_EPS_FIX)


def scale_by_lamb16(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6) -> optax.GradientTransformation:
  """Rescales updates by Adam moments that are stored in float8 between steps.

  Per leaf: dequantize ``m = f32(mu) * mu_scale``, ``v = f32(nu) * nu_scale``; update the moments with the float32
  gradient (no bias correction); store them again with new scales ``sqrt(sum(min(x*x, 10))) / N + eps``; emit
  ``m / (sqrt(v) + eps)`` computed from the float32 moments of this step. Updates keep the gradients' dtype.

  Like the reference, v is not clipped after normalising, so an element whose v is very large next to its leaf's
  scale is stored as +inf and then has a zero direction until the scale grows: the faithful float8 overflow,
  documented in `optax_lamb16.float8`.

  Args:
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the scales and to ``sqrt(v)``; positive.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByLamb16State`.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.scale_by_lamb16()
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> state.mu["w"].dtype, state.nu["w"].dtype
    (dtype(float8_e4m3fn), dtype(float8_e5m2))
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state)
    >>> [round(u, 3) for u in updates["w"].tolist()]  # m / sqrt(v) = 0.1 g / sqrt(0.001 g^2)
    [3.162, -3.162, 3.162]

  References:
    The LAMB16 proof of concept, vxst/LAMB16 (`pytorch_lamb/lamb16.py`), 2024.
  """
  _check_betas_and_eps(b1, b2, eps)

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    return ScaleByLamb16State(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros(p.shape, float8.MOMENTUM_DTYPE), params),
        nu=jax.tree.map(lambda p: jnp.zeros(p.shape, float8.VARIANCE_DTYPE), params),
        mu_scale=jax.tree.map(lambda _: jnp.ones([], jnp.float32), params),
        nu_scale=jax.tree.map(lambda _: jnp.ones([], jnp.float32), params),
    )

  def update_fn(updates, state, params=None):
    del params
    _checks.check_float_leaves("updates", updates)
    _checks.check_same_structure("updates", updates, "optimizer state (from init)", state.mu)
    beta1, beta2, epsilon = (jnp.asarray(x, jnp.float32) for x in (b1, b2, eps))

    def leaf_update(g, mu, nu, mu_scale, nu_scale):
      grad = g.astype(jnp.float32)
      m = beta1 * float8.decode(mu, mu_scale) + (1 - beta1) * grad
      v = beta2 * float8.decode(nu, nu_scale) + (1 - beta2) * grad * grad
      new_mu_scale = float8.moment_scale(m, epsilon)
      new_nu_scale = float8.moment_scale(v, epsilon)
      direction = m / (jnp.sqrt(v) + epsilon)
      return (direction.astype(g.dtype), float8.encode_momentum(m, new_mu_scale),
              float8.encode_variance(v, new_nu_scale), new_mu_scale, new_nu_scale)

    results = jax.tree.map(leaf_update, updates, state.mu, state.nu, state.mu_scale, state.nu_scale)
    treedef = jax.tree.structure(updates)
    columns = list(zip(*treedef.flatten_up_to(results))) or [()] * 5  # a tree without leaves (optax.masked)
    directions, mu, nu, mu_scale, nu_scale = (jax.tree.unflatten(treedef, column) for column in columns)
    return directions, ScaleByLamb16State(numerics.safe_increment(state.count), mu, nu, mu_scale, nu_scale)

  return optax.GradientTransformation(init_fn, update_fn)


def clipped_layer_norm(x: jax.Array, eps: jax.Array | float) -> jax.Array:
  """The reference's layer norm: ``sqrt(sum(clip(x*x, eps, 1))) / N`` (N, not sqrt(N); N >= 1)."""
  return jnp.sqrt(jnp.sum(jnp.clip(x * x, eps, 1.0))) / max(x.size, 1)


def scale_by_lamb16_trust_ratio(learning_rate: optax.ScalarOrSchedule, trust_scale: float = 0.382,
                                reference_lr: float = 1e-3, eps: float = 1e-6) -> optax.GradientTransformation:
  """Scales each leaf by LAMB16's learning-rate-adaptive trust ratio.

  ``r = clip(((wn / un) * (reference_lr / lr)) ** trust_scale, 0, 2)`` with the clipped norms
  ``wn = clipped_layer_norm(params)`` and ``un = clipped_layer_norm(updates)``. A larger learning rate than
  `reference_lr` lowers the trust; ``trust_scale`` damps the ratio (0 gives r = 1, plain Adam-like steps).

  Args:
    learning_rate: The learning rate (float or schedule) that the chain will apply after this transform; the trust
      uses its value at the current step.
    trust_scale: Exponent applied to the trust ratio; non-negative.
    reference_lr: The learning rate at which the plain norm ratio is used; positive.
    eps: Lower clip of the squared elements in the norms; positive.

  Returns:
    An `optax.GradientTransformation` (stateless, or a step count when `learning_rate` is a schedule).

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.scale_by_lamb16_trust_ratio(learning_rate=1e-3, trust_scale=1.0)
    >>> params, updates = {"w": jnp.full(4, 0.5)}, {"w": jnp.full(4, 1.0)}
    >>> tx.update(updates, tx.init(params), params)[0]["w"]  # |p| / |u| = 0.5
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)

  References:
    The LAMB16 proof of concept, vxst/LAMB16 (`pytorch_lamb/lamb16.py`), 2024.
  """
  _checks.check_learning_rate(learning_rate)
  _checks.check_range("trust_scale", trust_scale, 0.0, fix="The reference uses 0.382.")
  _checks.check_range("reference_lr", reference_lr, 0.0, low_open=True, fix=_REFERENCE_LR_FIX)
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=_EPS_FIX)

  def init_fn(params):
    del params
    return _common.init_schedule_state(learning_rate)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lamb16_trust_ratio needs `params`: call `update(grads, state, params)`.")
    _checks.check_float_leaves("updates", updates)
    _checks.check_same_structure("updates", updates, "params", params)
    lr = _common.value_at(learning_rate, _common.schedule_count(state))
    exponent, lr_ratio_numerator, epsilon = (jnp.asarray(x, jnp.float32) for x in (trust_scale, reference_lr, eps))

    def leaf_update(u, p):
      direction = u.astype(jnp.float32)
      norm_ratio = clipped_layer_norm(p.astype(jnp.float32), epsilon) / clipped_layer_norm(direction, epsilon)
      # lr == 0 gives an infinite ratio, clipped to 2; the step is then 0 anyway.
      trust = jnp.clip((norm_ratio * (lr_ratio_numerator / lr)) ** exponent, 0.0, 2.0)
      return (trust * direction).astype(u.dtype)

    return jax.tree.map(leaf_update, updates, params), _common.advance_schedule_state(state)

  return optax.GradientTransformation(init_fn, update_fn)


def _decay_mask(mask: Any, params: Any) -> list[bool]:
  """Per leaf (tree-flatten order): whether weight decay applies. `mask` is like `optax.masked`'s (a prefix tree of
  booleans or a callable of the params); None means everywhere."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  mask_tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(lambda m, subtree: jax.tree.map(lambda _: bool(m), subtree), mask_tree, params)
  return jax.tree.leaves(full)


def _lamb16_leaf(g, p, mu, nu, mu_scale, nu_scale, *, lr, decay, beta1, beta2, epsilon, exponent, reference):
  """One leaf of the fused LAMB16 step: two passes over g, p and the float8 moments.

  Pass 1 reduces the four norms the step needs (the two scales, |u| and |p|) chunk by chunk, so that float32 m, v
  and u exist only a chunk at a time; pass 2, element-wise, recomputes m, v and u and writes the update and the
  re-encoded moments.
  """
  shape, n = g.shape, max(g.size, 1)
  flat = [x.reshape(-1) for x in (g, p, mu, nu)]

  def moments_and_direction(gc, pc, mc, vc):
    grad = gc.astype(jnp.float32)
    m = beta1 * float8.decode(mc, mu_scale) + (1 - beta1) * grad
    v = beta2 * float8.decode(vc, nu_scale) + (1 - beta2) * grad * grad
    return m, v, m / (jnp.sqrt(v) + epsilon) + decay * pc.astype(jnp.float32)

  def norm_terms(gc, pc, mc, vc):
    m, v, u = moments_and_direction(gc, pc, mc, vc)
    square = lambda x: jnp.minimum(x * x, float8.SQUARE_CLIP)
    clipped = lambda x: jnp.clip(x * x, epsilon, 1.0)
    # Paired as fused_sums sums them: |m| with |p| (one decode), |v| with |u| (which needs v anyway).
    return square(m), clipped(pc.astype(jnp.float32)), square(v), clipped(u)

  m_sum, p_sum, v_sum, u_sum = _chunked.fused_sums(norm_terms, flat)
  new_mu_scale = jnp.sqrt(m_sum) / n + epsilon
  new_nu_scale = jnp.sqrt(v_sum) / n + epsilon
  norm_ratio = (jnp.sqrt(p_sum) / n) / (jnp.sqrt(u_sum) / n)
  trust = jnp.clip((norm_ratio * (reference / lr)) ** exponent, 0.0, 2.0)

  def outputs(gc, pc, mc, vc):
    m, v, u = moments_and_direction(gc, pc, mc, vc)
    return ((-lr) * (trust * u)).astype(g.dtype), float8.encode_momentum(m, new_mu_scale), float8.encode_variance(
        v, new_nu_scale)

  update, mu, nu = (x.reshape(shape) for x in outputs(*flat))
  return update, mu, nu, new_mu_scale, new_nu_scale


def lamb16(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: optax.ScalarOrSchedule = 0.0, trust_scale: float = 0.382, reference_lr: float = 1e-3,
           mask: Any | Callable[[optax.Params], Any] | None = None) -> optax.GradientTransformation:
  """LAMB16: LAMB with float8 moments (2 bytes of state per parameter) and a learning-rate-adaptive trust ratio.

  Faithful to the reference (SPEC.md section 1): for each leaf, float8 moments without bias correction, the Adam
  direction ``u = m / (sqrt(v) + eps) + weight_decay * p`` and the update ``-lr * r * u`` with
  ``r = clip(((wn / un) * (reference_lr / lr)) ** trust_scale, 0, 2)`` from clipped layer norms. Params and
  gradients keep their dtype; all arithmetic is float32.

  The maths is that of ``optax.chain(scale_by_lamb16(b1, b2, eps), <decoupled weight decay>,
  scale_by_lamb16_trust_ratio(learning_rate, trust_scale, reference_lr, eps), <-learning_rate>)``, but computed in
  one fused step per leaf: the norms chunk by chunk, then one element-wise pass that recomputes m, v and u and
  writes the update and the re-encoded moments, so that no float32 copy of m, v or u of a whole leaf is stored. The
  state is that of `scale_by_lamb16`, whose count also drives schedules. The faithful float8 storage can overflow
  v to +inf for an element far above its leaf's scale, which then stops moving until that scale grows: see
  `optax_lamb16.float8`.

  Args:
    learning_rate: A non-negative float or an optax schedule; the trust ratio uses its value at each step.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the moment scales and to ``sqrt(v)``; lower clip of the squares in the trust norms; positive.
    weight_decay: Decoupled weight decay (float or schedule), added before the trust ratio (inside its norm).
    trust_scale: Exponent of the trust ratio.
    reference_lr: The learning rate at which the trust ratio is the plain norm ratio.
    mask: Pytree of booleans (or a callable returning one) like `params`, or a prefix of it: weight decay only
      where True, as in `optax.lamb`.

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByLamb16State`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lamb16
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> tx = optax_lamb16.lamb16(learning_rate=0.01, weight_decay=0.01)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> [round(p, 4) for p in params["w"].tolist()]
    [0.9868, -1.9868, 2.9868]

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76 minutes
    <https://arxiv.org/abs/1904.00962>`_, 2020. The LAMB16 proof of concept, vxst/LAMB16, 2024.
  """
  moments = scale_by_lamb16(b1=b1, b2=b2, eps=eps)  # checks b1, b2, eps; its init is ours
  _checks.check_learning_rate(learning_rate)
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")
  _checks.check_range("trust_scale", trust_scale, 0.0, fix="The reference uses 0.382.")
  _checks.check_range("reference_lr", reference_lr, 0.0, low_open=True, fix=_REFERENCE_LR_FIX)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lamb16 needs `params`: call `update(grads, state, params)`.")
    _checks.check_float_leaves("updates", updates)
    _checks.check_same_structure("updates", updates, "optimizer state (from init)", state.mu)
    _checks.check_same_structure("updates", updates, "params", params)
    at_step = lambda h: jnp.asarray(h(state.count) if callable(h) else h, jnp.float32)
    lr, decay = at_step(learning_rate), at_step(weight_decay)
    hyper = dict(beta1=at_step(b1), beta2=at_step(b2), epsilon=at_step(eps), exponent=at_step(trust_scale),
                 reference=at_step(reference_lr), lr=lr)
    leaves, treedef = jax.tree.flatten(updates)
    columns = [treedef.flatten_up_to(tree) for tree in (params, state.mu, state.nu, state.mu_scale,
                                                         state.nu_scale)]
    results = [
        _lamb16_leaf(g, *others, decay=decay if decayed else jnp.float32(0), **hyper)
        for g, decayed, *others in zip(leaves, _decay_mask(mask, params), *columns)]
    outputs = list(zip(*results)) or [()] * 5  # a tree without leaves (optax.masked)
    new_updates, mu, nu, mu_scale, nu_scale = (jax.tree.unflatten(treedef, list(column)) for column in outputs)
    return new_updates, ScaleByLamb16State(numerics.safe_increment(state.count), mu, nu, mu_scale, nu_scale)

  return optax.GradientTransformation(moments.init, update_fn)
