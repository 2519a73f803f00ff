"""LAMB16: LAMB with float8 optimizer state and a learning-rate-adaptive trust ratio (Algorithms section 1).

The building blocks compose the way `optax.lamb` chains `scale_by_adam`, `add_decayed_weights`,
`scale_by_trust_ratio` and `scale_by_learning_rate`:

1. `scale_by_lamb16` keeps m and v in float8 with per-leaf float32 scales and emits the Adam direction
   ``m / (sqrt(v) + eps)`` (no bias correction);
2. decoupled weight decay ``+ weight_decay * params`` (optionally masked);
3. `scale_by_lamb16_trust_ratio` multiplies each leaf by ``clip(((|p| / |u|) * (reference_lr / lr)) ** trust_scale,
   0, 2)`` with the reference's clipped norms;
4. the learning-rate scaling ``-lr``.

`lamb16` computes that chain in one fused step per leaf from the same per-element functions (below), so the two
cannot drift apart; `lamb16_blockwise` is the same step with one scale per block (Algorithms section 1b). The step is
one implementation for every platform: element-wise maths in each leaf's own shape, XLA's float8 conversions and
whole-leaf XLA reductions, with no loop and no flattening of a leaf whose block view allows it, so that under plain
`jit` a leaf sharded by `NamedSharding` (FSDP) is updated where it lies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, _common
from optax_lamb16 import _float8 as float8
from optax_lamb16._adam16 import ScaleByAdam16State


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
_EPS_FIX = (
  "It floors the moment scales and the trust-ratio norms, so that all-zero leaves stay finite. Typical value: 1e-6."
)
# With reference_lr = 0 the trust is 0 ** trust_scale (no training), and 0 / 0 = NaN when the learning rate is 0 too.
_REFERENCE_LR_FIX = "It is the learning rate at which the plain norm ratio applies; the reference uses 1e-3."


def _check_moment_args(b1: Any, b2: Any, eps: Any) -> None:
  _checks.check_decay_rates(b1, b2, hint=_checks.LOW_PRECISION_HINT)
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=_EPS_FIX)


def _check_trust_args(learning_rate: Any, trust_scale: Any, reference_lr: Any, eps: Any) -> None:
  _checks.check_learning_rate(learning_rate)
  _checks.check_range("trust_scale", trust_scale, 0.0, fix="The reference uses 0.382.")
  _checks.check_range("reference_lr", reference_lr, 0.0, low_open=True, fix=_REFERENCE_LR_FIX)
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=_EPS_FIX)


# ---------------------------------------------------------------------------------------------------------------
# Per-element maths and the per-leaf step, shared by the building blocks and the fused optimizers.
#
# Everything is written in each leaf's own shape, with whole-leaf reductions (sums over all axes, block maxima over
# the blocked view of `float8.block_layout`) and no loop: under plain `jit` with a leaf sharded by `NamedSharding`
# along any of its axes, XLA's SPMD partitioner reduces each device's part where it lies and all-reduces the scalars
# (and per-block maxima where a block spans devices), as for `optax.lamb`; and each leaf compiles to a few fusions.
# Large leaves are reduced in two stages (`float8.fold_last_axis`), so that XLA:CPU need not write their terms out.
# (A leaf whose size is not a multiple of the block size is the exception: see `float8.block_maxima`.)


def _moments(g, m_prev, v_prev, beta1, beta2):
  """Step 2: the moment EMAs of the dequantized moments with the float32 gradient."""
  grad = g.astype(jnp.float32)
  return _common.moment_update(m_prev, grad, beta1), _common.moment_update(v_prev, grad, beta2, order=2)


def _adam_direction(m, v, epsilon):
  return m / (jnp.sqrt(v) + epsilon)


def _trust_square(x, epsilon):
  """The terms of the reference's clipped layer norm: ``clip(x*x, eps, 1)``."""
  return jnp.clip(x * x, epsilon, 1.0)


def _layer_norm_from_sum(total, n: int):
  return float8.divide(jnp.sqrt(total), jnp.float32(max(n, 1)))


def _trust(param_total, update_total, n: int, lr, reference_lr, exponent):
  """Step 7 from the sums of `_trust_square` of the params and of the direction."""
  norm_ratio = _layer_norm_from_sum(param_total, n) / _layer_norm_from_sum(update_total, n)
  # lr == 0 gives an infinite ratio, clipped to 2; the step is then 0 anyway.
  return jnp.clip((norm_ratio * (reference_lr / lr)) ** exponent, 0.0, 2.0)


