"""Early, explicit checks of hyperparameters and pytrees.

Every check names the offending argument and says how to fix it. Hyperparameter checks run only on concrete
numbers: under `optax.inject_hyperparams` or `jax.jit` the values are tracers and cannot be inspected.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def concrete_value(value: Any) -> float | None:
  """Returns `value` as a Python float if it is a concrete real scalar, else None (schedules, tracers)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except Exception:  # noqa: BLE001 - anything that is not array-like is simply not checked here.
    return None
  if array.shape != () or not jnp.issubdtype(array.dtype, jnp.number):  # jnp knows bfloat16 and float8
    return None
  return float(array)


def _non_scalar_shape(value: Any) -> tuple[int, ...] | None:
  """The shape of a concrete array-like that is not a scalar (a per-element hyperparameter), else None."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.shape(value) or None
  except Exception:  # noqa: BLE001 - ragged or odd objects are left to `concrete_value`.
    return None


def check_range(
  name: str,
  value: Any,
  low: float,
  high: float = math.inf,
  *,
  low_open: bool = False,
  high_open: bool = False,
  fix: str = "",
) -> None:
  """Raises ValueError if the concrete `value` is not a scalar in [low, high] (`low_open`/`high_open`: open ends)."""
  hint = f" {fix}" if fix else ""
  shape = _non_scalar_shape(value)
  if shape is not None:
    raise ValueError(f"`{name}` must be a scalar (or a schedule), got an array of shape {shape}.{hint}")
  number = concrete_value(value)
  if number is None:
    return
  bad = (
    math.isnan(number)
    or number < low
    or number > high
    or (low_open and number == low)
    or (high_open and number == high)
  )
  if bad:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"`{name}` must lie in {interval}, got {number:g}.{hint}")


def check_step_count(name: str, value: Any, low: int, fix: str = "") -> Any:
  """Checks a concrete step count (a whole number >= `low`) and returns it as a Python int; tracers pass as given.

  A whole float such as ``1e5`` becomes an int: the step logic compares it with int32 counters, which strict dtype
  promotion would reject with an error that names no argument.
  """
  check_range(name, value, low, fix=fix)
  number = concrete_value(value)
  if number is None:
    return value
  if not number.is_integer():
    raise ValueError(f"`{name}` must be a whole number of steps, got {number:g}.{f' {fix}' if fix else ''}")
  return int(number)


def check_order(low_name: str, low: Any, high_name: str, high: Any, fix: str = "") -> None:
  """Raises ValueError if the concrete `low` exceeds the concrete `high`."""
  low_value, high_value = concrete_value(low), concrete_value(high)
  if low_value is not None and high_value is not None and low_value > high_value:
    hint = f" {fix}" if fix else ""
    raise ValueError(f"`{low_name}` ({low_value:g}) must not exceed `{high_name}` ({high_value:g}).{hint}")


def check_learning_rate(learning_rate: Any) -> None:
  """A learning rate is a non-negative number or a schedule (a callable of the step count)."""
  if learning_rate is None:
    raise ValueError("`learning_rate` is required: pass a non-negative float or an optax schedule.")
  check_range(
    "learning_rate",
    learning_rate,
    0.0,
    fix="Pass a non-negative float or an optax schedule; optax updates are already negated.",
  )


def check_float_leaves(name: str, tree: Any) -> None:
  """Raises TypeError unless every leaf of `tree` has a real floating dtype (abstract shapes are fine)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`{name}` leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; optax_lamb16 needs real "
        f"floating-point leaves. Keep integer/complex leaves out of the optimizer, e.g. with "
        f"`optax.masked` or `optax.partition`."
      )


def check_same_structure(name_a: str, tree_a: Any, name_b: str, tree_b: Any) -> None:
  """Raises ValueError if two pytrees differ in structure or in leaf shapes."""
  structure_a = jax.tree.structure(tree_a)
  structure_b = jax.tree.structure(tree_b)
  if structure_a != structure_b:
    raise ValueError(
      f"`{name_a}` and `{name_b}` must have the same pytree structure; got\n  {name_a}: {structure_a}\n"
      f"  {name_b}: {structure_b}\nPass the gradients of exactly the parameters the optimizer was initialised with."
    )
  paths_and_leaves = jax.tree_util.tree_leaves_with_path(tree_a)
  for (path, leaf_a), leaf_b in zip(paths_and_leaves, jax.tree.leaves(tree_b)):
    shape_a, shape_b = jnp.shape(leaf_a), jnp.shape(leaf_b)
    if shape_a != shape_b:
      raise ValueError(
        f"Leaf {jax.tree_util.keystr(path)} has shape {shape_a} in `{name_a}` but {shape_b} in `{name_b}`; "
        f"the shapes must match."
      )


# bfloat16 params under `optax.inject_hyperparams` get bfloat16 hyperparameters by default.
LOW_PRECISION_HINT = (
  "Under `optax.inject_hyperparams` with bfloat16 params pass `hyperparam_dtype=jnp.float32`: "
  "0.999 rounds to 1.0 in bfloat16."
)


def check_decay_rates(b1: Any, b2: Any, hint: str = "") -> None:
  """Adam's moment decay rates, each in [0, 1); `hint` follows the typical value in the message."""
  for name, value, typical in (("b1", b1, "0.9"), ("b2", b2, "0.999")):
    check_range(name, value, 0.0, 1.0, high_open=True, fix=f"Typical value: {typical}." + (f" {hint}" if hint else ""))


def check_update_leaves(updates: Any, like: Any, like_name: str) -> None:
  """`updates` are floating leaves with the structure of `like` (the optimizer state's moments, or the params)."""
  check_float_leaves("updates", updates)
  check_same_structure("updates", updates, like_name, like)
