"""Small pieces every optimizer here shares: the moment EMA, hyperparameters at a step, the arithmetic dtype of a
leaf, tuple-tree unzipping.

One implementation each, so that the building blocks and the fused or communicating optimizers cannot drift apart.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_lamb16 import _checks


class ScheduleCountState(NamedTuple):
  """Step count of a stateless transform whose hyperparameters include a schedule."""

  count: jax.Array  # int32 scalar, the number of updates so far


def init_schedule_state(*hyperparameters: Any) -> optax.OptState:
  """A count if any of `hyperparameters` is a schedule (a callable), otherwise no state at all."""
  if any(callable(h) for h in hyperparameters):
    return ScheduleCountState(count=jnp.zeros([], jnp.int32))
  return optax.EmptyState()


def arithmetic_dtype(dtype: Any) -> np.dtype:
  """The dtype the arithmetic on a leaf of `dtype` runs in: float32 for float32 and narrower (bfloat16, float16),
  float64 for float64 (only with ``jax_enable_x64``): never less than float32, never less than the leaf."""
  dtype = jax.dtypes.canonicalize_dtype(dtype)
  return dtype if dtype == jnp.float64 else np.dtype(jnp.float32)


def widest_arithmetic_dtype(tree: Any) -> np.dtype:
  """The widest `arithmetic_dtype` of `tree`'s leaves (float32 for a tree without leaves): the dtype of the
  scalars that several leaves share (hyperparameters at a step, sums over leaves)."""
  dtypes = {
    arithmetic_dtype(leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)) for leaf in jax.tree.leaves(tree)
  }
  return np.dtype(jnp.float64) if np.dtype(jnp.float64) in dtypes else np.dtype(jnp.float32)


def scalar_in(value: Any, dtype: Any) -> Any:
  """A scalar hyperparameter for arithmetic in `dtype`: an array (or NumPy scalar) cast to it; a Python number as
  it is (weakly typed, it takes the dtype of the array it meets, and ``1 - 0.9`` stays a double-precision number)."""
  return value.astype(dtype) if hasattr(value, "astype") else value


def value_at(hyperparameter: Any, count: jax.Array | None, dtype: Any = jnp.float32) -> jax.Array:
  """A constant or scheduled hyperparameter at step `count`, as a scalar of `dtype` (float32 unless the params
  are float64)."""
  return jnp.asarray(hyperparameter(count) if callable(hyperparameter) else hyperparameter, dtype)


def schedule_count(state: optax.OptState) -> jax.Array | None:
  """The count of a `ScheduleCountState` (None for `optax.EmptyState`)."""
  return getattr(state, "count", None)


def advance_schedule_state(state: optax.OptState) -> optax.OptState:
  if isinstance(state, ScheduleCountState):
    return ScheduleCountState(count=optax.safe_increment(state.count))
  return state


class Decay(NamedTuple):
  """A moment decay rate ``b`` and its complement ``1 - b``, scalars of one dtype (float32, or float64)."""

  rate: jax.Array
  complement: jax.Array

  def astype(self, dtype: Any) -> Decay:
    return Decay(self.rate.astype(dtype), self.complement.astype(dtype))


def _is_static_number(hyperparameter: Any) -> bool:
  return isinstance(hyperparameter, (numbers.Real, np.ndarray, np.generic)) and not isinstance(hyperparameter, bool)


def decay_at(hyperparameter: Any, count: jax.Array | None, dtype: Any = jnp.float32) -> Decay:
  """`value_at` for a decay rate, with its complement, scalars of `dtype` (float32 unless the params are float64).

  For a static number (Python or NumPy) ``1 - b`` is formed in double precision and rounded once to `dtype`, as the
  references do (PyTorch's ``alpha=1 - beta``): ``1 - float32(0.999)`` in float32 is 0.00099998713, 1.3e-5 away
  from 0.001, enough to flip float8 roundings of LAMB16's v within a few steps. A schedule or a traced value (under
  `optax.inject_hyperparams`) has only its own precision, and its complement is formed in `dtype`.
  """
  rate = value_at(hyperparameter, count, dtype)
  if _is_static_number(hyperparameter):
    return Decay(rate, jnp.asarray(1.0 - np.float64(hyperparameter), dtype))
  return Decay(rate, 1 - rate)


def moment_update(moment: jax.Array, value: jax.Array, decay: Decay, order: int = 1) -> jax.Array:
  """The exponential moving average of the moments: ``b * moment + (1 - b) * value**order`` for ``decay = (b, 1-b)``.

  The product is formed left to right, ``(1 - b) * value * value`` for the second moment, as the references'
  ``addcmul`` does. `moment` and `value` have one dtype (float32, or float64), and the decay is cast to it.
  """
  decay = decay.astype(moment.dtype)
  weighted = decay.complement * value
  if order == 2:
    weighted = weighted * value
  elif order != 1:
    raise ValueError(f"`order` must be 1 or 2, got {order}")
  return decay.rate * moment + weighted


def bias_correction(decay: Decay, updates: jax.Array) -> jax.Array:
  """Adam's bias correction ``1 - b**n`` for `n` updates of an EMA of rate ``b`` (Algorithms sections 6b and 8), a
  scalar of the decay's dtype."""
  rate = decay.rate
  return 1 - rate ** jnp.asarray(updates).astype(rate.dtype)


