"""Small pieces every optimizer here shares: the moment EMA, hyperparameters at a step, tuple-tree unzipping.

One implementation each, so that the building blocks and the fused or communicating optimizers cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
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


def moment_update(moment: jax.Array, value: jax.Array, decay: jax.Array, order: int = 1) -> jax.Array:
  """The exponential moving average of the moments: ``decay * moment + (1 - decay) * value**order``.

  The product is formed left to right, ``(1 - decay) * value * value`` for the second moment, as the references'
  ``addcmul`` does. All operands are float32.
  """
  weighted = (1 - decay) * value
  if order == 2:
    weighted = weighted * value
  elif order != 1:
    raise ValueError(f"`order` must be 1 or 2, got {order}")
  return decay * moment + weighted


def tree_moment_update(moments: Any, values: Any, decay: jax.Array, order: int = 1) -> Any:
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
