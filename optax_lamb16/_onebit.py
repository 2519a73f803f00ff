"""What the 1-bit optimizers share: argument checks, DeepSpeed's step counter, hyperparameters at a step, the warm-up
moments, masks, the per-rank state layout, and dtype-preserving weight-decay and learning-rate blocks.

Arithmetic dtype: each leaf's moments, state and arithmetic are in `_common.arithmetic_dtype` of its param: float32
for float32, bfloat16 and float16 params, float64 for float64 params (with ``jax_enable_x64``); the hyperparameters
of a step are evaluated in the widest such dtype of the tree and cast to each leaf's. The compressed exchange stays
float32 (`compression`); the exact mean runs in each leaf's arithmetic dtype."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lamb16 import _checks, _common, _rank_types
from optax_lamb16 import _compression as compression
from optax_lamb16 import comm as comm_lib

# Fix hints shared by the optimizers' argument checks.
EPS_FIX = "It keeps m / (sqrt(v) + eps) finite where v is 0 (elements or leaves whose gradients are all zero)."
FREEZE_FIX = (
  "Steps count as in DeepSpeed (Algorithms section 2): the state's count starts at 1 (DeepSpeed's set-up call) and "
  "the first update runs with t = 2, so freeze_step = F gives F - 1 warm-up updates (exact all-reduce, m and v "
  "updated) and compression from t = F + 1. With 0 or 1 there is no warm-up at all and v stays 0: 1-bit Adam "
  "would divide by sqrt(0) + eps, 1-bit LAMB would never learn a trust ratio and update by exactly 0. Pass an int "
  ">= 2 (DeepSpeed's default: 100000)."
)


MODES = ("faithful", "drop_in")


def check_mode(mode: Any) -> str:
  """`mode` of the 1-bit optimizers: one of MODES (a static string, never injected by `optax.inject_hyperparams`)."""
  if not isinstance(mode, str) or mode not in MODES:
    raise ValueError(
      f"`mode` must be one of {MODES}, got {mode!r}. 'faithful' follows DeepSpeed (no bias "
      f"correction: use about 1/3 of Adam's learning rate, with a warm-up); 'drop_in' follows the exact "
      f"optimizer (optax.adam / optax.lamb) at its own learning rate (Algorithms section 6b)."
    )
  return mode


class LargeFirstStepsWarning(UserWarning):
  """A faithful (DeepSpeed) 1-bit Adam at a constant learning rate: its first steps are several times Adam's."""


def warn_if_large_first_steps(optimizer: str, learning_rate: Any, b1: Any, b2: Any, mode: str) -> None:
  """Warns (`LargeFirstStepsWarning`) where DeepSpeed's rule without bias correction makes the first steps of a
  constant learning rate several times Adam's: with a constant gradient, update n moves each element by
  ``(1 - b1**n) / sqrt(1 - b2**n)`` times the learning rate (Adam: 1), ``(1-b1) / sqrt(1-b2) = 3.2`` on the first
  update and up to 6.6 around the 12th for the defaults. Only for static numbers (a schedule is assumed to warm up;
  values traced by `optax.inject_hyperparams` are not inspected), and only where the largest ratio exceeds 2."""
  static = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)
  if mode != "faithful" or not all(static(x) for x in (learning_rate, b1, b2)) or learning_rate <= 0:
    return
  n = np.arange(1, 10001, dtype=np.float64)
  ratio = (1 - float(b1) ** n) / np.sqrt(1 - float(b2) ** n)
  if ratio.max() <= 2:
    return
  warnings.warn(
    f"{optimizer}(mode='faithful') at the constant learning rate {learning_rate:g}: DeepSpeed's rule has no bias "
    f"correction, so with b1={b1:g}, b2={b2:g} its update n moves each parameter by up to "
    f"{ratio.max():.1f} x learning_rate around n = {int(n[ratio.argmax()])} ({ratio[0]:.1f} x on the first; "
    f"Adam: 1 x) "
    f"and by more than 2 x for {int(np.sum(ratio > 2))} updates. Use a learning-rate schedule with a warm-up and "
    f"about 1/3 of Adam's learning rate, or mode='drop_in' at Adam's learning rate (see the docstring).",
    LargeFirstStepsWarning,
    stacklevel=3,
  )


def check_moment_hyperparameters(b1: Any, b2: Any, eps: Any) -> None:
  _checks.check_decay_rates(b1, b2)
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=EPS_FIX + " Typical value: 1e-8.")


def check_weight_decay(weight_decay: Any) -> None:
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")


def check_common(learning_rate: Any, comm: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any) -> comm_lib.Communicator:
  """Checks the hyperparameters every 1-bit optimizer has; returns the communicator for `comm`."""
  _checks.check_learning_rate(learning_rate)
  check_moment_hyperparameters(b1, b2, eps)
  check_weight_decay(weight_decay)
  return comm_lib.as_communicator(comm)


