"""Exact resume with Orbax: every part of the optimizer state, per-rank error feedback included, checksummed.

DeepSpeed drops the 1-bit optimizers' error-feedback buffers whenever it loads a checkpoint, so a resumed run is not
the run it continues. `Checkpointer` saves a whole training pytree (params, optimizer states, anything else) with
Orbax, per-rank leaves as the global arrays `sharded_init` lays out (each rank's part written by the process that
holds it), and records what it saved: the world size, and each leaf's path, shape and dtype. Restoring checks all of
it, so a run that saves at step k and continues in a new process is bitwise the run that never stopped.

Damage. Orbax writes a step into a temporary directory and renames it when complete, so a kill during a save leaves
the previous checkpoint the latest. But Orbax does not notice changed bytes (a bit flip in a leaf's file restores
silently as other values), and a missing or cut-short file fails with an error that names no file. So the primary
process lists every file of the step with its size and SHA-256 (`MANIFEST`, written inside the temporary directory
before the rename, so it is part of the atomic commit), and `restore` verifies them all before reading anything: a
damaged checkpoint raises `DamagedCheckpointError` naming the step and the file, or, with ``fallback=True``, the
newest intact older checkpoint is restored instead, with a warning that says which. Verifying reads every byte of the
checkpoint once (each of the job's processes a share of the files): about as long as the restore itself.

A checkpoint written by P ranks cannot continue on Q != P ranks unchanged: the error buffers are split by rank and
their length depends on the world size. By default that is an error; ``on_world_size_change="reset_error_feedback"``
continues the way DeepSpeed always does: error feedback (and 1-bit LAMB's padding tail) from zero, every other
replicated leaf as saved, and other per-rank leaves (0/1 Adam's momentum and accumulated update, which differ
between ranks only between syncs) taken from rank 0. Per-rank leaves are laid out rank by rank along their first
axis (a 0-d per-rank leaf is one value, taken as saved); `target`'s must be laid out for `world_size` ranks. The
same option restores a checkpoint whose error buffers are laid out otherwise than `target`'s, everything else being
the same (one written before the worker error was kept by groups of leaves): error feedback from zero, the rest as
saved.

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

import asyncio
import hashlib
import json
import logging
import math
import os
import pathlib
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from optax_lamb16 import _sharding as sharding

FORMAT_VERSION = 2
ON_WORLD_SIZE_CHANGE = ("error", "reset_error_feedback")
# In each step directory: every file of the checkpoint with its size and SHA-256.
MANIFEST = "optax_lamb16_manifest.json"
# Top-level files of a step that Orbax writes or rewrites while committing it, after the manifest.
_UNLISTED = (MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")
_DAMAGED_SUFFIX = ".damaged"

_log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
  """A checkpoint's files are missing, cut short or changed since they were saved.

  Attributes:
    step: The checkpoint's step.
    path: The damaged file (or directory).
  """

  def __init__(self, step: int, path: str | os.PathLike, problem: str):
    self.step, self.path, self.problem = step, str(path), problem
    super().__init__(
      f"checkpoint step {step} is damaged: {path} {problem}. Nothing was restored from it. Restore "
      "an older step (`step=`), or pass `fallback=True` to restore the newest intact checkpoint."
    )


class CheckpointFallbackWarning(UserWarning):
  """`Checkpointer.restore(..., fallback=True)` skipped damaged checkpoints and restored an older one."""


# -- the file manifest ------------------------------------------------------------------------------------------------


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def _listed_files(step_dir: pathlib.Path) -> list[str]:
  files = (p for p in step_dir.rglob("*") if p.is_file())
  return sorted(rel for rel in (p.relative_to(step_dir).as_posix() for p in files) if rel not in _UNLISTED)


def _files_digest(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(step_dir: str | os.PathLike) -> None:
  """Writes `MANIFEST` into `step_dir`: each file's size and SHA-256, and a checksum of that list."""
  step_dir = pathlib.Path(step_dir)
  files = {
    rel: {"bytes": (step_dir / rel).stat().st_size, "sha256": _sha256(step_dir / rel)}
    for rel in _listed_files(step_dir)
  }
  with open(step_dir / MANIFEST, "w") as f:
    json.dump({"format": 1, "files": files, "sha256": _files_digest(files)}, f)
    f.flush()
    os.fsync(f.fileno())