def clipped_layer_norm(x: jax.Array, eps: jax.Array | float) -> jax.Array:
  """The reference's layer norm: ``sqrt(sum(clip(x*x, eps, 1))) / N`` (N, not sqrt(N); N >= 1)."""
  return _layer_norm_from_sum(float8.leaf_sum(_trust_square(x, eps)), x.size)


def _leaf_step(
  g,
  p,
  mu,
  nu,
  mu_scale,
  nu_scale,
  *,
  block_size,
  beta1,
  beta2,
  epsilon,
  lr=None,
  decay=None,
  exponent=None,
  reference=None,
  rounding_key=None,
):
  """One leaf of `lamb16` (Algorithms section 1) or, with a `block_size`, of `lamb16_blockwise` (section 1b); with
  ``p=None``, of `scale_by_lamb16` / `scale_by_lamb16_blockwise` (the Adam direction alone).

  Returns the step (the update, or the direction) in g's dtype, the re-encoded moments and their new scales. XLA
  fuses the element-wise maths into the outputs and into the first stage of each reduction (`float8.leaf_sum`,
  `float8.block_maxima`).
  """
  if block_size is not None and g.size == 0:  # no blocks, no scales to update
    return jnp.zeros_like(g), mu, nu, mu_scale, nu_scale
  n = g.size
  if block_size is None:
    m, v = _moments(g, float8.decode(mu, mu_scale), float8.decode(nu, nu_scale), beta1, beta2)
  else:
    m, v = _moments(
      g, float8.block_decode(mu, mu_scale, block_size), float8.block_decode(nu, nu_scale, block_size), beta1, beta2
    )
  u = _adam_direction(m, v, epsilon)
  if p is not None:
    p32 = p.astype(jnp.float32)
    u = u + decay * p32
  if block_size is None:
    new_mu_scale = float8.scale_from_sum(float8.leaf_sum(float8.clipped_square(m)), n, epsilon)
    new_nu_scale = float8.scale_from_sum(float8.leaf_sum(float8.clipped_square(v)), n, epsilon)
    new_mu, new_nu = float8.encode_momentum(m, new_mu_scale), float8.encode_variance(v, new_nu_scale)
  else:
    new_mu, new_nu, new_mu_scale, new_nu_scale = float8.block_encode(m, v, block_size, rounding_key)
  if p is None:
    step = u
  else:
    trust = _trust(
      float8.leaf_sum(_trust_square(p32, epsilon)),
      float8.leaf_sum(_trust_square(u, epsilon)),
      n,
      lr,
      reference,
      exponent,
    )
    step = (-lr) * (trust * u)
  return step.astype(g.dtype), new_mu, new_nu, new_mu_scale, new_nu_scale


def _init_state(params: Any, block_size: int | jax.Array | None = None) -> ScaleByLamb16State:
  """The state of both storages: per-leaf scalar scales, or (`block_size`) one scale per block of the flat leaf."""
  _checks.check_float_leaves("params", params)
  return ScaleByLamb16State(jnp.zeros([], jnp.int32), *float8.zero_moments(params, block_size))


def _all_leaves(updates, params, state, hyper, *, block_size, stochastic_rounding, decayed=None):
  """`_leaf_step` over the leaves (`params` None: the directions alone), the results as five trees like `updates`."""
  decayed = [True] * len(jax.tree.leaves(updates)) if decayed is None else decayed
  no_decay = dict(hyper, decay=jnp.float32(0))

  def step(index, g, p, *moments, block_size, rounding_key):
    return _leaf_step(
      g, p, *moments, block_size=block_size, rounding_key=rounding_key, **(hyper if decayed[index] else no_decay)
    )

  return float8.map_leaves(step, updates, state, block_size, stochastic_rounding, params)


# ---------------------------------------------------------------------------------------------------------------
# The building blocks.


