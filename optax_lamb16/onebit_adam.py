"""1-bit Adam (SPEC.md sections 2 and 4), faithful to DeepSpeed 0.19.6 ``onebit/adam.py``.

Warm-up: Adam (no bias correction) on the exact mean of the ranks' gradients. From ``t = freeze_step + 1`` on, v is
frozen and each rank's momentum ``b1*m + (1-b1)*g_local`` is averaged with ONE error-feedback 1-bit compressed
all-reduce for the whole model (1/32 of the bytes of a float32 all-reduce). Parameters stay bitwise identical on all
ranks in both phases.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, _onebit, compression


class OnebitAdamState(NamedTuple):
  """State of `onebit_adam`.

  Attributes:
    count: int32, DeepSpeed's step counter: 1 after `init` (its set-up call), so the first update runs with t = 2.
    mu: first moments (float32, like params), identical on all ranks.
    nu: second moments (float32), identical on all ranks, frozen after `freeze_step`.
    exchange: the compressed all-reduce's error feedback: PER RANK.
  """
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  exchange: compression.CompressedAllReduceState


def onebit_adam(learning_rate: optax.ScalarOrSchedule = 1e-3, *, comm: Any, freeze_step: int = 100000,
                b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                momentum_mask: Any = None, mask_zero_variance: bool = False) -> optax.GradientTransformation:
  """1-bit Adam: Adam whose momentum is averaged with 1-bit compressed communication after a warm-up.

  Takes each rank's LOCAL gradients and does all data-parallel communication itself: an exact all-reduce of the
  gradients while ``t <= freeze_step``, then one compressed exchange of the momentum per step. The phase switch is
  a `lax.cond` on the state's counter, so whole training loops can be jitted or scanned. ``init`` and ``update``
  run where `comm` is usable (inside `shard_map` for a mesh-axis name).

  Args:
    learning_rate: Non-negative float or schedule (evaluated at the number of updates so far).
    comm: Mesh-axis name, mpi4py communicator, None (one device) or a `comm.Communicator`.
    freeze_step: Last warm-up step in DeepSpeed's counting (``F - 1`` warm-up updates, compression from t = F + 1).
    b1: First-moment decay, in [0, 1).
    b2: Second-moment decay, in [0, 1).
    eps: Added to ``sqrt(v)``.
    weight_decay: Added as ``weight_decay * params`` to the Adam direction (DeepSpeed's decoupled form).
    momentum_mask: Optional pytree like params of 0/1 arrays multiplied into the momentum after each compressed
      exchange (DeepSpeed's ``exp_avg_mask``, e.g. for padded embedding rows).

  Returns:
    An `optax.GradientTransformation` whose state is a `OnebitAdamState` (``exchange`` is per rank; use
    `state_partition_specs`).

  Static under `optax.inject_hyperparams`: `comm`, `freeze_step` (pass them via ``static_args``); numeric
  ``learning_rate, b1, b2, eps, weight_decay`` may be injected.

  Example:
    >>> import jax.numpy as jnp, optax, optax_lamb16
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax_lamb16.onebit_adam(1e-2, comm=None, freeze_step=10)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.5, 0.5])}, state, params)
    >>> [round(u, 4) for u in updates["w"].tolist()]  # -lr * 0.1 g / (sqrt(0.001) |g|): no bias correction
    [-0.0316, -0.0316]

  References:
    Tang et al., `1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed
    <https://arxiv.org/abs/2102.02888>`_, 2021; DeepSpeed 0.19.6 ``deepspeed/runtime/fp16/onebit/adam.py``.
  """
  communicator = _onebit.check_common(learning_rate, comm, b1, b2, eps, weight_decay)
  freeze_step = _checks.check_step_count("freeze_step", freeze_step, 0, fix=_onebit.STEP_FIX)

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    zeros = lambda p: jnp.zeros(jnp.shape(p), jnp.float32)
    return OnebitAdamState(count=_onebit.initial_count(), mu=jax.tree.map(zeros, params),
                           nu=jax.tree.map(zeros, params),
                           exchange=compression.init_compressed_allreduce(params, communicator))

  def update_fn(updates, state, params=None):
    grads, params, _ = _onebit.checked_inputs(updates, state, params, communicator)
    t = state.count + 1
    beta1, beta2, epsilon, decay = _onebit.as_float32(b1, b2, eps, weight_decay)

    def warmup(_):
      mean = compression.exact_mean(grads, communicator)
      mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, mean)
      nu = jax.tree.map(lambda v, g: beta2 * v + (1 - beta2) * g * g, state.nu, mean)
      return mu, nu, state.exchange

    def compressed(_):
      local = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, grads)
      mu, exchange = compression.compressed_allreduce(local, state.exchange, communicator)
      return _onebit.apply_mask(mu, momentum_mask, state.nu, mask_zero_variance), state.nu, exchange

    mu, nu, exchange = jax.lax.cond(t <= freeze_step, warmup, compressed, None)
    lr = _onebit.learning_rate_at(learning_rate, state.count)
    new_updates = jax.tree.map(
        lambda m, v, p, u: (-lr * (m / (jnp.sqrt(v) + epsilon) + decay * p)).astype(u.dtype), mu, nu, params, updates)
    return new_updates, OnebitAdamState(t, mu, nu, exchange)

  return optax.GradientTransformation(init_fn, update_fn)