def _read_manifest(step: int, step_dir: pathlib.Path) -> dict:
  path = step_dir / MANIFEST
  if not path.is_file():
    raise DamagedCheckpointError(
      step,
      path,
      "is missing (it lists every file's checksum; a checkpoint written by "
      "optax_lamb16 before format 2 has none and cannot be verified)",
    )
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    intact = manifest["sha256"] == _files_digest(files)
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
    raise DamagedCheckpointError(step, path, f"cannot be read ({error})") from None
  if not intact:
    raise DamagedCheckpointError(step, path, "does not match its own checksum (bytes changed)")
  return files


_MISSING, _CUT, _CHANGED = 1, 2, 3


def _check_file(path: pathlib.Path, entry: dict) -> int:
  if not path.is_file():
    return _MISSING
  if path.stat().st_size != entry["bytes"]:
    return _CUT
  return _CHANGED if _sha256(path) != entry["sha256"] else 0


def _problem(code: int, path: pathlib.Path, entry: dict) -> str:
  if code == _MISSING:
    return "is missing"
  if code == _CUT:
    size = path.stat().st_size if path.is_file() else 0
    return f"has {size} bytes, {entry['bytes']} were saved (cut short or overwritten)"
  return "does not match the SHA-256 checksum written at save time (bytes changed)"


def verify_step_directory(step: int, step_dir: str | os.PathLike) -> list[DamagedCheckpointError]:
  """What is damaged in the files of checkpoint `step`, in `step_dir` (empty if intact).

  Raises:
    DamagedCheckpointError: The manifest itself is missing or damaged.
  """
  step_dir = pathlib.Path(step_dir)
  files = _read_manifest(step, step_dir)
  return _errors(step, step_dir, files, _share_codes(step_dir, files, 0, 1))


def _share_codes(step_dir: pathlib.Path, files: dict, process_index: int, process_count: int) -> np.ndarray:
  """Per file (sorted): 0 if intact, else what is wrong; only files i with i % process_count == process_index."""
  codes = np.zeros(len(files), np.int32)
  for i, (rel, entry) in enumerate(sorted(files.items())):
    if i % process_count == process_index:
      codes[i] = _check_file(step_dir / rel, entry)
  return codes


def _errors(step: int, step_dir: pathlib.Path, files: dict, codes: np.ndarray) -> list[DamagedCheckpointError]:
  return [
    DamagedCheckpointError(step, step_dir / rel, _problem(int(code), step_dir / rel, entry))
    for (rel, entry), code in zip(sorted(files.items()), codes)
    if code
  ]


def step_directories(directory: str | os.PathLike) -> dict[int, pathlib.Path]:
  """The complete (committed) checkpoint steps in `directory` and their directories; no JAX, no Orbax needed."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()}


def newest_intact_step(directory: str | os.PathLike) -> tuple[int | None, list[DamagedCheckpointError]]:
  """The newest checkpoint step in `directory` whose files verify (None if none), and what was damaged in newer
  ones. Reads every file of the steps it checks; needs neither JAX's devices nor a `Checkpointer` (a launcher can
  call it to say where the same command will resume)."""
  damaged = []
  for step, step_dir in sorted(step_directories(directory).items(), reverse=True):
    try:
      problems = verify_step_directory(step, step_dir)
    except DamagedCheckpointError as error:
      problems = [error]
    if not problems:
      return step, damaged
    damaged.append(problems[0])
  return None, damaged


class _ChecksummedTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, with the file manifest written into a step's temporary directory just before it (Orbax
  finalizes each item's directory inside the step's first, with the same class: those need none)."""

  async def finalize(self, *args, **kwargs):
    if self.get_final().name.isdigit():
      await asyncio.to_thread(write_manifest, pathlib.Path(self.get()))
    await super().finalize(*args, **kwargs)


# -- the tree ----------------------------------------------------------------------------------------------------------


