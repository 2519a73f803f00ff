"""Small dtype-preserving building blocks shared by the optimizers.

`optax.scale_by_learning_rate` and `optax.add_decayed_weights` multiply by the hyperparameter as given; under
`optax.inject_hyperparams` that is a float32 array, which turns bfloat16 updates into float32 ones (or raises under
strict dtype promotion). These versions cast the scalar to each leaf's dtype first, so updates keep the params' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics

from optax_lamb16 import _checks


class ScheduleCountState(NamedTuple):
  """Step count of a transform whose hyperparameter is a schedule."""
  count: jax.Array  # int32 scalar, the number of updates so far


def init_schedule_state(hyperparameter: Any) -> optax.OptState:
  """A count if `hyperparameter` is a schedule (a callable), otherwise no state at all."""
  if callable(hyperparameter):
    return ScheduleCountState(count=jnp.zeros([], jnp.int32))
  return optax.EmptyState()


def hyperparameter_value(hyperparameter: Any, state: optax.OptState) -> Any:
  """The value of a constant or scheduled hyperparameter at the state's count."""
  return hyperparameter(state.count) if callable(hyperparameter) else hyperparameter


def advance_schedule_state(state: optax.OptState) -> optax.OptState:
  if isinstance(state, ScheduleCountState):
    return ScheduleCountState(count=numerics.safe_increment(state.count))
  return state


def scale_by_learning_rate(learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """Multiplies updates by `-learning_rate` (a float or a schedule), keeping each leaf's dtype."""
  _checks.check_learning_rate(learning_rate)

  def init_fn(params):
    del params
    return init_schedule_state(learning_rate)

  def update_fn(updates, state, params=None):
    del params
    step_size = -jnp.asarray(hyperparameter_value(learning_rate, state), jnp.float32)
    updates = jax.tree.map(lambda u: (step_size * u.astype(jnp.float32)).astype(u.dtype), updates)
    return updates, advance_schedule_state(state)

  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: optax.ScalarOrSchedule = 0.0,
                        mask: Any | Callable[[optax.Params], Any] | None = None) -> optax.GradientTransformation:
  """Adds `weight_decay * params` to the updates (where `mask` is true), keeping each leaf's dtype."""
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")

  def init_fn(params):
    del params
    return init_schedule_state(weight_decay)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights needs `params`: call `update(grads, state, params)`.")
    decay = jnp.asarray(hyperparameter_value(weight_decay, state), jnp.float32)
    updates = jax.tree.map(
        lambda u, p: (u.astype(jnp.float32) + decay * p.astype(jnp.float32)).astype(u.dtype), updates, params)
    return updates, advance_schedule_state(state)

  transform = optax.GradientTransformation(init_fn, update_fn)
  return transform if mask is None else optax.masked(transform, mask)
