"""1-bit LAMB (Algorithms sections 2 and 6), faithful to DeepSpeed 0.19.6 ``onebit/lamb.py``.

Warm-up: LAMB (no bias correction) on the exact mean of the gradients, recording a running average of each leaf's
trust ratio (``lamb_coeff_freeze``). Compression: v is frozen; the momenta of all leaves, each scaled to a common
RMS, go through ONE error-feedback 1-bit compressed all-reduce; a fresh second moment is rebuilt from the averaged
momentum and each leaf's step is ``-lr * lamb_coeff_freeze * factor * u`` with a clipped, slowly moving ``factor``.

Each phase is its own function of the whole tree (`_warmup_phase`, `_compression_phase`) that runs only when due
(`_onebit.run_if`, on the step counter): the other phase's exchange and per-leaf maths are not computed. Both leave
each leaf's coefficient, and one pass takes the step from it.

Unlike 1-bit Adam, 1-bit LAMB does not decompose into a direction, then weight decay, then ``-learning_rate``: the
weight decay is inside the per-leaf coefficients (the warm-up trust ratio is ``||p|| / ||m/d + wd*p||``; during
compression the factor is blended with ``||m/d|| / ||m/d + wd*p||``), so the step is not a scaled sum of a decay-free
direction and ``wd * p``. `onebit_lamb` is therefore one transformation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, _common, _onebit, _rank_types
from optax_lamb16 import _compression as compression
from optax_lamb16 import comm as comm_lib


class OnebitLambState(NamedTuple):
  """State of `onebit_lamb`.

  Attributes:
    count: int32, DeepSpeed's step counter (1 after `init`; the first update runs with t = 2).
    mu: first moments (in the params' arithmetic dtype: float32, float64 for float64 params), identical on all ranks.
    nu: second moments (the same dtypes), frozen after `freeze_step`.
    nu_fresh: second moments rebuilt from the averaged momentum during compression.
    lamb_coeff_freeze: scalar per leaf (in its arithmetic dtype, as the three below), running average of the warm-up
      trust ratios.
    last_factor: scalar per leaf, the previous step's factor (1 at first).
    scaling_coeff: scalar per leaf, momentum scaling fixed at the first compression step (1 before; 0 for a leaf
      that had no momentum then).
    padding_tail: float32 (N_pad - N,), the padding positions of the previous exchange's output: DeepSpeed keeps
      one persistent padded buffer, so they feed the next worker scale. Identical on all ranks.
    exchange: the compressed all-reduce's error feedback: PER RANK.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_fresh: optax.Updates
  lamb_coeff_freeze: optax.Updates
  last_factor: optax.Updates
  scaling_coeff: optax.Updates
  padding_tail: jax.Array
  exchange: compression.CompressedAllReduceState

  # Replicated, but sized by the world size: reset with the error feedback on a world-size change (`checkpointing`).
  WORLD_SIZED_FIELDS = ("padding_tail",)


def _norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(x * x))


class _Hyper(NamedTuple):
  """The hyperparameters of one update, as the phases use them: arrays of the params' widest arithmetic dtype, or
  Python numbers."""

  lr: jax.Array
  b1: _common.Decay
  b2: _common.Decay
  eps: jax.Array
  weight_decay: jax.Array
  max_coeff: Any
  min_coeff: Any
  coeff_beta: Any
  factor_max: Any
  factor_min: Any
  factor_threshold: Any
  # Drop-in mode's bias corrections (Algorithms section 6b), None in faithful mode: m's, v's (frozen with v), v_fresh's
  # and that of the average trust ratio.
  m_correction: Any = None
  v_correction: Any = None
  fresh_correction: Any = None
  coeff_correction: Any = None

  def at(self, dtype: Any) -> _Hyper:
    """These hyperparameters for a leaf whose arithmetic runs in `dtype` (`_common.scalar_in`)."""
    return _Hyper(*(h.astype(dtype) if isinstance(h, _common.Decay) else _common.scalar_in(h, dtype) for h in self))

  @property
  def drop_in(self) -> bool:
    return self.m_correction is not None


def _corrected(x: jax.Array, correction: Any) -> jax.Array:
  """``x / correction`` (a bias correction of drop-in mode); `x` itself where there is none (faithful mode)."""
  return x if correction is None else x / correction