def tree_moment_update(moments: Any, values: Any, decay: Decay, order: int = 1) -> Any:
  """`moment_update` leaf by leaf over two pytrees of the same structure."""
  return jax.tree.map(lambda m, x: moment_update(m, x, decay, order), moments, values)


def unzip(like: Any, results: Any, arity: int) -> tuple[Any, ...]:
  """Splits a tree of `arity`-tuples (the result of a per-leaf `jax.tree.map` over `like`) into `arity` trees.

  A tree without leaves (e.g. under `optax.masked`) gives `arity` empty trees of its structure.
  """
  treedef = jax.tree.structure(like)
  columns = list(zip(*treedef.flatten_up_to(results))) or [()] * arity
  return tuple(jax.tree.unflatten(treedef, list(column)) for column in columns)


def extra_args_transform(init_fn: Callable, update_fn: Callable) -> optax.GradientTransformationExtraArgs:
  """An `optax.GradientTransformationExtraArgs` whose `update` accepts and ignores extra keyword arguments (``value=``,
  ``grad=``, ...), as optax's own transforms do in chains that pass them through."""

  def update(updates, state, params=None, **extra_args):
    del extra_args
    return update_fn(updates, state, params)

  return optax.GradientTransformationExtraArgs(init_fn, update)


def is_static_zero(hyperparameter: Any) -> bool:
  """Whether `hyperparameter` is a plain Python 0 (not a schedule, nor a value `inject_hyperparams` traces): a weight
  decay that lets a step skip reading the params."""
  return isinstance(hyperparameter, (int, float)) and hyperparameter == 0


# Dtype-preserving weight decay and learning rate. `optax.add_decayed_weights` and `optax.scale_by_learning_rate`
# multiply by the hyperparameter as given: under `optax.inject_hyperparams` that is a float32 array, which turns
# bfloat16 updates into float32 ones (or raises under strict dtype promotion), and a Python float is rounded to the
# updates' dtype first. These compute in each leaf's arithmetic dtype (float32, float64 for float64 leaves) and round
# once, to the updates' dtype; in float32 they are bitwise optax's ``g + wd * p`` and ``-lr * g``.


def add_decayed_weights(
  weight_decay: optax.ScalarOrSchedule, mask: Any = None
) -> optax.GradientTransformationExtraArgs:
  """``updates + weight_decay * params`` (decoupled weight decay, added to the Adam direction), in each leaf's
  arithmetic dtype, returned in the updates' dtype; only where `mask` allows (as `optax.add_decayed_weights`'s). A
  schedule sees the number of updates so far."""
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")

  def init_fn(params):
    del params
    return init_schedule_state(weight_decay)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("Optimizers with weight decay need `params`: call `update(grads, state, params)`.")
    if is_static_zero(weight_decay):  # do not read the params at all
      return updates, state
    decay = value_at(weight_decay, schedule_count(state), widest_arithmetic_dtype(updates))

    def leaf(g, p):
      dtype = arithmetic_dtype(g.dtype)
      return (g.astype(dtype) + decay.astype(dtype) * p.astype(dtype)).astype(g.dtype)

    updates = jax.tree.map(leaf, updates, params)
    return updates, advance_schedule_state(state)

  transform = extra_args_transform(init_fn, update_fn)
  return transform if mask is None else optax.masked(transform, mask)


def scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """``-learning_rate * updates`` in each leaf's arithmetic dtype, returned in the updates' dtype. A schedule sees
  the number of updates so far."""
  _checks.check_learning_rate(learning_rate)

  def init_fn(params):
    del params
    return init_schedule_state(learning_rate)

  def update_fn(updates, state, params=None):
    del params
    step_size = -value_at(learning_rate, schedule_count(state), widest_arithmetic_dtype(updates))

    def leaf(g):
      dtype = arithmetic_dtype(g.dtype)
      return (step_size.astype(dtype) * g.astype(dtype)).astype(g.dtype)

    updates = jax.tree.map(leaf, updates)
    return updates, advance_schedule_state(state)

  return extra_args_transform(init_fn, update_fn)
