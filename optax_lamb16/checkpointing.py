"""Exact resume with Orbax: every part of the optimizer state, per-rank error feedback included.

DeepSpeed drops the 1-bit optimizers' error-feedback buffers whenever it loads a checkpoint, so a resumed run is not
the run it continues. `Checkpointer` saves a whole training pytree (params, optimizer states, anything else) with
Orbax, per-rank leaves as the global arrays `sharded_init` lays out (each rank's part written by the process that
holds it), and records what it saved: the world size, and each leaf's path, shape and dtype. Restoring checks all of
it, so a run that saves at step k and continues in a new process is bitwise the run that never stopped.

A checkpoint written by P ranks cannot continue on Q != P ranks unchanged: the error buffers are split by rank and
their length depends on the world size. By default that is an error; ``on_world_size_change="reset_error_feedback"``
continues the way DeepSpeed always does: error feedback (and 1-bit LAMB's padding tail) from zero, every other
replicated leaf as saved, and other per-rank leaves (0/1 Adam's momentum and accumulated update, which differ
between ranks only between syncs) taken from rank 0.

Example:
  >>> import tempfile, jax.numpy as jnp, optax_lamb16
  >>> params = {"w": jnp.ones(3)}
  >>> tx = optax_lamb16.lamb16(1e-2)
  >>> state = tx.init(params)
  >>> with optax_lamb16.Checkpointer(tempfile.mkdtemp()) as checkpoints:
  ...   checkpoints.save(0, {"params": params, "opt_state": state}, world_size=1)
  ...   restored = checkpoints.restore({"params": params, "opt_state": state}, world_size=1)
  >>> restored["opt_state"].mu["w"].dtype
  dtype(float8_e4m3fn)
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from optax_lamb16 import sharding

FORMAT_VERSION = 1
ON_WORLD_SIZE_CHANGE = ("error", "reset_error_feedback")


def _describe(tree: Any) -> tuple[list[dict], Any]:
  """Each leaf's path, shape, dtype and role across ranks (tree-flatten order), and the treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  roles = jax.tree.leaves(sharding.leaf_roles(tree))
  return [{"path": jax.tree_util.keystr(path), "shape": list(jnp.shape(leaf)), "dtype": str(jnp.result_type(leaf)),
           "role": role} for (path, leaf), role in zip(leaves, roles)], treedef


def _split(leaves: list[Any], described: list[dict]) -> dict[str, dict[str, Any]]:
  """Leaves grouped into items, replicated ones and those laid out by world size, keyed by their flat index (paths
  are not file-name safe).

  Empty leaves (e.g. the error buffers of a single rank) carry no data and are left out: Orbax cannot store them.
  """
  items = {"replicated": {}, "by_world_size": {}}
  for index, (leaf, info) in enumerate(zip(leaves, described)):
    if math.prod(info["shape"]) == 0:
      continue
    items["replicated" if info["role"] == sharding.REPLICATED else "by_world_size"][f"{index:06d}"] = leaf
  return {name: item for name, item in items.items() if item}


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return leaf
  return jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf), sharding=getattr(leaf, "sharding", None))