def onebit_lamb(
  learning_rate: optax.ScalarOrSchedule,
  *,
  comm: Any,
  freeze_step: int = 100000,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  max_coeff: float = 10.0,
  min_coeff: float = 0.01,
  coeff_beta: float = 0.9,
  factor_max: float = 4.0,
  factor_min: float = 0.5,
  factor_threshold: float = 0.1,
  momentum_mask: Any = None,
  mask_zero_variance: bool = False,
  mode: str = "faithful",
) -> optax.GradientTransformationExtraArgs:
  """1-bit LAMB: LAMB whose momentum is averaged with one 1-bit compressed exchange per step after a warm-up.

  Takes each rank's LOCAL gradients. Parameters stay bitwise identical on all ranks. Not a chain: see the module
  docstring.

  One guard DeepSpeed lacks: a leaf whose momentum is exactly zero at the freeze (it never had a gradient, or is
  empty) would get the scaling coefficient ``mean_rms / 0 = inf`` there. Here it gets 0 and its averaged momentum
  stays 0 (as under a momentum mask): the 1-bit exchange would otherwise hand it sign noise that, divided by its
  zero v, blows the parameter up. Such a leaf then moves only by weight decay.

  Args:
    learning_rate: Non-negative float or schedule (evaluated at the number of updates so far).
    comm: Mesh-axis name, mpi4py communicator, None (one device) or a `comm.Communicator`.
    freeze_step: Last warm-up step in DeepSpeed's counting (``F - 1`` warm-up updates, compression from
      t = F + 1), at least 2.
    b1: First-moment decay, in [0, 1).
    b2: Second-moment decay, in [0, 1).
    eps: Added to ``sqrt(v)``.
    weight_decay: Added as ``weight_decay * params`` to the Adam direction, inside the trust ratio.
    max_coeff: Upper clip of the warm-up trust ratio.
    min_coeff: Lower clip of the warm-up trust ratio (<= max_coeff).
    coeff_beta: Decay of the running average of the trust ratio, in [0, 1).
    factor_max: Upper clip of the compression-phase factor.
    factor_min: Lower clip of the factor (<= factor_max).
    factor_threshold: Largest relative change of the factor from one step to the next, in [0, 1].
    momentum_mask: Optional pytree like params of 0/1 arrays applied after each compressed exchange.
    mask_zero_variance: Not in DeepSpeed (default False, faithful): after each compressed exchange, also zero the
      momentum where the frozen v is exactly 0 (elements that never had a gradient, which the exchange would hand
      sign noise).
    mode: ``"faithful"`` (default): DeepSpeed's rule. ``"drop_in"``: `optax.lamb`'s rule in the warm-up (Adam's bias
      corrections; the trust ratio still clipped to [min_coeff, max_coeff]: pass 0 and ``float("inf")`` for
      optax's unclipped one) and, after the freeze, the bias-corrected frozen v and average trust ratio (Algorithms
      section 6b), for LAMB's learning rate. Static.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `OnebitLambState`. Its updates have the gradients'
    dtype (computed in float32, or in float64 for float64 params, rounded once); the compressed exchange is float32
    for every dtype.

  Choosing the hyperparameters: the trust ratio rescales each leaf's step to ``lr * ||p||`` (within the clip), and
  the bias corrections that the faithful mode lacks scale a leaf's ``m / (sqrt(v) + eps)`` by one number, which the
  ratio cancels (up to eps and the weight decay's share), so the warm-up needs no learning-rate factor, unlike
  1-bit Adam's. Its frozen trust ratio, though, is DeepSpeed's running average started from 0 without correction:
  ``1 - coeff_beta**(freeze_step - 1)`` of the average (0.65 for a freeze at t = 11), so freeze after at least 45
  warm-up updates (then within 1 %), or use ``mode="drop_in"``, which corrects it.

  Static under `optax.inject_hyperparams`: `comm`, `freeze_step` and the string `mode`; the numeric hyperparameters
  may be injected, and ``learning_rate, b1, b2, eps, weight_decay`` may be schedules (which see the number of
  updates so far).

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> params = {"w": jnp.array([3.0, 4.0])}
    >>> tx = optax_lamb16.onebit_lamb(1e-2, comm=None, freeze_step=10)
    >>> updates, state = tx.update({"w": jnp.array([1.0, 1.0])}, tx.init(params), params)
    >>> [round(u, 4) for u in updates["w"].tolist()]  # trust ratio |p| / |u| = 5 / (3.162 * sqrt(2)) = 1.118
    [-0.0354, -0.0354]

  References:
    Li et al., `1-bit LAMB: Communication Efficient Large-Scale Large-Batch Training with LAMB's Convergence Speed
    <https://arxiv.org/abs/2104.06069>`_, 2021; DeepSpeed 0.19.6 ``deepspeed/runtime/fp16/onebit/lamb.py``.
  """
  communicator = _onebit.check_common(learning_rate, comm, b1, b2, eps, weight_decay)
  freeze_step = _onebit.check_freeze_step(freeze_step)
  drop_in = _onebit.check_mode(mode) == "drop_in"
  _checks.check_range("min_coeff", min_coeff, 0.0, fix="DeepSpeed's default: 0.01.")
  _checks.check_range("max_coeff", max_coeff, 0.0, fix="DeepSpeed's default: 10.0.")
  _checks.check_range("factor_min", factor_min, 0.0, fix="DeepSpeed's default: 0.5.")
  _checks.check_range("factor_max", factor_max, 0.0, fix="DeepSpeed's default: 4.0.")
  _checks.check_range("coeff_beta", coeff_beta, 0.0, 1.0, high_open=True, fix="DeepSpeed's default: 0.9.")
  _checks.check_range("factor_threshold", factor_threshold, 0.0, 1.0, fix="DeepSpeed's default: 0.1.")
  _checks.check_order(
    "min_coeff",
    min_coeff,
    "max_coeff",
    max_coeff,
    fix="They bound the trust ratio: pass min_coeff <= max_coeff (defaults 0.01 and 10.0).",
  )
  _checks.check_order(
    "factor_min",
    factor_min,
    "factor_max",
    factor_max,
    fix="They bound the compression-phase factor: pass factor_min <= factor_max (defaults 0.5, 4.0).",
  )

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    # Every float leaf varies over the axes the params vary over besides the data axis (e.g. "model").
    axes = _rank_types.other_axes(communicator, params)
    full = lambda shape, value, dtype=jnp.float32: _rank_types.mark_varying(jnp.full(shape, value, dtype), axes)
    scalars = lambda value: jax.tree.map(lambda p: full([], value, _common.arithmetic_dtype(p.dtype)), params)
    zeros = lambda: _onebit.zeros_like(params, communicator)
    n = compression.tree_size(params)
    return OnebitLambState(
      count=_onebit.initial_count(),
      mu=zeros(),
      nu=zeros(),
      nu_fresh=zeros(),
      lamb_coeff_freeze=scalars(0.0),
      last_factor=scalars(1.0),
      scaling_coeff=scalars(1.0),
      padding_tail=full([_padding(n, communicator)], 0.0),
      exchange=compression.init_compressed_allreduce(params, communicator),
    )

  def update_fn(updates, state, params=None):
    grads, params, world = _onebit.checked_inputs(updates, state, params, communicator)
    n = compression.tree_size(grads)
    tail = _padding(n, communicator)
    if state.padding_tail.shape != (tail,):
      raise ValueError(
        f"`padding_tail` of the optimizer state has shape {state.padding_tail.shape}, but world size "
        f"{world} needs ({tail},): the state was made for another world size. Re-create it with "
        f"`init` where `comm` spans the current ranks."
      )
    t = _onebit.next_count(state.count)
    dtype = _common.widest_arithmetic_dtype(state.nu)
    lr, epsilon, decay = _onebit.hyperparameters_at(state.count, learning_rate, eps, weight_decay, dtype=dtype)
    beta1, beta2 = _onebit.decays_at(state.count, b1, b2, dtype=dtype)
    corrections = ()
    if drop_in:  # Algorithms section 6b: v's correction frozen with v, v_fresh's continuing, the trust ratios' average
      corrections = (
        _common.bias_correction(beta1, t - 1),
        _common.bias_correction(beta2, jnp.minimum(t, freeze_step) - 1),
        _common.bias_correction(beta2, t - 1),
        _common.bias_correction(*_onebit.decays_at(state.count, coeff_beta, dtype=dtype), freeze_step - 1),
      )
    hyper = _Hyper(
      lr,
      beta1,
      beta2,
      epsilon,
      decay,
      max_coeff,
      min_coeff,
      coeff_beta,
      factor_max,
      factor_min,
      factor_threshold,
      *corrections,
    )
    # Each phase runs only when due (`_onebit.run_if`), updating the state it changes in place, and leaves each
    # leaf's coefficient c: the step is ``-lr * c * (m / d + wd * p)`` in both phases, taken in one pass below.
    warm = t <= freeze_step
    (grads, params), (mu, nu, nu_fresh, coeff_freeze, coefficient) = _onebit.run_if(
      warm,
      lambda inputs, carry: _warmup_phase(*inputs, *carry[:4], t, freeze_step, hyper, communicator),
      (grads, params),
      (state.mu, state.nu, state.nu_fresh, state.lamb_coeff_freeze, jax.tree.map(jnp.zeros_like, state.last_factor)),
    )
    (grads, params, nu), (mu, nu_fresh, last_factor, scaling, padding_tail, exchange, coefficient) = _onebit.run_if(
      jnp.logical_not(warm),
      lambda inputs, carry: _compression_phase(
        *inputs, *carry[:6], coeff_freeze, t, freeze_step, hyper, communicator, world, momentum_mask, mask_zero_variance
      ),
      (grads, params, nu),
      (mu, nu_fresh, state.last_factor, state.scaling_coeff, state.padding_tail, state.exchange, coefficient),
    )
    steps = jax.tree.map(
      lambda c, m, v, p, g: (-hyper.lr.astype(m.dtype) * c * _adam_update(m, v, p, hyper)[2]).astype(g.dtype),
      coefficient,
      mu,
      nu,
      params,
      updates,
    )
    return steps, OnebitLambState(
      count=t,
      mu=mu,
      nu=nu,
      nu_fresh=nu_fresh,
      lamb_coeff_freeze=coeff_freeze,
      last_factor=last_factor,
      scaling_coeff=scaling,
      padding_tail=padding_tail,
      exchange=exchange,
    )

  return _common.extra_args_transform(init_fn, update_fn)


