"""JAX's varying-axis types of per-rank values inside `shard_map`: marking them, reading them, and the checks that
catch gradients or params laid out the wrong way for a communicating transform."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# comm imports this module for `mark_varying`; the communicator classes are looked up when called.
from optax_lamb16 import comm as comm_lib


def mark_per_rank(comm: comm_lib.Communicator, x: jax.Array) -> jax.Array:
  """Marks a freshly made buffer as per-rank state (needed by `shard_map`'s type checks; a no-op elsewhere).

  Communicators may define ``per_rank(x)``; the others need nothing.
  """
  per_rank = getattr(comm, "per_rank", None)
  return x if per_rank is None else per_rank(x)


def varying_axes(x: Any) -> frozenset:
  """The manual mesh axes that `x` (an array or an abstract value) is typed varying over inside `shard_map`."""
  # An abstract value (`jax.ShapeDtypeStruct`) carries the type itself; `jax.typeof` of one fails under a
  # `shard_map` that leaves some mesh axes automatic.
  manual = getattr(x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x), "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset()


def _own_axes(comm: comm_lib.Communicator) -> frozenset:
  if isinstance(comm, comm_lib.MeshAxis):
    return frozenset([comm.axis_name])
  if isinstance(comm, comm_lib.TwoLevel):
    return _own_axes(comm.fast) | _own_axes(comm.slow)
  return frozenset()


def other_axes(comm: comm_lib.Communicator, tree: Any) -> tuple[str, ...]:
  """The `shard_map` axes other than the communicator's over which the leaves of `tree` vary (e.g. a "model" axis
  that shards them), the same for every leaf; () outside `shard_map`.

  The 1-bit exchange sends all leaves as one buffer over the data axis, so state built from them varies over these
  axes too, and leaves that differ in them (some sharded over "model", some replicated) cannot share one optimizer.
  """
  own = _own_axes(comm)
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    found.setdefault(varying_axes(leaf) - own, jax.tree_util.keystr(path) or "<root>")
  if len(found) > 1:
    kinds = "; ".join(f"{path} varies over {sorted(axes) or 'no other axis'}" for axes, path in found.items())
    raise ValueError(
      f"The leaves given to a 1-bit optimizer or exchange over {comm!r} vary over different mesh axes ({kinds}). "
      f"One compressed exchange carries all leaves as one buffer, so they must all be sharded alike over the "
      f"axes other than the data axis. Give each kind its own optimizer with `optax.partition` (e.g. "
      f"model-sharded leaves and replicated ones)."
    )
  return tuple(sorted(next(iter(found)))) if found else ()


def _invariant_leaf(comm: comm_lib.Communicator, tree: Any) -> tuple[str, tuple[str, ...]] | None:
  """The path of the first floating leaf of `tree` typed the same on every rank of the communicator's `shard_map`
  axes, with those axes; None when there is none or no such axis is manual and type-checked here (outside
  `shard_map`, with ``check_vma=False``, under `jax.pmap` or a named `jax.vmap`, or with a non-mesh communicator)."""
  axes = tuple(sorted(_own_axes(comm) & frozenset(jax.sharding.get_abstract_mesh().manual_axes)))
  # Under `shard_map(..., check_vma=False)` nothing is typed varying, not even the rank's own index: no verdict.
  if not axes or not all(axis in varying_axes(jax.lax.axis_index(axis)) for axis in axes):
    return None
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and not set(axes) <= varying_axes(leaf):
      return jax.tree_util.keystr(path) or "<root>", axes
  return None


def check_local_gradients(comm: comm_lib.Communicator, updates: Any) -> None:
  """Raises when a communicating transform is given gradients that are already the same on every rank.

  Inside `shard_map`, the gradient with respect to replicated params comes out of autodiff summed over the axis
  (a float32 all-reduce in the backward pass), typed invariant: exchanging it again would train, but with the very
  all-reduce this library removes, and nothing would look wrong.
  """
  found = _invariant_leaf(comm, updates)
  if found:
    path, axes = found
    raise ValueError(
      f"`updates` leaf {path} is the same on every rank of {axes} (typed invariant): these gradients were already "
      f"summed over the ranks by autodiff, a float32 all-reduce in the backward pass, because they were taken with "
      f"respect to replicated params. Take them with respect to `optax_lamb16.local_view(params, {_axis_arg(axes)})` "
      f"so that each rank's own gradients reach the optimizer, or let `optax_lamb16.data_parallel` build the step."
    )


def check_per_rank_params(comm: comm_lib.Communicator, params: Any) -> None:
  """Raises when an optimizer whose params differ per rank (0/1 Adam) is given params replicated over the axis."""
  found = _invariant_leaf(comm, params)
  if found:
    path, axes = found
    raise ValueError(
      f"`params` leaf {path} is replicated over {axes}, but 0/1 Adam's params drift apart per rank between syncs, "
      f"so they must be per rank: keep one copy per rank stacked on a leading axis with spec "
      f"P({_axis_arg(axes)}) and pass this rank's copy to `update` (`optax_lamb16.data_parallel` lays them out "
      f"for you). Replicated params (spec P()) cannot hold them."
    )


def _axis_arg(axes: tuple[str, ...]) -> str:
  return repr(axes[0]) if len(axes) == 1 else repr(axes)


def mark_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  """`x` typed as varying over `axes` (those of `other_axes`) inside `shard_map`; unchanged where it already is."""
  missing = tuple(a for a in axes if a not in varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