def _describe(tree: Any) -> tuple[list[dict], Any]:
  """Each leaf's path, shape, dtype and role across ranks (tree-flatten order), and the treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  roles = jax.tree.leaves(sharding.leaf_roles(tree))
  return [
    {
      "path": jax.tree_util.keystr(path),
      "shape": list(jnp.shape(leaf)),
      "dtype": str(jnp.result_type(leaf)),
      "role": role,
    }
    for (path, leaf), role in zip(leaves, roles)
  ], treedef


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
  """Saves and restores training pytrees with Orbax, checksummed, checking world size and structure on restore.

  Args:
    directory: Where the checkpoints live (one subdirectory per step); shared by all processes of a job.
    max_to_keep: How many of the latest checkpoints to keep (None keeps all). Keep at least 2 to be able to fall
      back from a damaged latest one.

  Orbax writes each step to a temporary directory and renames it when complete, so a job killed while saving
  restarts from the last complete checkpoint (leftover temporary directories are removed when a `Checkpointer` is
  created). Every process of a `jax.distributed` job must call `save` and `restore` with the same arguments. With
  the MPI backend each process is its own JAX world holding only its own rank's state: give each rank its own
  directory (e.g. ``f"{root}/rank{rank}"``) and pass the MPI world size.

  Attributes:
    restored_step: The step the last `restore` restored (with ``fallback=True``, maybe older than asked), or None.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      enable_async_checkpointing=False,
      create=True,
      cleanup_tmp_directories=True,
      temporary_path_class=_ChecksummedTemporaryPath,
    )
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
    self._directory = pathlib.Path(os.path.abspath(directory))
    self.restored_step: int | None = None

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    self._manager.close()

  def latest_step(self) -> int | None:
    """The newest (highest) step of a complete checkpoint, or None (not verified: `restore` verifies)."""
    return max(self._manager.all_steps(), default=None)

  def all_steps(self) -> list[int]:
    """The steps of the complete checkpoints, in increasing order."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, tree: Any, *, world_size: int) -> None:
    """Saves `tree` (params, optimizer states, ...) as checkpoint `step`, with the checksums of its files.

    Args:
      step: The training step the tree belongs to.
      tree: Any pytree of arrays; per-rank state leaves are global arrays sharded over the data axis, as
        `sharded_init` / `state_partition_specs` lay them out.
      world_size: The number of data-parallel ranks that produced the state.

    A step older than the newest one (after restoring an older checkpoint) is saved too, never skipped; with
    `max_to_keep`, the checkpoints saved longest ago are the ones dropped.

    Raises:
      ValueError: A checkpoint of `step` exists already.
    """
    if step in self._manager.all_steps():
      raise ValueError(f"checkpoint step {step} exists already in {self._directory}; delete it or save another step.")
    described, _ = _describe(tree)
    items = _split(jax.tree.leaves(tree), described)
    meta = {"format": FORMAT_VERSION, "world_size": int(world_size), "leaves": described}
    # force: Orbax would otherwise skip (silently) any step older than its latest one.
    saved = self._manager.save(
      step,
      force=True,
      args=ocp.args.Composite(
        meta=ocp.args.JsonSave(meta), **{name: ocp.args.StandardSave(item) for name, item in items.items()}
      ),
    )
    if not saved:
      raise RuntimeError(f"Orbax did not save checkpoint step {step} in {self._directory}")

  def verify(self, step: int | None = None) -> None:
    """Checks every file of checkpoint `step` (default: the latest) against its saved size and SHA-256.

    Raises:
      FileNotFoundError: No checkpoint (at `step`).
      DamagedCheckpointError: A file is missing, cut short or changed (it names the step and the file).
    """
    step = self._existing_step(step)
    problems = self._verify(step)
    if problems:
      raise problems[0]

  def restore(
    self,
    target: Any,
    *,
    world_size: int,
    step: int | None = None,
    on_world_size_change: str = "error",
    fallback: bool = False,
  ) -> Any:
    """Restores checkpoint `step` (default: the latest) into the structure, shapes and shardings of `target`.

    Every file is verified against its checksum first; nothing is read from a damaged checkpoint.

    Args:
      target: A pytree like the one saved: concrete arrays (e.g. a freshly initialised state) or
        ``jax.ShapeDtypeStruct`` leaves with shardings. Restored leaves take its shardings.
      world_size: The number of data-parallel ranks of this job.
      step: Which checkpoint; None for the latest.
      on_world_size_change: "error" (default) or "reset_error_feedback" (see the module docstring).
      fallback: If the checkpoint is damaged, restore the newest intact one before it instead, warn
        (`CheckpointFallbackWarning`, and the log) which steps were skipped and why, and move the damaged newer
        ones aside (renamed ``<step>.damaged``, not deleted) so that training can save those steps again.
        `restored_step` says which step was restored.

    Returns:
      The restored pytree, with the structure of `target`.

    Raises:
      FileNotFoundError: No checkpoint (at `step`).
      DamagedCheckpointError: The checkpoint is damaged (without `fallback`; with it: every candidate is). It names
        the step and the file.
      ValueError: The checkpoint's world size differs (and `on_world_size_change` is "error"), or its tree differs
        from `target` in structure, shape or dtype, or `target`'s per-rank leaves are not laid out for
        `world_size` ranks.
    """
    if on_world_size_change not in ON_WORLD_SIZE_CHANGE:
      raise ValueError(f"`on_world_size_change` must be one of {ON_WORLD_SIZE_CHANGE}, got {on_world_size_change!r}")
    step = self._existing_step(step)
    candidates = sorted((s for s in self._manager.all_steps() if s <= step), reverse=True) if fallback else [step]
    skipped = []
    for candidate in candidates:
      try:
        restored = self._restore_step(candidate, target, world_size, on_world_size_change)
      except DamagedCheckpointError as error:
        if not fallback:
          raise
        skipped.append(error)
        _log.warning("%s", error)
        continue
      if skipped:
        self._set_aside(skipped, candidate)
      self.restored_step = candidate
      return restored
    raise DamagedCheckpointError(
      step,
      self._directory,
      "holds no intact checkpoint at or before this step: " + "; ".join(str(error) for error in skipped),
    )

  def _existing_step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint{'' if step is None else f' at step {step}'} in {self._directory}")
    return step

  def _verify(self, step: int) -> list[DamagedCheckpointError]:
    """Verifies step `step`'s files, each process a share of them; every process gets the same answer."""
    step_dir = self._directory / str(step)
    files = _read_manifest(step, step_dir)
    codes = _share_codes(step_dir, files, jax.process_index(), jax.process_count())
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      codes = np.asarray(multihost_utils.process_allgather(codes)).max(axis=0)
    return _errors(step, step_dir, files, codes)

  def _set_aside(self, skipped: list[DamagedCheckpointError], restored: int) -> None:
    newer = sorted({error.step for error in skipped if error.step > restored})
    message = f"restored checkpoint step {restored} of {self._directory}, the newest intact one: skipped " + "; ".join(
      f"step {error.step} ({error.path} {error.problem})" for error in skipped
    )
    if newer:
      message += f". Moved the damaged newer steps {newer} aside (renamed <step>{_DAMAGED_SUFFIX})"
      if jax.process_index() == 0:
        for s in newer:
          aside = self._directory / f"{s}{_DAMAGED_SUFFIX}"
          while aside.exists():
            aside = aside.with_name(aside.name + _DAMAGED_SUFFIX)
          (self._directory / str(s)).rename(aside)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"optax_lamb16 set aside {newer}")
      self._manager.reload()
    _log.warning("%s", message)
    warnings.warn(message, CheckpointFallbackWarning, stacklevel=3)

  def _restore_step(self, step: int, target: Any, world_size: int, on_world_size_change: str) -> Any:
    problems = self._verify(step)
    if problems:
      raise problems[0]
    meta = self._read(step, {"meta": ocp.args.JsonRestore()})["meta"]
    if meta.get("format") != FORMAT_VERSION:
      raise ValueError(
        f"checkpoint step {step} has format {meta.get('format')!r}; this version of optax_lamb16 "
        f"reads format {FORMAT_VERSION}. Restore it with the version that wrote it."
      )
    described, treedef = _describe(target)
    old_world = meta["world_size"]
    resized = old_world != world_size
    if resized and on_world_size_change == "error":
      raise ValueError(
        f"checkpoint step {step} was written by {old_world} data-parallel ranks, this job has "
        f"{world_size} (`world_size`). The error-feedback buffers are split by rank and cannot be re-split. Run "
        f'on {old_world} ranks, or pass `on_world_size_change="reset_error_feedback"` to restart the '
        "error feedback from zero (as DeepSpeed does on every load) and keep everything else."
      )
    saved = meta["leaves"]
    # Error buffers laid out otherwise than `target`'s (and only they) restart from zero; every other leaf is matched
    # with its saved counterpart, in order.
    relaid = _error_feedback_relaid(saved, described, resized)
    restarts = lambda info: relaid and info["role"] == sharding.ERROR_FEEDBACK
    kept_saved = [i for i, info in enumerate(saved) if not restarts(info)]
    kept = [i for i, info in enumerate(described) if not restarts(info)]
    _check_same_leaves([saved[i] for i in kept_saved], [described[i] for i in kept], old_world, world_size)
    if relaid:
      if on_world_size_change == "error":
        raise ValueError(
          f"checkpoint step {step} holds its error-feedback buffers in another layout than `target` (e.g. one "
          f"written by an earlier optax_lamb16, which kept each rank's worker error as one buffer); everything "
          f'else matches. Pass `on_world_size_change="reset_error_feedback"` to restart the error feedback from '
          f"zero (as DeepSpeed does on every load) and keep everything else."
        )
      _check_laid_out_for(described, world_size, sharding.ERROR_FEEDBACK)
    source = dict(zip(kept, kept_saved))  # target leaf -> the saved leaf it is restored from

    targets = [_abstract(leaf) for leaf in jax.tree.leaves(target)]
    abstract = targets
    if resized:
      # Leaves laid out by world size come back whole and replicated, then are re-laid out for this world size.
      abstract = [
        leaf
        if info["role"] == sharding.REPLICATED or i not in source
        else jax.ShapeDtypeStruct(tuple(saved[source[i]]["shape"]), leaf.dtype, sharding=_replicated_like(leaf))
        for i, (leaf, info) in enumerate(zip(targets, described))
      ]
    # Saved error buffers laid out otherwise are read all the same (Orbax reads whole items here), then dropped: split
    # over the ranks as the target's error buffers are, where the world size is the same.
    by_saved_index = [None] * len(saved)
    for i, j in source.items():
      by_saved_index[j] = abstract[i]
    over_ranks, whole = _dropped_shardings(targets, described, resized)
    by_saved_index = [
      jax.ShapeDtypeStruct(tuple(info["shape"]), info["dtype"], sharding=over_ranks if info["shape"] else whole)
      if leaf is None
      else leaf
      for leaf, info in zip(by_saved_index, saved)
    ]
    wanted = _split(by_saved_index, saved)
    restored = self._read(step, {name: ocp.args.StandardRestore(item) for name, item in wanted.items()})
    flat = {**restored.get("replicated", {}), **restored.get("by_world_size", {})}
    leaves = [
      flat[f"{source[i]:06d}"] if i in source and f"{source[i]:06d}" in flat else _zeros(target_leaf)
      for i, target_leaf in enumerate(targets)
    ]
    if resized:
      leaves = [
        _relayout(leaf, target_leaf, info["role"], old_world, world_size)
        for leaf, target_leaf, info in zip(leaves, targets, described)
      ]
    return jax.tree.unflatten(treedef, leaves)

  def _read(self, step: int, items: dict) -> Any:
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # verified files that Orbax still cannot read: damaged all the same
      raise DamagedCheckpointError(
        step, self._directory / str(step), f"could not be read by Orbax ({type(error).__name__}: {str(error)[:500]})"
      ) from error


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
  return jax.jit(lambda: jnp.zeros(target.shape, target.dtype), out_shardings=target.sharding)()