def check_freeze_step(freeze_step: Any) -> Any:
  """`freeze_step` of 1-bit Adam and 1-bit LAMB: at least one warm-up update, so at least 2 (see FREEZE_FIX)."""
  return _checks.check_step_count("freeze_step", freeze_step, 2, fix=FREEZE_FIX)


def initial_count() -> jax.Array:
  """DeepSpeed's engine makes one set-up call with zero gradients that counts as step 1 (Algorithms section 2)."""
  return jnp.ones([], jnp.int32)


def next_count(count: jax.Array) -> jax.Array:
  """This update's t: the count plus one, saturating at the int32 maximum (`optax.safe_increment`) instead of
  wrapping round to negative steps, which would send every phase switch back to the warm-up."""
  return optax.safe_increment(count)


def hyperparameters_at(count: jax.Array, *hyperparameters: Any, dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
  """Constants or schedules as scalars of `dtype` (the tree's `_common.widest_arithmetic_dtype`) for the update
  that `count` (DeepSpeed's, 1 after `init`) starts: a schedule sees the number of updates so far, ``count - 1``, as
  optax's schedules do."""
  return tuple(_common.value_at(h, count - 1, dtype) for h in hyperparameters)


def decays_at(count: jax.Array, *decay_rates: Any, dtype: Any = jnp.float32) -> tuple[_common.Decay, ...]:
  """`hyperparameters_at` for decay rates (`_common.decay_at`: ``1 - b`` in double precision where b is static)."""
  return tuple(_common.decay_at(b, count - 1, dtype) for b in decay_rates)


def zeros_like(tree: Any, communicator: comm_lib.Communicator) -> Any:
  """Zeros shaped like each leaf (abstract shapes fine) in its `_common.arithmetic_dtype` (float32; float64 for a
  float64 leaf), laid out like it on an Explicit mesh, and typed replicated over the data axis inside `shard_map`
  even where the leaf is per rank (`jnp.zeros_like` would type it varying), but varying over the other axes the
  leaves vary over (a "model" axis: `comm.other_axes`)."""
  axes = _rank_types.other_axes(communicator, tree)
  return jax.tree.map(
    lambda p: _rank_types.mark_varying(
      jnp.zeros(jnp.shape(p), _common.arithmetic_dtype(p.dtype), out_sharding=jax.typeof(p).sharding), axes
    ),
    tree,
  )


def skipped_exchange(tree: Any, communicator: comm_lib.Communicator) -> Any:
  """Zeros shaped and typed like the payload that `compression.exchange` of `tree` returns: the value of an
  exchange that did not run (the carry of a `run_if` loop of no trips)."""
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  n_pad = compression.padded_length(compression.tree_size(tree), world, local)
  if n_pad == 0 or world // local == 1:  # an exact mean: a tree like `tree`
    return zeros_like(tree, communicator)
  varying = lambda x: _rank_types.mark_varying(x, _rank_types.other_axes(communicator, tree))
  return compression.SignPayload(
    varying(jnp.zeros([world, n_pad // world // 8], jnp.uint8)), varying(jnp.zeros([world], jnp.float32))
  )


def check_update_args(updates: Any, like: Any, params: Any, params_required: bool = True) -> tuple[Any, Any]:
  """Validates `update`'s arguments; returns the gradients and the params (None if not given where not
  `params_required`) in the dtypes of `like`'s leaves (the state's moments: each param's arithmetic dtype)."""
  if params is None and params_required:
    raise ValueError("The 1-bit optimizers need `params`: call `update(grads, state, params)`.")
  _checks.check_float_leaves("updates", updates)
  _checks.check_same_structure("updates", updates, "optimizer state (from init)", like)
  if params is None:
    return as_dtypes_of(updates, like), None
  _checks.check_same_structure("updates", updates, "params", params)
  return as_dtypes_of(updates, like), as_dtypes_of(params, like)


def as_dtypes_of(tree: Any, like: Any) -> Any:
  """`tree` with each leaf cast to the dtype of `like`'s leaf."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def check_exchange(
  communicator: comm_lib.Communicator, exchange: compression.CompressedAllReduceState, tree: Any
) -> int:
  """Returns the world size; raises a clear error if `comm` is unusable here or `exchange` fits another world size.

  Checked up front: the warm-up branch would otherwise fail first, inside a collective, with an error that names no
  argument.
  """
  world = comm_lib.world_size(communicator)
  compression.check_state(exchange, compression.leaf_sizes(tree), world, comm_lib.ranks_per_host(communicator))
  return world


def checked_inputs(
  updates: Any, state: Any, params: Any, communicator: comm_lib.Communicator, params_required: bool = True
) -> tuple[Any, Any, int]:
  """What every 1-bit update starts with: the grads and params in the state's dtypes, checked against the state's
  `nu` (laid out like the params in every 1-bit state, in each param's arithmetic dtype), and the world size its
  exchange state fits."""
  _rank_types.check_local_gradients(communicator, updates)
  grads, params = check_update_args(updates, state.nu, params, params_required)
  return grads, params, check_exchange(communicator, state.exchange, grads)


def warmup_moments(
  grads: Any, mu: Any, nu: Any, b1: _common.Decay, b2: _common.Decay, communicator: comm_lib.Communicator
) -> tuple[Any, Any]:
  """The uncompressed step all three optimizers share (1-bit Adam's and 1-bit LAMB's warm-up, 0/1 Adam's variance
  steps): the exact mean of the ranks' gradients, then ``m = b1*m + (1-b1)*g`` and ``v = b2*v + (1-b2)*g*g``."""
  mean = compression.exact_mean(grads, communicator)
  return _common.tree_moment_update(mu, mean, b1), _common.tree_moment_update(nu, mean, b2, order=2)


def run_if(pred: jax.Array, fn: Any, operands: Any, carry: Any) -> tuple[Any, Any]:
  """``fn(operands, carry)`` where the scalar `pred` holds, else nothing; returns ``(operands, new carry)``.

  `fn` returns a new carry. Read `operands` afterwards only from what this returns (the same values): the loop
  below owns their buffers.

  A loop of 0 or 1 trips rather than a `lax.cond`: XLA copies every buffer a conditional passes through (the state
  that the branch not taken leaves unchanged, 16-24 MB per 4M parameters) into the conditional's own output and
  from there into the donated state, every step, while a loop updates its carry in place. The operands travel in
  the carry too, since XLA copies a loop's operands that are read after it, and the optimization barrier ties them
  to the trip counter, so that XLA cannot hoist the body's work out of the loop and run it on every step.
  """

  def body(loop):
    counter, operands, carry = loop
    return counter + 1, operands, fn(_tied_to(counter, operands), carry)

  trips = jnp.asarray(pred).astype(jnp.int32)
  _, operands, carry = jax.lax.while_loop(
    lambda loop: loop[0] < trips, body, (jnp.zeros([], jnp.int32), operands, _typed_as_outputs(fn, operands, carry))
  )
  return operands, carry


def _typed_as_outputs(fn: Any, operands: Any, carry: Any) -> Any:
  """`carry` typed varying (inside `shard_map`) over the axes that `fn` makes each leaf vary over, as `lax.cond`
  joins its branches' types: a loop's carry must keep its type (e.g. 1-bit LAMB's trust ratios vary per rank where
  the params do)."""
  for _ in range(4):  # types only widen, over a few mesh axes
    outputs = jax.tree.leaves(jax.eval_shape(fn, operands, carry))
    widened = [
      _rank_types.mark_varying(x, tuple(_rank_types.varying_axes(out)))
      for x, out in zip(jax.tree.leaves(carry), outputs)
    ]
    if all(w is x for w, x in zip(widened, jax.tree.leaves(carry))):
      return carry
    carry = jax.tree.unflatten(jax.tree.structure(carry), widened)
  return carry


def _tied_to(counter: jax.Array, tree: Any) -> Any:
  """`tree` through optimization barriers with `counter`: one barrier per manual-axis type of the leaves (inside
  `shard_map`), since one barrier types all its outputs as varying wherever one input is."""
  leaves, treedef = jax.tree.flatten(tree)
  groups = {}
  for index, leaf in enumerate(leaves):
    groups.setdefault(_rank_types.varying_axes(leaf), []).append(index)
  for indices in groups.values():
    _, tied = jax.lax.optimization_barrier((counter, [leaves[i] for i in indices]))
    for index, leaf in zip(indices, tied):
      leaves[index] = leaf
  return jax.tree.unflatten(treedef, leaves)


def apply_mask(tree: optax.Updates, mask: Any, nu: optax.Updates, mask_zero_variance: bool) -> optax.Updates:
  """Masks what a compressed exchange returned.

  `mask` multiplies each leaf (DeepSpeed's ``exp_avg_mask``; None: no mask). With `mask_zero_variance`, elements
  whose second moment `nu` is exactly 0 are set to 0 too: they never had a gradient (a dead ReLU unit, an unused
  embedding row), and the ±scale sign noise the 1-bit exchange gives them, divided by ``sqrt(0) + eps``, would blow
  their parameters up.
  """
  if mask is not None:
    tree = jax.tree.map(lambda x, m: x * jnp.asarray(m, x.dtype), tree, mask)
  if mask_zero_variance:
    tree = jax.tree.map(lambda x, v: jnp.where(v > 0, x, 0.0), tree, nu)
  return tree


def to_per_rank_layout(tree: Any) -> Any:
  """Per-rank state leaves are at least 1-d: a 0-d leaf is stored with shape (1,), so that it can be laid out as
  one global array sharded over the data axis (spec ``P(axis)``, global shape ``(P,)``), like every per-rank leaf."""
  return jax.tree.map(lambda x: jnp.reshape(x, (1,)) if jnp.ndim(x) == 0 else x, tree)


def from_per_rank_layout(tree: Any, like: Any) -> Any:
  """Inverse of `to_per_rank_layout`: leaves shaped like those of `like` again."""
  return jax.tree.map(lambda x, p: jnp.reshape(x, ()) if jnp.ndim(p) == 0 else x, tree, like)