class Checkpointer:
  """Saves and restores training pytrees with Orbax, checking world size and structure on restore.

  Args:
    directory: Where the checkpoints live (one subdirectory per step); shared by all processes of a job.
    max_to_keep: How many of the latest checkpoints to keep (None keeps all).

  Orbax writes each step to a temporary directory and renames it when complete, so a job killed while saving
  restarts from the last complete checkpoint. Every process of a `jax.distributed` job must call `save` and
  `restore` with the same arguments. With the MPI backend each process is its own JAX world holding only its own
  rank's state: give each rank its own directory (e.g. ``f"{root}/rank{rank}"``) and pass the MPI world size.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._manager.close()

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, tree: Any, *, world_size: int) -> None:
    """Saves `tree` (params, optimizer states, ...) as checkpoint `step`.

    Args:
      step: The training step the tree belongs to.
      tree: Any pytree of arrays; per-rank state leaves are global arrays sharded over the data axis, as
        `sharded_init` / `state_partition_specs` lay them out.
      world_size: The number of data-parallel ranks that produced the state.
    """
    described, _ = _describe(tree)
    items = _split(jax.tree.leaves(tree), described)
    meta = {"format": FORMAT_VERSION, "world_size": int(world_size), "leaves": described}
    self._manager.save(step, args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), **{name: ocp.args.StandardSave(item) for name, item in items.items()}))

  def restore(self, target: Any, *, world_size: int, step: int | None = None,
              on_world_size_change: str = "error") -> Any:
    """Restores checkpoint `step` (default: the latest) into the structure, shapes and shardings of `target`.

    Args:
      target: A pytree like the one saved: concrete arrays (e.g. a freshly initialised state) or
        `jax.ShapeDtypeStruct`s with shardings. Restored leaves take its shardings.
      world_size: The number of data-parallel ranks of this job.
      step: Which checkpoint; None for the latest.
      on_world_size_change: "error" (default) or "reset_error_feedback" (see the module docstring).

    Returns:
      The restored pytree, with the structure of `target`.

    Raises:
      FileNotFoundError: No checkpoint (at `step`).
      ValueError: The checkpoint's world size differs (and `on_world_size_change` is "error"), or its tree differs
        from `target` in structure, shape or dtype.
    """
    if on_world_size_change not in ON_WORLD_SIZE_CHANGE:
      raise ValueError(f"`on_world_size_change` must be one of {ON_WORLD_SIZE_CHANGE}, got {on_world_size_change!r}")
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in "
                              f"{self._manager.directory}")
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(f"checkpoint step {step} has format {meta.get('format')!r}; this version of optax_lamb16 "
                       f"reads format {FORMAT_VERSION}. Restore it with the version that wrote it.")
    described, treedef = _describe(target)
    resized = meta["world_size"] != world_size
    if resized and on_world_size_change == "error":
      raise ValueError(
          f"checkpoint step {step} was written by {meta['world_size']} data-parallel ranks, this job has "
          f"{world_size} (`world_size`). The error-feedback buffers are split by rank and cannot be re-split. Run "
          f"on {meta['world_size']} ranks, or pass `on_world_size_change=\"reset_error_feedback\"` to restart the "
          "error feedback from zero (as DeepSpeed does on every load) and keep everything else.")
    _check_same_leaves(meta["leaves"], described, ignore_per_rank_shapes=resized)

    targets = [_abstract(leaf) for leaf in jax.tree.leaves(target)]
    abstract = targets
    if resized:
      # Leaves laid out by world size come back whole and replicated, then are re-laid out for this world size.
      abstract = [leaf if info["role"] == sharding.REPLICATED else
                  jax.ShapeDtypeStruct(tuple(saved["shape"]), leaf.dtype, sharding=_replicated_like(leaf))
                  for leaf, info, saved in zip(targets, described, meta["leaves"])]
    wanted = _split(abstract, described)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.StandardRestore(item) for name, item in wanted.items()}))
    flat = {**restored.get("replicated", {}), **restored.get("by_world_size", {})}
    leaves = [flat[f"{index:06d}"] if f"{index:06d}" in flat else _zeros(target_leaf)
              for index, target_leaf in enumerate(targets)]
    if resized:
      leaves = [_relayout(leaf, target_leaf, info["role"], meta["world_size"], world_size)
                for leaf, target_leaf, info in zip(leaves, targets, described)]
    return jax.tree.unflatten(treedef, leaves)


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=target.sharding)()


def _replicated_like(leaf: jax.ShapeDtypeStruct):
  if isinstance(leaf.sharding, NamedSharding):
    return NamedSharding(leaf.sharding.mesh, PartitionSpec())
  return leaf.sharding


def _relayout(saved: jax.Array, target: jax.ShapeDtypeStruct, role: str, old_world: int, new_world: int) -> Any:
  """A per-rank leaf saved by `old_world` ranks, re-laid out for `new_world` (see the module docstring)."""
  if role == sharding.REPLICATED:
    return saved
  if role in (sharding.ERROR_FEEDBACK, sharding.WORLD_SIZED) or saved.size == 0:
    return _zeros(target)
  rank0 = lambda saved: jnp.concatenate([saved[: saved.shape[0] // old_world]] * new_world)
  return jax.jit(rank0, out_shardings=target.sharding)(saved)


def _check_same_leaves(saved: list[dict], wanted: list[dict], ignore_per_rank_shapes: bool) -> None:
  """Raises ValueError naming the first leaf whose path, shape, dtype or role differs."""
  if [leaf["path"] for leaf in saved] != [leaf["path"] for leaf in wanted]:
    missing = sorted({leaf["path"] for leaf in saved} ^ {leaf["path"] for leaf in wanted})
    raise ValueError(f"the checkpoint's tree differs from `target`: leaves only in one of them: {missing[:8]}. "
                     "Restore into the same structure (same optimizer and settings) that was saved.")
  for old, new in zip(saved, wanted):
    skip_shape = ignore_per_rank_shapes and new["role"] != sharding.REPLICATED
    if old["dtype"] != new["dtype"] or old["role"] != new["role"] or (old["shape"] != new["shape"] and not skip_shape):
      raise ValueError(f"checkpoint leaf {old['path']} is {old['dtype']}{old['shape']} ({old['role']}), `target` "
                       f"has {new['dtype']}{new['shape']} ({new['role']}). Restore into the tree that was saved.")