def _dropped_shardings(targets: list[jax.ShapeDtypeStruct], described: list[dict], resized: bool) -> tuple[Any, Any]:
  """Where to read the saved leaves that no target leaf takes (error buffers of another layout): (for those with a
  first axis, for 0-d ones). Over the ranks like the target's first error buffer at the same world size (each
  device one rank's block), replicated otherwise."""
  if not targets:
    return None, None
  whole = _replicated_like(targets[0])
  like = next((t for t, d in zip(targets, described) if d["role"] == sharding.ERROR_FEEDBACK and d["shape"]), None)
  if not resized and like is not None and isinstance(like.sharding, NamedSharding):
    return like.sharding, whole
  return whole, whole


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
  if saved.ndim == 0:  # one value, no ranks to pick from
    return jax.device_put(saved, target.sharding) if target.sharding is not None else saved
  block = saved.shape[0] // old_world
  rank0 = lambda saved: jnp.concatenate([saved[:block]] * new_world)
  return jax.jit(rank0, out_shardings=target.sharding)(saved)


def _per_rank_shape_problem(
  saved: list[int], wanted: list[int], role: str, old_world: int, new_world: int
) -> str | None:
  """Why a per-rank leaf saved with shape `saved` by `old_world` ranks cannot be restored into `wanted` for
  `new_world` ranks (None if it can). Per-rank leaves hold their ranks' blocks one after another on axis 0."""
  if role == sharding.REPLICATED or old_world == new_world:
    return None if saved == wanted else "differs"
  if len(saved) != len(wanted):
    return "has another rank"
  if not wanted or role == sharding.WORLD_SIZED:  # 0-d: one value; world-sized leaves restart from zero
    return None
  if wanted[0] % new_world:
    return _not_laid_out_for(new_world)
  if role == sharding.PER_RANK:
    block = saved[0] // old_world
    if saved[0] % old_world or [block * new_world, *saved[1:]] != wanted:
      return (
        f"does not hold {new_world} blocks of the saved per-rank shape {[block, *saved[1:]]} (`world_size` "
        f"is {new_world})"
      )
  return None