def _padding(n: int, communicator: comm_lib.Communicator) -> int:
  """Length of the padding the compressed exchange appends to `n` elements (the `padding_tail`)."""
  world = comm_lib.world_size(communicator)
  return compression.padded_length(n, world, comm_lib.ranks_per_host(communicator)) - n


def _adam_update(m: jax.Array, v: jax.Array, p: jax.Array, hyper: _Hyper) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``d = sqrt(v) + eps``, the direction ``m / d`` and the update ``m / d + wd * p`` of one leaf."""
  hyper = hyper.at(m.dtype)
  denominator = jnp.sqrt(_corrected(v, hyper.v_correction)) + hyper.eps
  direction = _corrected(m, hyper.m_correction) / denominator
  return denominator, direction, direction + hyper.weight_decay * p


def _warmup_phase(
  grads: Any,
  params: Any,
  mu: Any,
  nu: Any,
  nu_fresh: Any,
  coeff_freeze: Any,
  t: jax.Array,
  freeze_step: Any,
  hyper: _Hyper,
  communicator: comm_lib.Communicator,
) -> tuple[Any, ...]:
  """``t <= freeze_step``: LAMB's moments from the exact mean of the gradients, each leaf's trust ratio (its step's
  coefficient) and the running average of the trust ratios. Returns (mu, nu, nu_fresh, coeff_freeze, trust)."""
  mu, nu = _onebit.warmup_moments(grads, mu, nu, hyper.b1, hyper.b2, communicator)

  def leaf(m, v, v_fresh, p, coeff_freeze):
    hyper_ = hyper.at(m.dtype)
    _, _, update = _adam_update(m, v, p, hyper_)
    update_norm, param_norm = _norm(update), _norm(p)
    trust = jnp.where(
      (param_norm > 0) & (update_norm > 0), jnp.clip(param_norm / update_norm, hyper_.min_coeff, hyper_.max_coeff), 1.0
    )
    averaged = hyper_.coeff_beta * coeff_freeze + (1 - hyper_.coeff_beta) * trust
    # DeepSpeed averages only the ratios that differ from 1; drop-in mode every ratio the warm-up applies.
    coeff_freeze = averaged if hyper_.drop_in else jnp.where(trust != 1.0, averaged, coeff_freeze)
    return jnp.where(t == freeze_step, v, v_fresh), coeff_freeze, trust

  return mu, nu, *_common.unzip(mu, jax.tree.map(leaf, mu, nu, nu_fresh, params, coeff_freeze), 3)


def _compression_phase(
  grads: Any,
  params: Any,
  nu: Any,
  mu: Any,
  nu_fresh: Any,
  last_factor: Any,
  scaling: Any,
  padding_tail: jax.Array,
  exchange: compression.CompressedAllReduceState,
  coeff_freeze: Any,
  t: jax.Array,
  freeze_step: Any,
  hyper: _Hyper,
  communicator: comm_lib.Communicator,
  world: int,
  momentum_mask: Any,
  mask_zero_variance: bool,
) -> tuple[Any, ...]:
  """``t > freeze_step``: the scaled momenta of all leaves in one compressed exchange (v frozen), a fresh second
  moment rebuilt from the averaged momentum, and the bounded factor. Returns (mu, nu_fresh, last_factor, scaling,
  padding_tail, exchange, coefficient), the coefficient of each leaf's step being ``coeff_freeze * factor``."""
  # At the first compression step, scale every leaf's momentum to the mean RMS of all leaves. A leaf with no momentum
  # then (never had a gradient, or empty) gets scaling 0, not DeepSpeed's mean_rms / 0 = inf: it is sent as zeros
  # and its averaged momentum is kept at 0, as a momentum mask would.
  rms = jax.tree.map(lambda m: _norm(m) / jnp.sqrt(jnp.asarray(max(m.size, 1), m.dtype)), mu)
  rms_leaves = [r.astype(hyper.lr.dtype) for r in jax.tree.leaves(rms)]  # summed in the widest dtype
  mean_rms = sum(rms_leaves) / len(rms_leaves) if rms_leaves else jnp.ones([], hyper.lr.dtype)
  scaling = jax.tree.map(
    lambda r, s: jnp.where(t == freeze_step + 1, jnp.where(r > 0, mean_rms.astype(r.dtype) / r, 0.0), s), rms, scaling
  )
  # One exchange of the whole model, followed by the padding tail the previous exchange left (Algorithms section 6).
  scaled = jax.tree.map(lambda m, g, s: _common.moment_update(m, g, hyper.b1) * s, mu, grads, scaling)
  if world == 1:  # the exchange is the identity and there is no tail: leaf by leaf (typed replicated on a mesh axis)
    averaged, exchange = compression.compressed_allreduce(scaled, exchange, communicator)
  else:
    buffer = jnp.concatenate([compression.flatten(scaled), padding_tail])
    payload, exchange = compression.exchange_flat(buffer, exchange, communicator)
    averaged, padding_tail = compression.decode_like(payload, (scaled, padding_tail))
  mu_prev, mu = mu, jax.tree.map(lambda m, s: jnp.where(s > 0, m / s, 0.0), averaged, scaling)
  mu = _onebit.apply_mask(mu, momentum_mask, nu, mask_zero_variance)

  def leaf(m, m_prev, v, v_fresh, p, coeff_freeze, last_factor):
    hyper_ = hyper.at(m.dtype)
    denominator, direction, update = _adam_update(m, v, p, hyper_)
    rebuilt = (m - hyper_.b1.rate * m_prev) / hyper_.b1.complement
    v_fresh = _common.moment_update(v_fresh, rebuilt, hyper_.b2, order=2)
    ratios = denominator / (jnp.sqrt(_corrected(v_fresh, hyper_.fresh_correction)) + hyper_.eps)
    factor = jnp.max(ratios) if ratios.size else jnp.ones([], m.dtype)
    update_norm = _norm(update)
    blend = jnp.where(update_norm > 0, jnp.minimum(1.0, _norm(direction) / update_norm), 1.0)
    factor = jnp.where(hyper_.weight_decay > 0, factor * blend + (1 - blend), factor)
    factor = jnp.clip(factor, hyper_.factor_min, hyper_.factor_max)
    factor = jnp.clip(factor, last_factor * (1 - hyper_.factor_threshold), last_factor * (1 + hyper_.factor_threshold))
    return v_fresh, factor, _corrected(coeff_freeze, hyper_.coeff_correction) * factor

  nu_fresh, last_factor, coefficient = _common.unzip(
    mu, jax.tree.map(leaf, mu, mu_prev, nu, nu_fresh, params, coeff_freeze, last_factor), 3
  )
  return mu, nu_fresh, last_factor, scaling, padding_tail, exchange, coefficient
