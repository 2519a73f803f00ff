"""Small pieces every optimizer here shares: the moment EMA, hyperparameters at a step, tuple-tree unzipping.

One implementation each, so that the building blocks and the fused or communicating optimizers cannot drift apart.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ScheduleCountState(NamedTuple):
  """Step count of a stateless transform whose hyperparameters include a schedule."""
  count: jax.Array  # int32 scalar, the number of updates so far


def init_schedule_state(*hyperparameters: Any) -> optax.OptState:
  """A count if any of `hyperparameters` is a schedule (a callable), otherwise no state at all."""
  if any(callable(h) for h in hyperparameters):
    return ScheduleCountState(count=jnp.zeros([], jnp.int32))
  return optax.EmptyState()


def value_at(hyperparameter: Any, count: jax.Array | None) -> jax.Array:
  """A constant or scheduled hyperparameter at step `count`, as a float32 scalar (all arithmetic here is float32)."""
  return jnp.asarray(hyperparameter(count) if callable(hyperparameter) else hyperparameter, jnp.float32)


def schedule_count(state: optax.OptState) -> jax.Array | None:
  """The count of a `ScheduleCountState` (None for `optax.EmptyState`)."""
  return getattr(state, "count", None)


def advance_schedule_state(state: optax.OptState) -> optax.OptState:
  if isinstance(state, ScheduleCountState):
    return ScheduleCountState(count=optax.safe_increment(state.count))
  return state


class Decay(NamedTuple):
  """A moment decay rate ``b`` and its complement ``1 - b``, float32 scalars."""
  rate: jax.Array
  complement: jax.Array


def _is_static_number(hyperparameter: Any) -> bool:
  return isinstance(hyperparameter, (numbers.Real, np.ndarray, np.generic)) and not isinstance(hyperparameter, bool)


def decay_at(hyperparameter: Any, count: jax.Array | None) -> Decay:
  """`value_at` for a decay rate, with its complement.

  For a static number (Python or NumPy) ``1 - b`` is formed in double precision and rounded once to float32, as the
  references do (PyTorch's ``alpha=1 - beta``): ``1 - float32(0.999)`` in float32 is 0.00099998713, 1.3e-5 away
  from 0.001, enough to flip float8 roundings of LAMB16's v within a few steps. A schedule or a traced value (under
  `optax.inject_hyperparams`) is float32 only, and its complement is formed in float32.
  """
  rate = value_at(hyperparameter, count)
  if _is_static_number(hyperparameter):
    return Decay(rate, jnp.float32(1.0 - np.float64(hyperparameter)))
  return Decay(rate, 1 - rate)


def moment_update(moment: jax.Array, value: jax.Array, decay: Decay, order: int = 1) -> jax.Array:
  """The exponential moving average of the moments: ``b * moment + (1 - b) * value**order`` for ``decay = (b, 1-b)``.

  The product is formed left to right, ``(1 - b) * value * value`` for the second moment, as the references'
  ``addcmul`` does. All operands are float32.
  """
  weighted = decay.complement * value
  if order == 2:
    weighted = weighted * value
  elif order != 1:
    raise ValueError(f"`order` must be 1 or 2, got {order}")
  return decay.rate * moment + weighted


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