def _not_laid_out_for(world_size: int) -> str:
  return f"is not laid out for {world_size} ranks (`world_size`): its first axis does not split into {world_size}"


def _error_feedback_relaid(saved: list[dict], wanted: list[dict], resized: bool) -> bool:
  """Whether the two trees' error-feedback leaves are laid out otherwise (other paths; or other shapes at the same
  world size, where shapes cannot change) while their other leaves have the same paths, dtypes and roles (their
  shapes are checked leaf by leaf)."""
  error_feedback = lambda leaves, key: [key(leaf) for leaf in leaves if leaf["role"] == sharding.ERROR_FEEDBACK]
  others = lambda leaves: [
    (leaf["path"], leaf["dtype"], leaf["role"]) for leaf in leaves if leaf["role"] != sharding.ERROR_FEEDBACK
  ]
  path = lambda leaf: leaf["path"]
  path_and_shape = lambda leaf: (leaf["path"], leaf["shape"])
  moved = error_feedback(saved, path) != error_feedback(wanted, path) or (
    not resized and error_feedback(saved, path_and_shape) != error_feedback(wanted, path_and_shape)
  )
  return moved and others(saved) == others(wanted)


def _check_laid_out_for(described: list[dict], world_size: int, role: str) -> None:
  """Raises ValueError naming the first leaf of `role` in `described` (the target) whose first axis does not split
  into `world_size` ranks' blocks."""
  for leaf in described:
    if leaf["role"] == role and leaf["shape"] and leaf["shape"][0] % world_size:
      raise ValueError(
        f"`target` leaf {leaf['path']} is {leaf['dtype']}{leaf['shape']} ({role}): it "
        f"{_not_laid_out_for(world_size)}. "
        f"Restore into a tree laid out for `world_size` ranks."
      )