def _scale_by_lamb16(b1, b2, eps, block_size=None, stochastic_rounding=False):
  """`scale_by_lamb16`, or with a `block_size` (an int, or an array under `optax.inject_hyperparams`)
  `scale_by_lamb16_blockwise`."""
  _check_moment_args(b1, b2, eps)
  stochastic_rounding = float8.check_stochastic_rounding(stochastic_rounding)

  def update_fn(updates, state, params=None):
    del params
    _checks.check_update_leaves(updates, state.mu, "optimizer state (from init)")
    hyper = dict(
      beta1=_common.decay_at(b1, state.count),
      beta2=_common.decay_at(b2, state.count),
      epsilon=_common.value_at(eps, state.count),
    )
    directions, mu, nu, mu_scale, nu_scale = _all_leaves(
      updates, None, state, hyper, block_size=block_size, stochastic_rounding=stochastic_rounding
    )
    return directions, ScaleByLamb16State(optax.safe_increment(state.count), mu, nu, mu_scale, nu_scale)

  return _common.extra_args_transform(functools.partial(_init_state, block_size=block_size), update_fn)


def scale_by_lamb16(
  b1: optax.ScalarOrSchedule = 0.9, b2: optax.ScalarOrSchedule = 0.999, eps: optax.ScalarOrSchedule = 1e-6
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam moments that are stored in float8 between steps.

  Per leaf: dequantize ``m = f32(mu) * mu_scale``, ``v = f32(nu) * nu_scale``; update the moments with the float32
  gradient (no bias correction); store them again with new scales ``sqrt(sum(min(x*x, 10))) / N + eps``; emit
  ``m / (sqrt(v) + eps)`` computed from the float32 moments of this step. Updates keep the gradients' dtype.

  Like the reference, v is not clipped after normalising, so an element whose v is very large next to its leaf's
  scale is stored as +inf and then has a zero direction until the scale grows: the faithful float8 overflow,
  documented in `optax_lamb16.float8`.

  Args:
    b1: Decay rate of the first moment, in [0, 1), or a schedule of the step count.
    b2: Decay rate of the second moment, in [0, 1), or a schedule.
    eps: Added to the scales and to ``sqrt(v)``; positive, or a schedule.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByLamb16State`.

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
  return _scale_by_lamb16(b1, b2, eps)


def scale_by_lamb16_trust_ratio(
  learning_rate: optax.ScalarOrSchedule,
  trust_scale: optax.ScalarOrSchedule = 0.382,
  reference_lr: optax.ScalarOrSchedule = 1e-3,
  eps: optax.ScalarOrSchedule = 1e-6,
) -> optax.GradientTransformationExtraArgs:
  """Scales each leaf by LAMB16's learning-rate-adaptive trust ratio.

  ``r = clip(((wn / un) * (reference_lr / lr)) ** trust_scale, 0, 2)`` with the clipped norms
  ``wn = clipped_layer_norm(params)`` and ``un = clipped_layer_norm(updates)``. A larger learning rate than
  `reference_lr` lowers the trust; ``trust_scale`` damps the ratio (0 gives r = 1, plain Adam-like steps).

  Args:
    learning_rate: The learning rate (float or schedule) that the chain will apply after this transform; the trust
      uses its value at the current step.
    trust_scale: Exponent applied to the trust ratio; non-negative (or a schedule).
    reference_lr: The learning rate at which the plain norm ratio is used; positive (or a schedule).
    eps: Lower clip of the squared elements in the norms; positive (or a schedule).

  Returns:
    An `optax.GradientTransformationExtraArgs` (stateless, or a step count when a hyperparameter is a schedule).

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.scale_by_lamb16_trust_ratio(learning_rate=1e-3, trust_scale=1.0)
    >>> params, updates = {"w": jnp.full(4, 0.5)}, {"w": jnp.full(4, 1.0)}
    >>> tx.update(updates, tx.init(params), params)[0]["w"]  # |p| / |u| = 0.5
    Array([0.5, 0.5, 0.5, 0.5], dtype=float32)

  References:
    The LAMB16 proof of concept, vxst/LAMB16 (`pytorch_lamb/lamb16.py`), 2024.
  """
  _check_trust_args(learning_rate, trust_scale, reference_lr, eps)

  def init_fn(params):
    del params
    return _common.init_schedule_state(learning_rate, trust_scale, reference_lr, eps)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("scale_by_lamb16_trust_ratio needs `params`: call `update(grads, state, params)`.")
    _checks.check_update_leaves(updates, params, "params")
    count = _common.schedule_count(state)
    lr, exponent, reference, epsilon = (
      _common.value_at(h, count) for h in (learning_rate, trust_scale, reference_lr, eps)
    )

    def leaf_update(u, p):
      direction = u.astype(jnp.float32)
      totals = (float8.leaf_sum(_trust_square(x, epsilon)) for x in (p.astype(jnp.float32), direction))
      return (_trust(*totals, u.size, lr, reference, exponent) * direction).astype(u.dtype)

    return jax.tree.map(leaf_update, updates, params), _common.advance_schedule_state(state)

  return _common.extra_args_transform(init_fn, update_fn)


# ---------------------------------------------------------------------------------------------------------------
# The fused optimizer.


def _decay_mask(mask: Any, params: Any) -> list[bool]:
  """Per leaf (tree-flatten order): whether weight decay applies. `mask` is like `optax.masked`'s (a prefix tree of
  booleans or a callable of the params); None means everywhere."""
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  mask_tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(lambda m, subtree: jax.tree.map(lambda _: bool(m), subtree), mask_tree, params)
  return jax.tree.leaves(full)


def _lamb16(
  learning_rate, b1, b2, eps, weight_decay, trust_scale, reference_lr, mask, block_size=None, stochastic_rounding=False
):
  """`lamb16`, or with a `block_size` (an int, or an array under `optax.inject_hyperparams`) `lamb16_blockwise`."""
  _check_moment_args(b1, b2, eps)
  stochastic_rounding = float8.check_stochastic_rounding(stochastic_rounding)
  _check_trust_args(learning_rate, trust_scale, reference_lr, eps)
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("lamb16 needs `params`: call `update(grads, state, params)`.")
    _checks.check_update_leaves(updates, state.mu, "optimizer state (from init)")
    _checks.check_update_leaves(updates, params, "params")
    hyper = {
      name: _common.value_at(h, state.count)
      for name, h in dict(
        lr=learning_rate, decay=weight_decay, epsilon=eps, exponent=trust_scale, reference=reference_lr
      ).items()
    }
    hyper.update(beta1=_common.decay_at(b1, state.count), beta2=_common.decay_at(b2, state.count))
    new_updates, mu, nu, mu_scale, nu_scale = _all_leaves(
      updates,
      params,
      state,
      hyper,
      block_size=block_size,
      stochastic_rounding=stochastic_rounding,
      decayed=_decay_mask(mask, params),
    )
    return new_updates, ScaleByLamb16State(optax.safe_increment(state.count), mu, nu, mu_scale, nu_scale)

  return _common.extra_args_transform(functools.partial(_init_state, block_size=block_size), update_fn)


def lamb16(
  learning_rate: optax.ScalarOrSchedule,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-6,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  trust_scale: optax.ScalarOrSchedule = 0.382,
  reference_lr: optax.ScalarOrSchedule = 1e-3,
  mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LAMB16: LAMB with float8 moments (2 bytes of state per parameter) and a learning-rate-adaptive trust ratio.

  Faithful to the reference (Algorithms section 1): for each leaf, float8 moments without bias correction, the Adam
  direction ``u = m / (sqrt(v) + eps) + weight_decay * p`` and the update ``-lr * r * u`` with
  ``r = clip(((wn / un) * (reference_lr / lr)) ** trust_scale, 0, 2)`` from clipped layer norms. Params and
  gradients keep their dtype; all arithmetic is float32.

  The maths is that of ``optax.chain(scale_by_lamb16(b1, b2, eps), optax.add_decayed_weights(weight_decay, mask),
  scale_by_lamb16_trust_ratio(learning_rate, trust_scale, reference_lr, eps),
  optax.scale_by_learning_rate(learning_rate))``, written with the same per-element functions but computed in one
  step per leaf that XLA fuses (no float32 m, v or u is an output or part of the state; XLA may keep them in its
  temporaries between the norms and the element-wise outputs). For float32 params the two agree up to the order of
  the sums; for lower-precision params the fused step keeps float32 from the moments to
  the update, where the chain rounds each block's output to the params' dtype. The state is that of
  `scale_by_lamb16`, whose count also drives schedules. The faithful float8 storage can overflow v to +inf for an
  element far above its leaf's scale, which then stops moving until that scale grows: see `optax_lamb16.float8`.

  Args:
    learning_rate: A non-negative float or an optax schedule; the trust ratio uses its value at each step.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the moment scales and to ``sqrt(v)``; lower clip of the squares in the trust norms; positive.
    weight_decay: Decoupled weight decay, added before the trust ratio (inside its norm).
    trust_scale: Exponent of the trust ratio.
    reference_lr: The learning rate at which the trust ratio is the plain norm ratio.
    mask: Pytree of booleans (or a callable returning one) like `params`, or a prefix of it: weight decay only
      where True, as in `optax.lamb`.

  Every numeric hyperparameter may also be a schedule of the step count.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByLamb16State`.

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
  return _lamb16(learning_rate, b1, b2, eps, weight_decay, trust_scale, reference_lr, mask)


# ---------------------------------------------------------------------------------------------------------------
# The block-wise option (Algorithms section 1b) and the float8 health of a state.


def scale_by_lamb16_blockwise(
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-6,
  block_size: int | None = None,
  stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """`scale_by_lamb16` with block-wise absmax storage of the moments (Algorithms section 1b), which never clips.

  Each leaf, flattened, is cut into blocks of `block_size` elements (the last one may be shorter); each block of m
  and of v has its own float32 scale, ``max|x| / 448`` for m (float8_e4m3fn) and ``max v / 57344`` for v
  (float8_e5m2), so that the block's largest element is stored at the format's largest finite value and nothing
  saturates or overflows. State: ``2 + 8 / block_size`` bytes per parameter (2.03 for 256), plus 4 per leaf.

  Args:
    b1: Decay rate of the first moment, in [0, 1), or a schedule.
    b2: Decay rate of the second moment, in [0, 1), or a schedule.
    eps: Added to ``sqrt(v)``; positive, or a schedule.
    block_size: Elements per block; a positive int, or None for 256. Under
      `optax.inject_hyperparams`, which turns an int into an array, the transform reads it back (see
      `lamb16_blockwise`).
    stochastic_rounding: Store v rounded stochastically (unbiased) instead of to nearest, as `lamb16_blockwise`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByLamb16State` with one scale per block.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.scale_by_lamb16_blockwise(block_size=2)
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> state.mu_scale["w"].shape  # blocks [0, 1] and [2]
    (2,)
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state)
    >>> [round(u, 3) for u in updates["w"].tolist()]
    [3.162, -3.162, 3.162]
  """
  return _scale_by_lamb16(
    b1, b2, eps, block_size=float8.block_size_arg(block_size), stochastic_rounding=stochastic_rounding
  )


def lamb16_blockwise(
  learning_rate: optax.ScalarOrSchedule,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-6,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  trust_scale: optax.ScalarOrSchedule = 0.382,
  reference_lr: optax.ScalarOrSchedule = 1e-3,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  block_size: int | None = None,
  stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """LAMB16 with block-wise absmax float8 storage: an opt-in alternative to `lamb16`'s faithful quantizer.

  The step is `lamb16`'s (same moments, Adam direction, decoupled decay, adaptive trust ratio and update, fused in
  the same step per leaf); only the storage of m and v between steps differs, as in
  `scale_by_lamb16_blockwise`: one float32 scale per block of `block_size` elements, the block's largest magnitude
  stored at the float8 format's top. The faithful per-tensor scale ``sqrt(sum(min(x*x, 10))) / N + eps`` puts most
  of m at its ±15 clip in any leaf of more than a few hundred elements and can overflow v to +inf
  (`optax_lamb16.float8`); here nothing clips, and an element is lost only when it is 2^17 (m) or 2^32 (v) times
  smaller than its block's largest and rounds to 0. State: about 2.03 bytes per parameter for blocks of 256.

  Args:
    learning_rate: A non-negative float or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to ``sqrt(v)``; lower clip of the squares in the trust norms; positive.
    weight_decay: Decoupled weight decay, added before the trust ratio.
    trust_scale: Exponent of the trust ratio.
    reference_lr: The learning rate at which the trust ratio is the plain norm ratio.
    mask: Where weight decay applies, as in `lamb16`.
    block_size: Elements per block of the moments' scales; a positive int, or None for 256.
      It shapes the state, so it is static: under `optax.inject_hyperparams` (which turns an int into an array)
      `init` reads the array's value, and a jitted `update` recovers it from the state's block counts, which any
      leaf of more than about ``block_size**2`` elements pins down (otherwise a ValueError asks for
      ``static_args=('block_size',)``). Changing it in the injected hyperparams does not change the blocks.
    stochastic_rounding: Store v rounded up or down at random, with probability proportional to the distance
      (Algorithms section 1b), so that its expected stored value is the float32 one. v moves by at most 0.1 % a step
      and e5m2's steps are 25 %: rounded to nearest, an element's v cannot follow a decline until its block's
      largest element moves the scale. On a synthetic stream this halves the error of the Adam direction
      (`benchmarks/quantizer_study.py`). The random bits hash (step, leaf, element): no extra state, the same on
      every data-parallel replica and after a restore.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByLamb16State` with one scale per block.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> params = {"w": jnp.ones(1000)}
    >>> tx = optax_lamb16.lamb16_blockwise(learning_rate=1e-3)
    >>> _, state = tx.update({"w": jnp.linspace(-1.0, 1.0, 1000)}, tx.init(params), params)
    >>> state.mu_scale["w"].shape  # 4 blocks of 256 (the last one 232)
    (4,)
    >>> float(optax_lamb16.float8_health(state)["mu_saturated"])  # lamb16's faithful storage: 0.736
    0.0

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization <https://arxiv.org/abs/2110.02861>`_, 2022 (the
    block-wise absmax idea). The LAMB16 proof of concept, vxst/LAMB16, 2024.
  """
  return _lamb16(
    learning_rate,
    b1,
    b2,
    eps,
    weight_decay,
    trust_scale,
    reference_lr,
    mask,
    block_size=float8.block_size_arg(block_size),
    stochastic_rounding=stochastic_rounding,
  )


_FLOAT8_STATES = (ScaleByLamb16State, ScaleByAdam16State)


def float8_health(state: optax.OptState, per_leaf: bool = False) -> dict[str, Any]:
  """How well the float8 moments of every `ScaleByLamb16State` and `ScaleByAdam16State` inside `state` hold up.

  Fractions of elements: ``mu_saturated``, m at the faithful encoder's ±15 clip (always 0 for the block-wise
  storage, which does not clip); ``mu_zero``, m stored as 0; ``nu_inf``, v overflowed to +inf (the faithful
  storage's overflow, see `optax_lamb16.float8`); ``nu_zero``, v stored as 0 (underflow, or never a gradient).
  The states may sit anywhere in an optax state (a chain, `inject_hyperparams`, `MultiSteps`, ...). Jittable.

  Args:
    state: An optimizer state containing one or more `ScaleByLamb16State` or `ScaleByAdam16State`.
    per_leaf: If True, each fraction is a list with one float32 per leaf (states in tree order, leaves in
      tree-flatten order); otherwise one float32 over all elements.

  Returns:
    A dict of the four fractions.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.lamb16(1e-3)
    >>> params = {"w": jnp.ones(1000)}
    >>> _, state = tx.update({"w": jnp.linspace(-1.0, 1.0, 1000)}, tx.init(params), params)
    >>> {k: round(float(v), 3) for k, v in optax_lamb16.float8_health(state).items()}
    {'mu_saturated': 0.736, 'mu_zero': 0.0, 'nu_inf': 0.0, 'nu_zero': 0.0}
  """
  found = [
    s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _FLOAT8_STATES)) if isinstance(s, _FLOAT8_STATES)
  ]
  if not found:
    raise ValueError(
      "`state` holds no float8 moments: pass the state of lamb16, lamb16_blockwise, adamw16 or a chain "
      "containing scale_by_lamb16, scale_by_lamb16_blockwise or scale_by_adam16."
    )
  leaves = [
    float8.health(mu, nu, blockwise=jnp.ndim(scale) == 1)
    for s in found
    for mu, nu, scale in zip(*(jax.tree.leaves(t) for t in (s.mu, s.nu, s.mu_scale)))
  ]
  names = ("mu_saturated", "mu_zero", "nu_inf", "nu_zero")
  if per_leaf:
    return {name: [leaf[name] for leaf in leaves] for name in names}
  sizes = [jnp.float32(mu.size) for s in found for mu in jax.tree.leaves(s.mu)]
  total = sum(sizes) if sizes else jnp.float32(1)
  return {name: sum(leaf[name] * size for leaf, size in zip(leaves, sizes)) / jnp.maximum(total, 1.0) for name in names}
