"""1-bit Adam (Algorithms sections 2 and 4), faithful to DeepSpeed 0.19.6 ``onebit/adam.py``.

Warm-up: Adam (no bias correction) on the exact mean of the ranks' gradients. From ``t = freeze_step + 1`` on, v is
frozen and each rank's momentum ``b1*m + (1-b1)*g_local`` is averaged with ONE error-feedback 1-bit compressed
all-reduce for the whole model (1/32 of the bytes of a float32 all-reduce). Parameters stay bitwise identical on all
ranks in both phases.

The maths decomposes as `optax.adamw`'s does: `scale_by_onebit_adam` (the moments and their exchange, emitting
``m / (sqrt(v) + eps)``), then the decoupled weight decay (``+ weight_decay * params``), then ``-learning_rate``;
`onebit_adam` is that chain.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, _common, _onebit
from optax_lamb16 import _compression as compression
from optax_lamb16 import comm as comm_lib


class ScaleByOnebitAdamState(NamedTuple):
  """State of `scale_by_onebit_adam` (the first element of `onebit_adam`'s chain state).

  Attributes:
    count: int32, DeepSpeed's step counter: 1 after `init` (its set-up call), so the first update runs with t = 2.
    mu: first moments (like params, in their arithmetic dtype: float32, float64 for float64 params), identical on
      all ranks.
    nu: second moments (the same dtypes), identical on all ranks, frozen after `freeze_step`.
    exchange: the compressed all-reduce's error feedback: PER RANK.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  exchange: compression.CompressedAllReduceState


def scale_by_onebit_adam(
  comm: Any,
  freeze_step: int = 100000,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  *,
  momentum_mask: Any = None,
  mask_zero_variance: bool = False,
  mode: str = "faithful",
) -> optax.GradientTransformationExtraArgs:
  """1-bit Adam's moments and their data-parallel exchange; emits the Adam direction ``m / (sqrt(v) + eps)``
  (faithful) or ``m̂ / (sqrt(v̂) + eps)`` with Adam's bias corrections (drop-in, Algorithms section 6b).

  Takes each rank's LOCAL gradients. While ``t <= freeze_step`` (DeepSpeed's count, Algorithms section 2): the exact
  mean of the gradients over ranks updates m and v. After: each rank's ``b1*m + (1-b1)*g_local`` goes through ONE
  compressed all-reduce for the whole tree and v stays frozen. The phase follows the state's counter.
  ``init`` and ``update`` run where `comm` is usable (inside `shard_map` for a mesh-axis name).

  Args:
    comm: Mesh-axis name, mpi4py communicator, None (one device) or a `comm.Communicator`.
    freeze_step: Last warm-up step in DeepSpeed's counting (``F - 1`` warm-up updates, compression from t = F + 1),
      at least 2.
    b1: First-moment decay, in [0, 1).
    b2: Second-moment decay, in [0, 1).
    eps: Added to ``sqrt(v)`` (no bias correction, as in DeepSpeed).
    momentum_mask: Optional pytree like params of 0/1 arrays multiplied into the momentum after each compressed
      exchange (DeepSpeed's ``exp_avg_mask``, e.g. for padded embedding rows).
    mask_zero_variance: Not in DeepSpeed (default False, faithful): after each compressed exchange, also zero the
      momentum where v is exactly 0 (elements that never had a gradient, which the exchange would hand sign noise).
    mode: ``"faithful"`` (default): DeepSpeed's rule, no bias correction. ``"drop_in"``: Adam's bias-corrected m
      and v (v's correction frozen with v), for Adam's learning rate (Algorithms section 6b). Static.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByOnebitAdamState` (``exchange`` is per
    rank). Its updates have the gradients' dtype (computed in float32, or in float64 for float64 params; the
    compressed exchange is float32 either way). A schedule for `b1`, `b2` or `eps` sees the number of updates so far.
  """
  communicator = comm_lib.as_communicator(comm)
  _onebit.check_moment_hyperparameters(b1, b2, eps)
  freeze_step = _onebit.check_freeze_step(freeze_step)
  drop_in = _onebit.check_mode(mode) == "drop_in"

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    return ScaleByOnebitAdamState(
      count=_onebit.initial_count(),
      mu=_onebit.zeros_like(params, communicator),
      nu=_onebit.zeros_like(params, communicator),
      exchange=compression.init_compressed_allreduce(params, communicator),
    )

  def update_fn(updates, state, params=None):
    grads, _, _ = _onebit.checked_inputs(updates, state, params, communicator, params_required=False)
    t = _onebit.next_count(state.count)
    dtype = _common.widest_arithmetic_dtype(state.nu)
    beta1, beta2 = _onebit.decays_at(state.count, b1, b2, dtype=dtype)
    (epsilon,) = _onebit.hyperparameters_at(state.count, eps, dtype=dtype)

    warm = t <= freeze_step
    # Warm-up: the exact mean of the ranks' gradients updates m and v.
    grads, (mu, nu) = _onebit.run_if(
      warm,
      lambda grads, moments: _onebit.warmup_moments(grads, *moments, beta1, beta2, communicator),
      grads,
      (state.mu, state.nu),
    )

    # Compression: this rank's momentum goes through one compressed exchange (v frozen). The exchange hands out its
    # sign payload; decoding it here fuses into the direction's pass instead of writing the momentum twice.
    def compress(operands, carry):
      mu, grads = operands
      return compression.exchange(_common.tree_moment_update(mu, grads, beta1), carry[1], communicator)

    (mu, grads), (payload, exchange) = _onebit.run_if(
      jnp.logical_not(warm), compress, (mu, grads), (_onebit.skipped_exchange(grads, communicator), state.exchange)
    )
    averaged = _onebit.apply_mask(compression.decode_like(payload, mu), momentum_mask, nu, mask_zero_variance)
    mu = jax.tree.map(lambda m, a: jnp.where(warm, m, a), mu, averaged)
    if drop_in:  # Adam's bias corrections; v's stops at the freeze (Algorithms section 6b)
      c1 = _common.bias_correction(beta1, t - 1)
      c2 = _common.bias_correction(beta2, jnp.minimum(t, freeze_step) - 1)
      direction = lambda m, v: (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + epsilon.astype(v.dtype))
    else:
      direction = lambda m, v: m / (jnp.sqrt(v) + epsilon.astype(v.dtype))
    directions = jax.tree.map(lambda m, v, g: direction(m, v).astype(g.dtype), mu, nu, updates)
    return directions, ScaleByOnebitAdamState(t, mu, nu, exchange)

  return _common.extra_args_transform(init_fn, update_fn)


def onebit_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  comm: Any,
  freeze_step: int = 100000,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  momentum_mask: Any = None,
  mask_zero_variance: bool = False,
  mode: str = "faithful",
) -> optax.GradientTransformationExtraArgs:
  """1-bit Adam: Adam whose momentum is averaged with 1-bit compressed communication after a warm-up.

  Takes each rank's LOCAL gradients and does all data-parallel communication itself: an exact all-reduce of the
  gradients while ``t <= freeze_step``, then one compressed exchange of the momentum per step. Each phase runs
  only when the state's counter says so (a loop of 0 or 1 trips), so whole training loops can be jitted or
  scanned. ``init`` and ``update``
  run where `comm` is usable (inside `shard_map` for a mesh-axis name).

  The chain ``optax.chain(scale_by_onebit_adam(comm, freeze_step, b1, b2, eps, ...), weight decay, -learning_rate)``
  (the last two dtype-preserving: computed in each leaf's arithmetic dtype, rounded once to the updates' dtype).
  float64 params (with ``jax_enable_x64``) get float64 moments and arithmetic; the compressed exchange is float32
  for every dtype (1 bit per element plus float32 scales, float32 error feedback). In float32 it is
  bitwise ``-lr * (m / (sqrt(v) + eps) + weight_decay * p)``; with bfloat16 params each block rounds its output to
  bfloat16, as the blocks of `optax.adamw` do.

  Args:
    learning_rate: Non-negative float or schedule (evaluated at the number of updates so far).
    comm: Mesh-axis name, mpi4py communicator, None (one device) or a `comm.Communicator`.
    freeze_step: Last warm-up step in DeepSpeed's counting (``F - 1`` warm-up updates, compression from t = F + 1),
      at least 2.
    b1: First-moment decay, in [0, 1).
    b2: Second-moment decay, in [0, 1).
    eps: Added to ``sqrt(v)``.
    weight_decay: Added as ``weight_decay * params`` to the Adam direction (DeepSpeed's decoupled form).
    momentum_mask: Optional pytree like params of 0/1 arrays multiplied into the momentum after each compressed
      exchange (DeepSpeed's ``exp_avg_mask``, e.g. for padded embedding rows).
    mask_zero_variance: Not in DeepSpeed (default False, faithful): see `scale_by_onebit_adam`.
    mode: ``"faithful"`` (default): DeepSpeed's rule, no bias correction. ``"drop_in"``: `optax.adamw`'s rule
      (Algorithms section 6b), at Adam's learning rate; see "Choosing the hyperparameters" below. With one rank and no
      freeze within the run, ``"drop_in"`` is ``optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay)``
      up to float32 rounding. Static.

  Returns:
    An `optax.GradientTransformationExtraArgs` (a chain) whose state's first element is a
    `ScaleByOnebitAdamState` (its ``exchange`` is per rank; use `state_partition_specs`).

  Choosing the hyperparameters (byte-level transformer, 4 ranks, global batch 32, 500 steps, freeze at 20 % of the
  steps; exact data-parallel `optax.adam`: 2.64 bits/byte at lr 1e-3 with a 50-step warm-up, 2.72 at a constant
  lr):

  - ``mode="faithful"`` (DeepSpeed's rule, no bias correction): its first updates move each parameter by 3.2 x the
    learning rate, and up to 6.6 x around the 12th (b1 0.9, b2 0.999; Adam: 1 x), and v is frozen at the
    uncorrected estimate, so the steps after the freeze stay larger than Adam's too. Use about 1/3 of Adam's
    learning rate and a warm-up schedule: at lr 3e-4 with a warm-up it ends at 2.72 bits/byte (Adam's best: 2.64);
    at Adam's lr 1e-3 and a constant lr it stalls at 4.4 bits/byte from step 50 on (ends at 4.25). A constant
    Python learning rate raises a `LargeFirstStepsWarning` (`optax_lamb16._onebit`) in this mode.
  - ``mode="drop_in"``: Adam's rule, at Adam's learning rate and schedule.
  - ``freeze_step``: late enough that v has settled (its bias correction ``1 - b2**(freeze_step - 1)`` is small
    otherwise, and the faithful mode's steps stay large); 20 % of the run in the measurements above. The
    compression itself cost nothing measurable there (the faithful rule without it, freeze_step beyond the run,
    ended at 2.76 at lr 3e-4 with a warm-up): the update rule, not the 1-bit exchange, is what needs the care.

  Under `optax.inject_hyperparams`, `comm` and the string `mode` stay static (optax injects neither); the numeric
  hyperparameters may be injected, `freeze_step` included (the phase switch compares the step with it in the
  jitted update).

  Example:
    >>> import jax.numpy as jnp, optax, optax_lamb16
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax_lamb16.onebit_adam(1e-2, comm=None, freeze_step=10, mode="drop_in")
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.array([0.5, 0.5])}, state, params)
    >>> [round(u, 4) for u in updates["w"].tolist()]  # Adam's first step, -lr * sign(g) (faithful: 3.2x that)
    [-0.01, -0.01]

  References:
    Tang et al., `1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed
    <https://arxiv.org/abs/2102.02888>`_, 2021; DeepSpeed 0.19.6 ``deepspeed/runtime/fp16/onebit/adam.py``.
  """
  _onebit.check_common(learning_rate, comm, b1, b2, eps, weight_decay)
  _onebit.warn_if_large_first_steps("onebit_adam", learning_rate, b1, b2, _onebit.check_mode(mode))
  return optax.chain(
    scale_by_onebit_adam(
      comm, freeze_step, b1, b2, eps, momentum_mask=momentum_mask, mask_zero_variance=mask_zero_variance, mode=mode
    ),
    _common.add_decayed_weights(weight_decay),
    _common.scale_by_learning_rate(learning_rate),
  )
