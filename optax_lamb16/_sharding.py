"""Partition specs for optimizer states whose parts differ per data-parallel rank.

Inside `jax.shard_map`, a per-rank buffer of local shape (n, ...) is one global array of shape (P * n, ...) sharded
over the data axis (spec ``P(axis)``); everything else in the state is replicated (spec ``P()``). State types list
their per-rank fields in a class attribute ``PER_RANK_FIELDS``; nothing per-rank is ever silently replicated.

Per-rank leaves are therefore at least 1-d: a 0-d value cannot be split over an axis. The optimizers here store the
per-rank state of a 0-d parameter (0/1 Adam's momentum and accumulated update) with shape (1,), global shape (P,);
`state_partition_specs` rejects a 0-d per-rank leaf of any other state with an error that names it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from optax_lamb16 import _compression as compression
from optax_lamb16 import comm as comm_lib

REPLICATED, PER_RANK, ERROR_FEEDBACK, WORLD_SIZED = "replicated", "per_rank", "error_feedback", "world_sized"
_REPLICATED = PartitionSpec()  # the default layout of params


def _has_role_fields(node: Any) -> bool:
  kind = type(node)
  return (hasattr(kind, "PER_RANK_FIELDS") or hasattr(kind, "WORLD_SIZED_FIELDS")) and hasattr(node, "_fields")


def leaf_roles(state: Any, default: str = REPLICATED) -> Any:
  """What each leaf of `state` (concrete or abstract) is across data-parallel ranks.

  Returns:
    A pytree with the structure of `state` whose leaves are `REPLICATED` (the same on every rank), `PER_RANK`
    (differs per rank, e.g. 0/1 Adam's momentum between syncs), `ERROR_FEEDBACK` (the compressed all-reduce's
    per-rank error buffers, whose length depends on the world size) or `WORLD_SIZED` (the same on every rank, but
    its length depends on the world size, e.g. 1-bit LAMB's padding tail).
  """

  def node_roles(node):
    if not _has_role_fields(node):
      return default
    kind = type(node)
    per_rank = ERROR_FEEDBACK if isinstance(node, compression.CompressedAllReduceState) else PER_RANK

    def role(field):
      if field in getattr(kind, "PER_RANK_FIELDS", ()):
        return per_rank
      return WORLD_SIZED if field in getattr(kind, "WORLD_SIZED_FIELDS", ()) else default

    return kind(*(leaf_roles(value, role(field)) for field, value in zip(node._fields, node)))

  return jax.tree.map(node_roles, state, is_leaf=_has_role_fields)


def state_partition_specs(state: Any, axis_name: str | tuple[str, ...]) -> Any:
  """`shard_map` specs for `state` (concrete or abstract): ``P(axis_name)`` for per-rank leaves, ``P()`` for others.

  Args:
    state: An optimizer state, or its `jax.eval_shape`.
    axis_name: The data-parallel mesh axis, or a tuple of axes that together index the ranks (for a
      `comm.TwoLevel` grid, its ``axis_names``: hosts major).

  Returns:
    A pytree of `PartitionSpec` with the structure of `state`, usable as `in_specs` / `out_specs`.
  """
  replicated = (REPLICATED, WORLD_SIZED)

  def spec(path, role, leaf):
    if role in replicated:
      return PartitionSpec()
    if jnp.ndim(leaf) == 0:
      raise ValueError(
        f"State leaf {jax.tree_util.keystr(path)} is per rank ({role}) but 0-d: a per-rank leaf is split over the "
        f"data axis {axis_name!r} (spec P({axis_name!r})), which needs at least one dimension. Store it with shape "
        f"(1,) per rank (global shape (P,)), as the optimizers of optax_lamb16 do for 0-d parameters."
      )
    return PartitionSpec(axis_name)

  return jax.tree_util.tree_map_with_path(spec, leaf_roles(state), state)


def local_view(params: Any, axis_name: str | tuple[str, ...]) -> Any:
  """Marks replicated params as per-rank values, so that `jax.grad` inside `shard_map` gives LOCAL gradients.

  Inside `shard_map`, the gradient with respect to a replicated (``P()``) input is summed over the axis by autodiff:
  a float32 all-reduce in the backward pass, the very exchange the 1-bit optimizers replace. Differentiate with
  respect to ``local_view(params, axis)`` instead to get this rank's own gradients::

      grads = jax.grad(loss)(optax_lamb16.local_view(params, "data"), batch)

  `axis_name` may be a tuple of mesh axes (a `comm.TwoLevel` grid's ``axis_names``).
  """
  axes = [comm_lib.MeshAxis(name) for name in ((axis_name,) if isinstance(axis_name, str) else axis_name)]

  def per_rank(p):
    for axis in axes:  # a tuple of axes (a `comm.TwoLevel` grid's): varying over each
      p = axis.per_rank(p)
    return p

  return jax.tree.map(per_rank, params)


def sharded_init(
  tx: optax.GradientTransformation, params: Any, mesh: Mesh, axis_name: str, param_specs: Any = _REPLICATED
) -> Any:
  """Runs `tx.init` inside `shard_map` and returns the global state, per-rank parts sharded over `axis_name`.

  Args:
    tx: A transformation whose `init` may need the bound axis (e.g. one using ``comm=axis_name``).
    params: Global params (replicated over `axis_name` by default).
    mesh: The device mesh.
    axis_name: The data-parallel axis of `mesh`.
    param_specs: `shard_map` specs of `params` (default: replicated).

  Returns:
    The global optimizer state; `state_partition_specs(state, axis_name)` gives its specs for the train step.
  """
  check_mesh_axes(mesh, axis_name, f"sharded_init: axis_name={axis_name!r}")
  return init_laid_out(tx.init, params, mesh, axis_name, param_specs)[0]


def check_mesh_axes(mesh: Mesh, axis_name: str | tuple[str, ...], given: str) -> None:
  """Raises a ValueError naming the first of `axis_name`'s axes that `mesh` lacks, and the mesh's axes; `given`
  says which argument named it."""
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  missing = [name for name in names if name not in mesh.axis_names]
  if missing:
    raise ValueError(
      f"{given} names axis {missing[0]!r}, which the mesh lacks (its axes: "
      f"{tuple(mesh.axis_names)}). Pass the mesh's data-parallel axis, as given to the optimizer's "
      f"`comm`."
    )


def init_laid_out(
  init_fn: Any,
  params: Any,
  mesh: Mesh,
  axis_name: str | tuple[str, ...],
  param_specs: Any,
  manual_axes: frozenset | None = None,
) -> tuple[Any, Any]:
  """``(state, specs)``: `init_fn(params)` run inside `shard_map` (manual over `manual_axes`, default all of the
  mesh's), its per-rank leaves sharded over `axis_name`, and the state's `shard_map` specs."""

  def shard_map(out_specs, check_vma=True):
    kwargs = {} if manual_axes is None else dict(axis_names=manual_axes)
    return jax.shard_map(
      init_fn, mesh=mesh, in_specs=(param_specs,), out_specs=out_specs, check_vma=check_vma, **kwargs
    )

  # Trace init once without output checks, only to learn the state's structure (and so its specs).
  specs = state_partition_specs(jax.eval_shape(shard_map(PartitionSpec(), check_vma=False), params), axis_name)
  return jax.jit(shard_map(specs))(params), specs
