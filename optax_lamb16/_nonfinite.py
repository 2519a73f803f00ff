"""Skipping steps with non-finite gradients on every data-parallel rank together.

`optax.apply_if_finite` looks at the gradients it is given. In data-parallel training with the 1-bit optimizers those
are each rank's LOCAL gradients, so a NaN on one rank would make that rank alone skip the step and its replica
diverge from the others for good. `apply_if_finite` here makes the decision global: one tiny all-reduce of a
"my gradients are finite" flag, and every rank skips (or applies) the step together.

Only the gradients are checked, as in optax. The optimizer state may legitimately hold inf: LAMB16's faithful second
moment overflows float8 to +inf for an element with a large gradient in a quiet leaf (`optax_lamb16.float8`), which
freezes that element and is not a bad batch; a skipped step keeps such a state bitwise, inf included.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks
from optax_lamb16 import comm as comm_lib


def all_finite_everywhere(tree: Any, comm: Any) -> jax.Array:
  """True iff every leaf of `tree` is finite on every rank of `comm` (bool scalar, the same on all ranks)."""
  leaves = jax.tree.leaves(tree)
  local = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.array(True)
  communicator = comm_lib.as_communicator(comm)
  if isinstance(communicator, comm_lib.SingleDevice):
    return local
  # The mean of the 0/1 flags is exactly 1.0 only if every rank's flag is 1.
  return communicator.mean(local.astype(jnp.float32)) == 1.0


def apply_if_finite(
  inner: optax.GradientTransformation, max_consecutive_errors: int, comm: Any = None
) -> optax.GradientTransformationExtraArgs:
  """`optax.apply_if_finite` with the finiteness check global over the data-parallel ranks of `comm`.

  If the gradients are non-finite on ANY rank, every rank returns zero updates and keeps its state (the inner
  state, error-feedback buffers included, is unchanged), so replicas stay identical. After more than
  `max_consecutive_errors` such steps in a row the update is applied anyway, as in optax. The inner update always
  runs (its result is discarded on a skipped step), so every rank makes the same collectives every step.

  Args:
    inner: The optimizer, e.g. `optax_lamb16.onebit_adam(..., comm="data")`.
    max_consecutive_errors: Non-finite steps in a row that are skipped before giving up (>= 0).
    comm: The data-parallel communicator of `inner` (a mesh-axis name, an mpi4py communicator, a `Communicator`,
      or None for a single device).

  Returns:
    A transformation whose state is `optax.ApplyIfFiniteState`, as `optax.apply_if_finite`'s.

  Example:
    >>> import jax.numpy as jnp, optax_lamb16
    >>> tx = optax_lamb16.apply_if_finite(optax_lamb16.lamb16(1e-2), max_consecutive_errors=3)
    >>> params = {"w": jnp.ones(3)}
    >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan, 0.0])}, tx.init(params), params)
    >>> updates["w"], int(state.total_notfinite)
    (Array([0., 0., 0.], dtype=float32), 1)
  """
  _checks.check_range(
    "max_consecutive_errors",
    max_consecutive_errors,
    0,
    fix="Pass how many non-finite steps in a row to skip before giving up.",
  )
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return optax.ApplyIfFiniteState(
      notfinite_count=jnp.zeros([], jnp.int32),
      last_finite=jnp.array(True),
      total_notfinite=jnp.zeros([], jnp.int32),
      inner_state=inner.init(params),
    )

  def update(updates, state, params=None, **extra_args):
    finite = all_finite_everywhere(updates, comm)
    notfinite_count = jnp.where(finite, 0, optax.safe_increment(state.notfinite_count))
    apply = finite | (notfinite_count > max_consecutive_errors)
    # A select, not a cond: the inner update's collectives run on every rank every step, whatever happens.
    new_updates, new_inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    keep = lambda new, old: jnp.where(apply, new, old)
    new_updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates)
    return new_updates, optax.ApplyIfFiniteState(
      notfinite_count=notfinite_count,
      last_finite=finite,
      total_notfinite=jnp.where(finite, state.total_notfinite, optax.safe_increment(state.total_notfinite)),
      inner_state=jax.tree.map(keep, new_inner_state, state.inner_state),
    )

  return optax.GradientTransformationExtraArgs(init, update)
