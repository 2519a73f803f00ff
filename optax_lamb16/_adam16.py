"""AdamW16: AdamW whose moments are stored in 8 bits each between steps (Algorithms section 8).

`scale_by_adam16` is `optax.scale_by_adam` (bias corrections, ``eps``, ``eps_root``, ``nesterov``) with m and v kept
in the block-wise float8 storage of `lamb16_blockwise` (the same functions of `optax_lamb16._float8`): one float32
scale per block of 256 elements per moment, m in float8_e4m3fn rounded to nearest, v in float8_e5m2 rounded
stochastically from a hash of (step, leaf, element). `adamw16` chains it with decoupled weight decay and the learning
rate, as `optax.adamw` chains `optax.scale_by_adam`. The storage was chosen on a synthetic gradient stream
(`benchmarks/adam16_storage.py`); the step is written in each leaf's own shape with no loop, so a leaf sharded by
`NamedSharding` is updated where it lies.
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


class ScaleByAdam16State(NamedTuple):
  """State of `scale_by_adam16`: about 2.03 bytes per parameter (blocks of 256).

  Attributes:
    count: int32 scalar, number of updates so far (for the bias corrections).
    mu: first moments, normalised per block, float8_e4m3fn, one leaf per parameter leaf.
    nu: second moments, normalised per block, float8_e5m2.
    mu_scale: float32 vector per leaf, one scale per block of the flattened leaf; ``m = float32(mu) * scale``.
    nu_scale: float32 vector per leaf; ``v = float32(nu) * scale``.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  mu_scale: optax.Updates
  nu_scale: optax.Updates


def _check_args(b1: Any, b2: Any, eps: Any, eps_root: Any) -> None:
  _checks.check_decay_rates(b1, b2, hint=_checks.LOW_PRECISION_HINT)
  _checks.check_range("eps", eps, 0.0, fix="Typical value: 1e-8 (added to the root of the second moment).")
  _checks.check_range("eps_root", eps_root, 0.0, fix="Typical value: 0 (added to the second moment under the root).")


def _leaf_direction(
  g, mu, nu, mu_scale, nu_scale, *, block_size, beta1, beta2, epsilon, epsilon_root, count, nesterov, rounding_key
):
  """One leaf: the moments from the stored ones and `g`, Adam's bias-corrected direction in g's dtype, and the moments
  stored again (section 8)."""
  if g.size == 0:  # no blocks, no scales to update
    return jnp.zeros_like(g), mu, nu, mu_scale, nu_scale
  grad = g.astype(jnp.float32)
  m = _common.moment_update(float8.block_decode(mu, mu_scale, block_size), grad, beta1)
  v = _common.moment_update(float8.block_decode(nu, nu_scale, block_size), grad, beta2, order=2)
  t = count + 1  # this update's number
  if nesterov:  # optax.scale_by_adam's: b1 m / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
    m_hat = beta1.rate * m / _common.bias_correction(beta1, t + 1) + beta1.complement * grad / _common.bias_correction(
      beta1, t
    )
  else:
    m_hat = m / _common.bias_correction(beta1, t)
  v_hat = v / _common.bias_correction(beta2, t)
  direction = m_hat / (jnp.sqrt(v_hat + epsilon_root) + epsilon)
  return (direction.astype(g.dtype), *float8.block_encode(m, v, block_size, rounding_key))


def _init_state(params: Any, block_size: int | jax.Array) -> ScaleByAdam16State:
  _checks.check_float_leaves("params", params)
  return ScaleByAdam16State(jnp.zeros([], jnp.int32), *float8.zero_moments(params, block_size))


