"""0/1 Adam (Algorithms sections 2 and 5), faithful to DeepSpeed 0.19.6 ``onebit/zoadam.py``.

Before the variance freeze, v is updated only on steps ``t % var_interval == 0`` (exact all-reduce of the gradients;
the interval doubles every `var_update_scaler` such steps) and the other steps average the gradients with the 1-bit
compressed all-reduce. After the freeze each rank takes local steps without communicating, accumulating its update,
and every `local_step_interval` steps (doubling up to `local_step_clipper`) the ranks sync with one compressed
exchange of the accumulated update. Between syncs the parameters differ per rank; they agree again at each sync up
to float32 rounding.

Unlike 1-bit Adam, 0/1 Adam does not decompose into a direction followed by weight decay and ``-learning_rate``:
the learning rate enters the state (the accumulated update ``u`` sums ``-lr * delta``, ``lr_sum`` sums lr, and a
sync sets ``m = -w / lr_sum``), and a sync step rewrites the parameters themselves (``p = p_prev + w / (sqrt(v) +
eps)``), so its update is the difference of two parameter vectors, not a scaled direction. `zero_one_adam` is
therefore one transformation; its moment EMAs, warm-up exchange and masks are the ones the other two share.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, _common, _onebit, _rank_types
from optax_lamb16 import _compression as compression


class ZeroOneAdamState(NamedTuple):
  """State of `zero_one_adam`.

  Attributes:
    count: int32, DeepSpeed's step counter (1 after `init`; the first update runs with t = 2).
    mu: first moments (in the params' arithmetic dtype: float32, float64 for float64 params): PER RANK after the
      freeze (local steps), identical on all ranks before. Like every per-rank leaf, laid out at least 1-d: the
      moment of a 0-d parameter has shape (1,).
    nu: second moments (the same dtypes), identical on all ranks, frozen after `var_freeze_step`.
    accumulated_update: PER RANK, the sum of this rank's updates since the last sync (``u``); at least 1-d too.
      While `lr_sum` is 0 it counts as 0: a sync leaves it as it was (zeroed lazily, which spares XLA a copy of the
      whole buffer every step), so read it as ``where(lr_sum > 0, u, 0)``.
    lr_sum: the sum of the learning rates since the last sync (float32, float64 if a param is float64).
    var_interval: int32, v is updated on steps t with ``t % var_interval == 0`` (1 at first).
    var_counter: int32, variance updates since the interval last doubled.
    local_step_interval: int32, ranks sync on steps t with ``t % local_step_interval == 0`` (1 at first).
    local_step_counter: int32, local steps since the interval last doubled.
    frozen: bool, whether v is frozen (the local-step phase).
    exchange: the compressed all-reduce's error feedback: PER RANK.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  accumulated_update: optax.Updates
  lr_sum: jax.Array
  var_interval: jax.Array
  var_counter: jax.Array
  local_step_interval: jax.Array
  local_step_counter: jax.Array
  frozen: jax.Array
  exchange: compression.CompressedAllReduceState

  PER_RANK_FIELDS = ("mu", "accumulated_update", "exchange")
  # The params themselves differ per rank between syncs (`optax_lamb16.data_parallel` keeps one copy per rank).
  PARAMS_PER_RANK = True


VAR_FREEZE_FIX = (
  "Pass a non-negative int; it counts steps as DeepSpeed does (Algorithms section 2): v freezes at the end of the "
  "first update with t > var_freeze_step, and the first update (t = 2) is a variance update, so 0 and 1 both give "
  "exactly one variance update before the local steps."
)


def zero_one_adam(
  learning_rate: optax.ScalarOrSchedule,
  *,
  comm: Any,
  b1: optax.ScalarOrSchedule = 0.9,
  b2: optax.ScalarOrSchedule = 0.999,
  eps: optax.ScalarOrSchedule = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  var_freeze_step: int = 100000,
  var_update_scaler: int = 16,
  local_step_scaler: int = 32678,
  local_step_clipper: int = 16,
  momentum_mask: Any = None,
  mask_zero_variance: bool = False,
  mode: str = "faithful",
) -> optax.GradientTransformationExtraArgs:
  """0/1 Adam: adaptive variance-update intervals, then local steps with 1-bit synchronisation.

  Takes each rank's LOCAL gradients. Communication per step: on variance steps one exact all-reduce; on the other
  pre-freeze steps one compressed exchange of the gradients; after the freeze one compressed exchange on sync steps
  and nothing at all on local steps. Each phase runs inside the jitted update only when the state's
  counters say so (a loop of 0 or 1 trips), so the skipped collectives really are skipped.

  The parameters become per rank between syncs: inside `shard_map`, carry them with spec ``P(axis)`` (one copy per
  rank), not ``P()``; `state_partition_specs` gives the state's specs. Not a chain: see the module docstring.

  Args:
    learning_rate: Non-negative float or schedule (evaluated at the number of updates so far).
    comm: Mesh-axis name, mpi4py communicator, None (one device) or a `comm.Communicator`.
    b1: First-moment decay, in [0, 1).
    b2: Second-moment decay, in [0, 1).
    eps: Added to ``sqrt(v)``.
    weight_decay: Added as ``weight_decay * params`` to the Adam direction.
    var_freeze_step: v freezes at the end of the first step with ``t > var_freeze_step`` (DeepSpeed's count, Algorithms
      section 2). The first update is always a variance update, so 0 and 1 (one variance update) are valid.
    var_update_scaler: Number of variance updates after which the variance interval doubles (>= 1).
    local_step_scaler: Number of local steps after which the sync interval doubles (>= 1; DeepSpeed's default
      32678 is kept as it is).
    local_step_clipper: Largest sync interval (>= 1).
    momentum_mask: Optional pytree like params of 0/1 arrays applied after each compressed exchange.
    mask_zero_variance: Not in DeepSpeed (default False, faithful): after each compressed exchange, also zero the
      result where v is exactly 0 (elements that never had a gradient, which the exchange would hand sign noise).
    mode: ``"faithful"`` (default): DeepSpeed's rule, no bias correction. ``"drop_in"``: Adam's bias corrections,
      v's counting its sparse variance updates, and the sync's reconstructed momentum consistent with them (Algorithms
      section 6b), for Adam's learning rate. Static.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ZeroOneAdamState`. Its updates have the
    gradients' dtype (computed in float32, or in float64 for float64 params, rounded once); the compressed
    exchanges are float32 for every dtype.

  Choosing the hyperparameters (byte-level transformer, 4 ranks, global batch 32, 500 steps, var_freeze_step 100;
  exact data-parallel `optax.adam`: 2.64 bits/byte at lr 1e-3 with a warm-up): the faithful mode at lr 3e-4 ended
  23 % behind Adam with DeepSpeed's schedules and 29-42 % behind with local steps every few syncs. Why, and what
  keeps it on course:

  - v from few, sparse updates without bias correction. With var_update_scaler 16 the variance interval doubles
    every 16 variance updates, so v gets only 45 updates in the first 100 steps (t = 2..17, every 2nd step to
    t = 48, every 4th to t = 100): ``1 - b2**45 = 0.044`` of the true second moment, and every step after the freeze
    is ``1 / sqrt(0.044) = 4.8`` x Adam's at the same lr (1-bit Adam's v, frozen after 99 updates: 3.3 x), i.e.
    1.46 x the faithful 1-bit Adam's steps for the whole rest of the run. Use ``mode="drop_in"`` (v
    corrected by its own update count, m by the step count: Adam's step sizes at Adam's learning rate), or in the
    faithful mode about 1/5 of Adam's learning rate with a warm-up and a decaying schedule.
  - Sparse variance updates estimate v from fewer gradients, and the steps between them feed m the 1-bit
    compressed gradient. Setting ``var_update_scaler >= var_freeze_step`` makes every step before the freeze a
    variance step (an exact all-reduce, as in 1-bit Adam's warm-up). Measured in drop-in mode at lr 1e-3 with a
    warm-up and cosine decay: 3.13 bits/byte with var_update_scaler 16, 3.00 with 1000 (one seed). Cost in bytes,
    per rank, N parameters, P ranks: each such step sends ``2 (P-1)/P * 4 N`` instead of the compressed
    ``2 (P-1)/P * N / 8``; for var_freeze_step 100 that is 55 more exact steps: 4 ranks, 0.88M parameters, 500
    steps: 0.31 GB -> 0.59 GB per rank (1-bit Adam: 0.59 GB). Both still trail exact Adam (2.64) by 14-19 % in
    that run: the local-step phase (below) is what remains.
  - Local steps with stale momentum: between syncs each rank's m follows its own gradients (1/P of the batch) and a
    sync resets it to the lr-weighted average ``-w / lr_sum`` of the interval. With DeepSpeed's local_step_scaler
    (32678) the interval stays 1 for 32678 steps: a sync every step, no local steps at all in runs shorter than that.
    Lowering it (intervals up to local_step_clipper) saved little here (the syncs after the freeze are 1-bit: 0.07
    GB of the 0.31 GB above) and cost 6-19 points more, so keep the default unless communication after the freeze
    dominates.
  - The loss rising over the last 100 steps of the constant-lr run is the large steps above without a decaying
    learning rate: use a schedule that decays (warm-up and cosine).

  Static under `optax.inject_hyperparams`: `comm` and the four integer schedule arguments; numeric
  ``learning_rate, b1, b2, eps, weight_decay`` may be injected or be schedules (which see the number of updates so
  far).

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> tx = optax_lamb16.zero_one_adam(1e-2, comm=None, var_freeze_step=4, mode="drop_in")
    >>> state = tx.init(params)
    >>> for _ in range(4):
    ...   updates, state = tx.update({"w": jnp.array([0.5, -0.5])}, state, params)
    >>> bool(state.frozen), int(state.var_interval)
    (True, 1)

  References:
    Lu et al., `Maximizing Communication Efficiency for Large-scale Training via 0/1 Adam
    <https://arxiv.org/abs/2202.06009>`_, 2022; DeepSpeed 0.19.6 ``deepspeed/runtime/fp16/onebit/zoadam.py``.
  """
  communicator = _onebit.check_common(learning_rate, comm, b1, b2, eps, weight_decay)
  drop_in = _onebit.check_mode(mode) == "drop_in"
  _onebit.warn_if_large_first_steps("zero_one_adam", learning_rate, b1, b2, mode)
  var_freeze_step = _checks.check_step_count("var_freeze_step", var_freeze_step, 0, fix=VAR_FREEZE_FIX)
  var_update_scaler, local_step_scaler, local_step_clipper = (
    _checks.check_step_count(name, value, 1, fix=f"Pass a positive int (DeepSpeed's default: {default}).")
    for name, value, default in (
      ("var_update_scaler", var_update_scaler, 16),
      ("local_step_scaler", local_step_scaler, 32678),
      ("local_step_clipper", local_step_clipper, 16),
    )
  )
  # Per-rank leaves: marked varying for shard_map, at least 1-d (see `_onebit.to_per_rank_layout`).
  per_rank = lambda tree: jax.tree.map(lambda x: _rank_types.mark_per_rank(communicator, x), tree)
  no_weight_decay = _common.is_static_zero(weight_decay)
  store = lambda tree: _onebit.to_per_rank_layout(per_rank(tree))

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    zeros = lambda: _onebit.zeros_like(params, communicator)
    # Every leaf its own buffer, so that the whole state can be donated to a jitted step.
    return ZeroOneAdamState(
      count=_onebit.initial_count(),
      mu=store(zeros()),
      nu=zeros(),
      accumulated_update=store(zeros()),
      lr_sum=jnp.zeros([], _common.widest_arithmetic_dtype(params)),
      var_interval=jnp.ones([], jnp.int32),
      var_counter=jnp.zeros([], jnp.int32),
      local_step_interval=jnp.ones([], jnp.int32),
      local_step_counter=jnp.zeros([], jnp.int32),
      frozen=jnp.zeros([], jnp.bool_),
      exchange=compression.init_compressed_allreduce(params, communicator),
    )

  def update_fn(updates, state, params=None):
    _rank_types.check_per_rank_params(communicator, params)
    grads, params, _ = _onebit.checked_inputs(updates, state, params, communicator)
    t = _onebit.next_count(state.count)
    dtype = state.lr_sum.dtype  # the widest arithmetic dtype of the params: every scalar below, cast to each leaf's
    beta1, beta2 = _onebit.decays_at(state.count, b1, b2, dtype=dtype)
    epsilon, decay, lr = _onebit.hyperparameters_at(state.count, eps, weight_decay, learning_rate, dtype=dtype)
    at = lambda scalar, x: scalar.astype(x.dtype)
    frozen = state.frozen
    mu_before = _onebit.from_per_rank_layout(state.mu, params)
    accumulated_before = _onebit.from_per_rank_layout(state.accumulated_update, params)
    variance_due = jnp.logical_and(jnp.logical_not(frozen), t % state.var_interval == 0)
    compressed_due = jnp.logical_not(jnp.logical_or(frozen, variance_due))
    # v freezes at the end of the first step past var_freeze_step.
    freezes = jnp.logical_and(jnp.logical_not(frozen), t > var_freeze_step)

    # Each exchange runs only in its phase (`_onebit.run_if`) and updates its carry in place; the compressed ones
    # hand out sign payloads that the step's single pass at the end decodes. A variance step: the exact mean of the
    # gradients updates m and v.
    grads, (mu, nu) = _onebit.run_if(
      variance_due,
      lambda grads, moments: _onebit.warmup_moments(grads, *moments, beta1, beta2, communicator),
      grads,
      (mu_before, state.nu),
    )
    # A compressed step (before the freeze): the compressed mean of the gradients.
    grads, (compressed, exchange) = _onebit.run_if(
      compressed_due,
      lambda grads, carry: compression.exchange(grads, carry[1], communicator),
      grads,
      (_onebit.skipped_exchange(grads, communicator), state.exchange),
    )
    # The error buffers change meaning at the freeze: reset them, once.
    _, exchange = _onebit.run_if(freezes, lambda _, buffers: jax.tree.map(jnp.zeros_like, buffers), (), exchange)

    # The Adam step on this rank's params, from its direction ``m / (sqrt(v) + eps)``.
    denominators_of = lambda nu: jax.tree.map(lambda v: jnp.sqrt(v) + at(epsilon, v), nu)

    def adam_step(directions, params):
      if no_weight_decay:  # then the step does not read the params: XLA can update them in place
        return jax.tree.map(lambda r: -at(lr, r) * r, directions)
      return jax.tree.map(lambda r, p: -at(lr, r) * (r + at(decay, p) * p), directions, params)

    lr_sum = jnp.where(frozen, state.lr_sum + lr, state.lr_sum)

    # Interval schedules, with the phase this step runs in.
    var_counter, var_interval = _count_towards(
      state.var_counter, state.var_interval, variance_due, var_update_scaler, lambda interval: interval * 2
    )
    local_counter, local_interval = _count_towards(
      state.local_step_counter,
      state.local_step_interval,
      frozen,
      local_step_scaler,
      lambda interval: jnp.minimum(local_step_clipper, interval * 2),
    )
    if drop_in:  # m's correction counts every update, v's only its variance updates, this step's included
      variance_updates = (var_update_scaler * (31 - jax.lax.clz(var_interval))).astype(dtype) + var_counter.astype(
        dtype
      )
      c1, c2 = _common.bias_correction(beta1, t - 1), _common.bias_correction(beta2, variance_updates)
      denominators_of = lambda nu: jax.tree.map(lambda v: jnp.sqrt(v / at(c2, v)) + at(epsilon, v), nu)
      corrected = lambda m: m / at(c1, m)
    else:
      corrected = lambda m: m

    # A sync sends this rank's accumulated update, this step's local step included, times sqrt(v) + eps, in one
    # compressed exchange; its payload takes the place of the pre-freeze exchange's, which is never due with it. Only
    # the exchange's input is computed here: the pass at the end does the rest of the step.
    def sync_exchange(inputs, carry):
      grads, mu, nu, params, accumulated = inputs
      denominators = denominators_of(nu)
      steps = adam_step(
        jax.tree.map(lambda m, d: corrected(m) / d, _common.tree_moment_update(mu, grads, beta1), denominators), params
      )
      sent = jax.tree.map(lambda u, s, d: (u + s) * d, _current(accumulated, state.lr_sum), steps, denominators)
      return compression.exchange(sent, carry[1], communicator)

    sync_due = jnp.logical_and(frozen, t % state.local_step_interval == 0)
    (grads, mu, nu, params, accumulated), (compressed, exchange) = _onebit.run_if(
      sync_due, sync_exchange, (grads, mu, nu, params, accumulated_before), (compressed, exchange)
    )

    # One pass over the leaves. The moment: a variance step keeps its m; before the freeze the other steps add the
    # compressed mean, after it this rank's own gradients (a local step, and a sync's fallback below).
    mean = _onebit.apply_mask(compression.decode_like(compressed, grads), momentum_mask, nu, mask_zero_variance)
    source = jax.tree.map(lambda g, m: jnp.where(frozen, g, m), grads, mean)
    mu = jax.tree.map(lambda m, s: jnp.where(variance_due, m, _common.moment_update(m, s, beta1)), mu, source)
    # A sync: ``m = -w / lr_sum`` (DeepSpeed divides unguarded; with a zero learning rate since the last sync, keep m),
    # the bias-corrected m in drop-in mode, stored uncorrected.
    reconstructed = (lambda w: (-w / at(lr_sum, w)) * at(c1, w)) if drop_in else (lambda w: -w / at(lr_sum, w))
    mu = per_rank(
      jax.tree.map(lambda w, m: jnp.where(jnp.logical_and(sync_due, lr_sum > 0), reconstructed(w), m), mean, mu)
    )
    # One division per element serves every phase: a sync's ``w / (sqrt(v) + eps)``, with w read back from the new m
    # as ``-m * lr_sum`` (within an ulp of w; 0 where lr_sum is 0, so that a sync after a zero learning rate moves
    # nothing), and the Adam direction otherwise. Read from m, w is decoded from its sign bits once per step, not twice.
    directions = jax.tree.map(
      lambda m, d: jnp.where(sync_due, -corrected(m) * at(lr_sum, m), corrected(m)) / d, mu, denominators_of(nu)
    )
    steps = adam_step(directions, params)
    # A sync leaves `accumulated` as it is and sets lr_sum to 0, which makes the buffer count as 0 from the next step
    # on. (Each donated buffer's old value must be read by the one pass that overwrites it, and every other pass read
    # its new value: XLA copies the whole buffer otherwise, every step.)
    accumulated_now = _current(accumulated, state.lr_sum)
    accumulated = per_rank(
      jax.tree.map(
        lambda u, s, c: jnp.where(sync_due, u, jnp.where(frozen, c + s, c)), accumulated, steps, accumulated_now
      )
    )
    # A sync's params: those at the last sync (this rank's params less its accumulated update, which the sync left
    # in place) plus w / (sqrt(v) + eps).
    new_updates = jax.tree.map(
      lambda p, u, r, s, g: jnp.where(sync_due, ((p - u) + r) - p, (p + s) - p).astype(g.dtype),
      params,
      _current(accumulated, state.lr_sum),
      directions,
      steps,
      updates,
    )
    lr_sum = jnp.where(sync_due, 0.0, lr_sum)
    return new_updates, ZeroOneAdamState(
      count=t,
      mu=_onebit.to_per_rank_layout(mu),
      nu=nu,
      accumulated_update=_onebit.to_per_rank_layout(accumulated),
      lr_sum=lr_sum,
      var_interval=var_interval,
      var_counter=var_counter,
      local_step_interval=local_interval,
      local_step_counter=local_counter,
      frozen=jnp.logical_or(frozen, freezes),
      exchange=exchange,
    )

  return _common.extra_args_transform(init_fn, update_fn)


def _current(accumulated: Any, lr_sum: jax.Array) -> Any:
  """The accumulated update a state holds: 0 while its `lr_sum` is 0 (no local step since the last sync, or none
  yet), the stored sum otherwise."""
  return jax.tree.map(lambda u: jnp.where(lr_sum > 0, u, 0.0), accumulated)


def _count_towards(
  counter: jax.Array, interval: jax.Array, active: jax.Array, scaler: Any, widen: Any
) -> tuple[jax.Array, jax.Array]:
  """One of 0/1 Adam's interval schedules: on an `active` step the counter advances; when it reaches `scaler` it
  restarts from 0 and the interval widens. Returns the new (counter, interval)."""
  counter = jnp.where(active, counter + 1, counter)
  widens = jnp.logical_and(active, counter == scaler)
  return jnp.where(widens, 0, counter), jnp.where(widens, widen(interval), interval)