def _check_same_leaves(saved: list[dict], wanted: list[dict], old_world: int, new_world: int) -> None:
  """Raises ValueError naming the first leaf whose path, shape, dtype or role differs; per-rank leaves of a
  resized restore must hold the saved per-rank blocks laid out for the new world size."""
  if [leaf["path"] for leaf in saved] != [leaf["path"] for leaf in wanted]:
    missing = sorted({leaf["path"] for leaf in saved} ^ {leaf["path"] for leaf in wanted})
    raise ValueError(
      f"the checkpoint's tree differs from `target`: leaves only in one of them: {missing[:8]}. "
      "Restore into the same structure (same optimizer and settings) that was saved."
    )
  for old, new in zip(saved, wanted):
    problem = None
    if old["dtype"] != new["dtype"] or old["role"] != new["role"]:
      problem = "differs"
    else:
      problem = _per_rank_shape_problem(old["shape"], new["shape"], new["role"], old_world, new_world)
    if problem:
      raise ValueError(
        f"checkpoint leaf {old['path']} is {old['dtype']}{old['shape']} ({old['role']}, saved by "
        f"{old_world} ranks), `target` has {new['dtype']}{new['shape']} ({new['role']}): it "
        f"{problem}. Restore into the tree that was saved, laid out for `world_size` ranks."
      )