def scale_by_adam16(
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  eps_root: optax.ScalarOrSchedule = 0.0,
  *,
  nesterov: bool = False,
  block_size: int | None = None,
  stochastic_rounding: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """`optax.scale_by_adam` with m and v stored in 8 bits each between steps (about 2.03 bytes per parameter).

  Per leaf: dequantize m and v from their block-wise float8 storage, update them with the float32 gradient, emit Adam's
  bias-corrected direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` (with ``nesterov``, optax's Nesterov momentum) in
  the gradient's dtype, and store the new m and v again: one float32 scale per block of `block_size` elements of the
  flattened leaf per moment, the block's largest magnitude of m at float8_e4m3fn's top (448) and its largest v at
  float8_e5m2's (57344), so nothing clips or overflows. All arithmetic is float32.

  Args:
    b1: Decay rate of the first moment, in [0, 1), or a schedule of the step count.
    b2: Decay rate of the second moment, in [0, 1), or a schedule.
    eps: Added to ``sqrt(v_hat)``; non-negative, or a schedule.
    eps_root: Added to ``v_hat`` under the root; non-negative, or a schedule.
    nesterov: Nesterov momentum, as `optax.scale_by_adam`'s.
    block_size: Elements per block of the scales; a positive int, or None for 256. It shapes the state (static;
      under `optax.inject_hyperparams` it is read back as `lamb16_blockwise` does). State: ``2 + 8 / block_size``
      bytes per parameter.
    stochastic_rounding: Store v rounded up or down at random with probability proportional to the distance (an
      unbiased rounding, Algorithms section 1b; the bits hash step, leaf and element, so no state and the same on
      every replica). On by default: rounded to nearest, a v declining by 0.1 % a step cannot follow before its
      block's largest element moves the scale (`benchmarks/adam16_storage.py` measures the difference).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ScaleByAdam16State`.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.scale_by_adam16()
    >>> state = tx.init({"w": jnp.zeros(3)})
    >>> state.mu["w"].dtype, state.nu["w"].dtype, state.mu_scale["w"].shape
    (dtype(float8_e4m3fn), dtype(float8_e5m2), (1,))
    >>> updates, state = tx.update({"w": jnp.array([1.0, -2.0, 0.5])}, state)
    >>> [round(u, 4) for u in updates["w"].tolist()]  # Adam's first step: sign(g)
    [1.0, -1.0, 1.0]

  References:
    Kingma and Ba, `Adam: A Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_, 2015. Dettmers et
    al., `8-bit Optimizers via Block-wise Quantization <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _check_args(b1, b2, eps, eps_root)
  stochastic_rounding = float8.check_stochastic_rounding(stochastic_rounding)
  if not isinstance(nesterov, bool):
    raise ValueError(f"`nesterov` must be True or False, got {nesterov!r}.")
  block_size = float8.block_size_arg(block_size)

  def update_fn(updates, state, params=None):
    del params
    _checks.check_update_leaves(updates, state.mu, "optimizer state (from init)")
    hyper = dict(
      beta1=_common.decay_at(b1, state.count),
      beta2=_common.decay_at(b2, state.count),
      epsilon=_common.value_at(eps, state.count),
      epsilon_root=_common.value_at(eps_root, state.count),
      count=state.count,
      nesterov=nesterov,
    )

    def step(index, g, p, *moments, block_size, rounding_key):
      del index, p
      return _leaf_direction(g, *moments, block_size=block_size, rounding_key=rounding_key, **hyper)

    directions, mu, nu, mu_scale, nu_scale = float8.map_leaves(step, updates, state, block_size, stochastic_rounding)
    return directions, ScaleByAdam16State(optax.safe_increment(state.count), mu, nu, mu_scale, nu_scale)

  return _common.extra_args_transform(functools.partial(_init_state, block_size=block_size), update_fn)


def adamw16(
  learning_rate: optax.ScalarOrSchedule,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  eps_root: optax.ScalarOrSchedule = 0.0,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  *,
  nesterov: bool = False,
  block_size: int | None = None,
  stochastic_rounding: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with 8-bit moments: `optax.adamw`'s maths at about 2.03 bytes of optimizer state per parameter (not 8).

  The chain ``optax.chain(scale_by_adam16(b1, b2, eps, eps_root, ...), add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))``, as `optax.adamw` is the chain of `optax.scale_by_adam`: the same
  arguments and defaults, with m and v stored block-wise in float8 between steps (`scale_by_adam16`). The last two
  blocks are optax's maths computed in float32 and rounded once to the updates' dtype, so bfloat16 params get
  bfloat16 updates also under `optax.inject_hyperparams`. Its state is the chain's tuple, the `ScaleByAdam16State`
  first.

  Args:
    learning_rate: A float or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to ``sqrt(v_hat)``.
    eps_root: Added to ``v_hat`` under the root.
    weight_decay: Decoupled weight decay, ``+ weight_decay * params`` before the learning rate.
    mask: Where weight decay applies: a pytree of booleans like the params (or a prefix, or a callable returning
      one), as in `optax.adamw`.
    nesterov: Nesterov momentum.
    block_size: Elements per block of the scales (None: 256).
    stochastic_rounding: Round v stochastically (the default) or to nearest.

  Every numeric hyperparameter may also be a schedule of the step count.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, optax_lamb16
    >>> params = {"w": jnp.array([1.0, -2.0, 3.0])}
    >>> tx = optax_lamb16.adamw16(learning_rate=0.1, weight_decay=0.0)
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> [round(p, 4) for p in optax.apply_updates(params, updates)["w"].tolist()]  # Adam: -lr * sign(g)
    [0.9, -1.9, 2.9]

  References:
    Loshchilov and Hutter, `Decoupled Weight Decay Regularization <https://arxiv.org/abs/1711.05101>`_, 2019.
  """
  return optax.chain(
    scale_by_adam16(
      b1, b2, eps, eps_root, nesterov=nesterov, block_size=block_size, stochastic_rounding=stochastic_rounding
    ),
    _common.add_decayed_weights(weight_decay, mask),
    _common.scale_by_learning_rate(learning_rate),
  )
