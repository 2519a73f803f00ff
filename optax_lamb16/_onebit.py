"""What the 1-bit optimizers share: argument checks, DeepSpeed's step counter, masks and float32 views."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_lamb16 import _checks, comm as comm_lib, compression

# Fix hints shared by the optimizers' argument checks.
EPS_FIX = "It keeps m / (sqrt(v) + eps) finite where v is 0 (elements or leaves whose gradients are all zero)."
STEP_FIX = "Pass a non-negative int; it counts steps as DeepSpeed does (SPEC.md section 2)."


def check_common(learning_rate: Any, comm: Any, b1: Any, b2: Any, eps: Any,
                 weight_decay: Any) -> comm_lib.Communicator:
  """Checks the hyperparameters every 1-bit optimizer has; returns the communicator for `comm`."""
  _checks.check_learning_rate(learning_rate)
  _checks.check_range("b1", b1, 0.0, 1.0, high_open=True, fix="Typical value: 0.9.")
  _checks.check_range("b2", b2, 0.0, 1.0, high_open=True, fix="Typical value: 0.999.")
  _checks.check_range("eps", eps, 0.0, low_open=True, fix=EPS_FIX + " Typical value: 1e-8.")
  _checks.check_range("weight_decay", weight_decay, 0.0, fix="Weight decay is a non-negative coefficient.")
  return comm_lib.as_communicator(comm)


def initial_count() -> jax.Array:
  """DeepSpeed's engine makes one set-up call with zero gradients that counts as step 1 (SPEC.md section 2)."""
  return jnp.ones([], jnp.int32)


def learning_rate_at(learning_rate: Any, count: jax.Array) -> jax.Array:
  """The learning rate of this update; a schedule sees the number of updates so far (``count - 1``), as in optax."""
  value = learning_rate(count - 1) if callable(learning_rate) else learning_rate
  return jnp.asarray(value, jnp.float32)


def check_update_args(updates: Any, like: Any, params: Any) -> tuple[Any, Any]:
  """Validates `update`'s arguments; returns float32 views of the gradients and the params."""
  if params is None:
    raise ValueError("The 1-bit optimizers need `params`: call `update(grads, state, params)`.")
  _checks.check_float_leaves("updates", updates)
  _checks.check_same_structure("updates", updates, "optimizer state (from init)", like)
  _checks.check_same_structure("updates", updates, "params", params)
  as_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
  return as_f32(updates), as_f32(params)


def check_exchange(communicator: comm_lib.Communicator, exchange: compression.CompressedAllReduceState,
                   tree: Any) -> int:
  """Returns the world size; raises a clear error if `comm` is unusable here or `exchange` fits another world size.

  Checked up front: the warm-up branch would otherwise fail first, inside a collective, with an error that names no
  argument.
  """
  world = comm_lib.world_size(communicator)
  compression.check_state(exchange, compression.tree_size(tree), world)
  return world


def checked_inputs(updates: Any, state: Any, params: Any,
                   communicator: comm_lib.Communicator) -> tuple[Any, Any, int]:
  """What every 1-bit update starts with: float32 grads and params, checked, and the world size its state fits."""
  grads, params = check_update_args(updates, state.mu, params)
  return grads, params, check_exchange(communicator, state.exchange, grads)


def as_float32(*values: Any) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(v, jnp.float32) for v in values)


def apply_mask(tree: optax.Updates, mask: Any, nu: optax.Updates, mask_zero_variance: bool) -> optax.Updates:
  """Masks what a compressed exchange returned.

  `mask` multiplies each leaf (DeepSpeed's ``exp_avg_mask``; None: no mask). With `mask_zero_variance`, elements
  whose second moment `nu` is exactly 0 are set to 0 too: they never had a gradient (a dead ReLU unit, an unused
  embedding row), and the ±scale sign noise the 1-bit exchange gives them, divided by ``sqrt(0) + eps``, would blow
  their parameters up.
  """
  if mask is not None:
    tree = jax.tree.map(lambda x, m: x * jnp.asarray(m, jnp.float32), tree, mask)
  if mask_zero_variance:
    tree = jax.tree.map(lambda x, v: jnp.where(v > 0, x, 0.0), tree, nu)
  return tree

