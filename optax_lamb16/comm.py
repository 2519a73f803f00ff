"""How a communicating transform reaches the other data-parallel ranks.

Every communicating transform takes one argument, `comm`, turned into a `Communicator` by `as_communicator`:

- a string: the name of a mesh axis, for use inside `jax.shard_map` / `jax.pmap` (XLA collectives: NCCL on GPU,
  the CPU collectives in one process, gloo across `jax.distributed` processes);
- an mpi4py communicator (e.g. `MPI.COMM_WORLD`): mpi4jax collectives inside `jax.jit`, one device per process;
- `None`: a single device, every exchange is the identity;
- `TwoLevel(fast, slow)`: ranks on a grid of hosts (`slow`) by ranks per host (`fast`); the compressed exchange
  then reduces exactly inside each host and compresses only between hosts (Algorithms section 3b);
- any object implementing `Communicator` (its four members below; optionally ``per_rank(x)``, which marks a fresh
  per-rank buffer for `shard_map`'s type checks, as `MeshAxis.per_rank` does).

The maths (compressed all-reduce, the 1-bit optimizers) is written once against this interface; backends only move
bytes. All members are called inside a traced function; `size` must be a static Python int.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from optax_lamb16._rank_types import mark_varying

__all__ = [
  "Communicator",
  "as_communicator",
  "SingleDevice",
  "MeshAxis",
  "TwoLevel",
  "MPI",
  "SimulatedRanks",
  "world_size",
  "ranks_per_host",
]


@runtime_checkable
class Communicator(Protocol):
  """The small interface the compressed exchange and the 1-bit optimizers need."""

  @property
  def size(self) -> int:
    """Number of data-parallel ranks (a static Python int)."""

  def mean(self, x: jax.Array) -> jax.Array:
    """Exact mean of `x` over ranks (float32 arithmetic, float64 for float64 `x`), identical on every rank."""

  def all_to_all(self, x: jax.Array) -> jax.Array:
    """`x` has shape (size, ...): row i goes to rank i; returns (size, ...) whose row j came from rank j."""

  def all_gather(self, x: jax.Array) -> jax.Array:
    """Returns ``(size, *x.shape)``: row j is rank j's `x`, identical on every rank."""


class SingleDevice:
  """One rank: every exchange is the identity (`comm=None`)."""

  size = 1

  def mean(self, x):
    return x

  def all_to_all(self, x):
    return x

  def all_gather(self, x):
    return x[None]

  def __repr__(self):
    return "SingleDevice()"


class SimulatedRanks:
  """Rank 0 of `size` ranks that all hold the same values, on one device: every collective has the shapes and the
  results it would have in such a job, and nothing is sent.

  For measuring what a communicating transform computes (`benchmarks/exchange_compute.py`), and for building or
  checking the state of a P-rank job on one device. Use a real communicator to train.
  """

  def __init__(self, size: int):
    self.size = size

  def mean(self, x):
    return x

  def all_to_all(self, x):
    # Rank 0 receives row 0 of every rank, and every rank's row 0 is this one.
    return jnp.broadcast_to(x[:1], x.shape)

  def all_gather(self, x):
    return jnp.broadcast_to(x, (self.size, *x.shape))

  def __repr__(self):
    return f"SimulatedRanks({self.size})"


class MeshAxis:
  """XLA collectives over a named axis: a mesh axis inside `jax.shard_map` or `jax.pmap`, or a named `jax.vmap`
  axis (ranks simulated on one device, e.g. in tests and examples)."""

  def __init__(self, axis_name: str):
    self.axis_name = axis_name

  @property
  def size(self) -> int:
    try:
      return int(jax.lax.axis_size(self.axis_name))
    except NameError as error:
      raise ValueError(
        f"comm={self.axis_name!r} names a mesh axis that is not bound here. Call `init` and `update` inside "
        f"`jax.shard_map(..., mesh=mesh)` over a mesh with an axis {self.axis_name!r} (or `jax.pmap(..., "
        f"axis_name={self.axis_name!r})`); `optax_lamb16.data_parallel(loss_fn, tx, mesh, {self.axis_name!r})` "
        f"builds that step for you from plain `jax.jit` code. comm=None is for one device: under `jax.jit` with a "
        f"sharded batch it would train with a float32 all-reduce and no compression."
      ) from error

  def mean(self, x):
    return jax.lax.pmean(x, self.axis_name)

  def all_to_all(self, x):
    return jax.lax.all_to_all(x, self.axis_name, split_axis=0, concat_axis=0)

  def all_gather(self, x):
    # The gathered value is the same on every rank: mark it invariant so replicated outputs type-check.
    if not self._typed():
      return jax.lax.all_gather(x, self.axis_name)
    return jax.lax.all_gather(x, self.axis_name, to="invarying")

  def _typed(self) -> bool:
    """Whether values carry `shard_map`'s varying/invariant types over this axis (not under a named `jax.vmap`)."""
    return self.axis_name in jax.sharding.get_abstract_mesh().manual_axes

  def per_rank(self, x):
    # Per-rank buffers (zeros at init, replicated values that become per-rank) must be typed as varying over the
    # axis, like what they will hold.
    _ = self.size  # a clear error if the axis is not bound
    if not self._typed():
      return x  # a named `jax.vmap` axis: nothing to mark
    return mark_varying(x, (self.axis_name,))

  def __repr__(self):
    return f"MeshAxis({self.axis_name!r})"


class TwoLevel:
  """Data-parallel ranks on a grid: `slow` links the hosts, `fast` links the ranks of one host (NVLink, or the
  devices of one process). Rank ``(h, l)`` is rank ``h * L + l`` of the whole grid (hosts major, as the mesh spec
  ``P((slow, fast))`` lays it out).

  Exact collectives span all ranks. The compressed exchange (Algorithms section 3b) reduces exactly over `fast`,
  compresses only over `slow` and gathers over `fast` again: each rank compresses 1/L of the buffer, so the bytes
  that cross between hosts drop by another factor of L = `fast.size`.

  Args:
    fast: The ranks of one host: a mesh-axis name, an mpi4py communicator or a `Communicator`.
    slow: The hosts, one rank of each per `fast` index: the same kinds.

  Example (inside ``jax.shard_map`` over a mesh with axes ``("hosts", "local")``)::

      grid = optax_lamb16.comm.TwoLevel(fast="local", slow="hosts")
      tx = optax_lamb16.onebit_adam(1e-3, comm=grid, freeze_step=1000)
      specs = optax_lamb16.state_partition_specs(state, grid.axis_names)  # per-rank leaves: P(("hosts", "local"))
  """

  def __init__(self, fast: Any, slow: Any):
    if isinstance(fast, str) and fast == slow:
      raise ValueError(
        f"TwoLevel needs two different mesh axes, got fast=slow={fast!r}: `fast` names the axis of the "
        f"ranks inside a host, `slow` the axis of the hosts (e.g. fast='local', slow='hosts')."
      )
    self.fast, self.slow = as_communicator(fast), as_communicator(slow)

  @property
  def ranks_per_host(self) -> int:
    return world_size(self.fast)

  @property
  def size(self) -> int:
    return world_size(self.slow) * self.ranks_per_host

  @property
  def axis_names(self) -> tuple[str, str]:
    """``(slow, fast)`` mesh-axis names, for partition specs (both must be mesh axes)."""
    if not (isinstance(self.slow, MeshAxis) and isinstance(self.fast, MeshAxis)):
      raise ValueError(f"{self!r} is not made of two mesh axes, so it has no axis names for partition specs.")
    return self.slow.axis_name, self.fast.axis_name

  def mean(self, x):
    if isinstance(self.slow, MeshAxis) and isinstance(self.fast, MeshAxis):
      return jax.lax.pmean(x, self.axis_names)  # one collective over the whole grid
    return self.slow.mean(self.fast.mean(x))

  def all_to_all(self, x):
    hosts, local = world_size(self.slow), self.ranks_per_host
    grid = x.reshape(hosts, local, *x.shape[1:])
    # Rows for host h go there; then each host's rows for local rank l go there; the row order is the senders'.
    from_hosts = self.slow.all_to_all(grid)
    from_all = self.fast.all_to_all(jnp.swapaxes(from_hosts, 0, 1))
    return jnp.swapaxes(from_all, 0, 1).reshape(x.shape)

  def all_gather(self, x):
    return self.slow.all_gather(self.fast.all_gather(x)).reshape(self.size, *x.shape)

  def per_rank(self, x):
    for level in (self.fast, self.slow):
      if hasattr(level, "per_rank"):
        x = level.per_rank(x)
    return x

  def __repr__(self):
    return f"TwoLevel(fast={self.fast!r}, slow={self.slow!r})"


def ranks_per_host(comm: Communicator) -> int:
  """L of the compressed exchange's grid: `TwoLevel`'s ranks per host, 1 for every other communicator (each rank
  compresses the whole buffer)."""
  return comm.ranks_per_host if isinstance(comm, TwoLevel) else 1


# mpi4jax has no float16/bfloat16/float8 types: such payloads travel bitcast to unsigned integers of the same width.
_MPI_CARRIER = {1: jnp.uint8, 2: jnp.uint16}


def _to_mpi(x):
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize in _MPI_CARRIER:
    return jax.lax.bitcast_convert_type(x, _MPI_CARRIER[x.dtype.itemsize]), x.dtype
  return x, None


def _from_mpi(x, dtype):
  return x if dtype is None else jax.lax.bitcast_convert_type(x, dtype)


class MPI:
  """mpi4jax collectives over an mpi4py communicator; one JAX device per MPI process."""

  def __init__(self, comm: Any):
    self.comm = comm

  @property
  def size(self) -> int:
    return int(self.comm.Get_size())

  def mean(self, x):
    import mpi4jax
    from mpi4py import MPI as _MPI

    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"MPI.mean needs a floating array, got {x.dtype}")
    wide = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # mpi4jax has no float16 / bfloat16
    total = mpi4jax.allreduce(x.astype(wide), op=_MPI.SUM, comm=self.comm)
    return (total / self.size).astype(x.dtype)

  def all_to_all(self, x):
    import mpi4jax

    payload, dtype = _to_mpi(x)
    return _from_mpi(mpi4jax.alltoall(payload, comm=self.comm), dtype)

  def all_gather(self, x):
    import mpi4jax

    payload, dtype = _to_mpi(x)
    return _from_mpi(mpi4jax.allgather(payload, comm=self.comm), dtype)

  def __repr__(self):
    return f"MPI(size={self.size})"


def _is_mpi4py_comm(comm: Any) -> bool:
  module = type(comm).__module__ or ""
  return module.startswith("mpi4py") and hasattr(comm, "Get_size")


_BUILT_IN = (SingleDevice, SimulatedRanks, MeshAxis, TwoLevel, MPI)


def as_communicator(comm: Any) -> Communicator:
  """Turns the user-facing `comm` argument into a `Communicator` (see the module docstring)."""
  if isinstance(comm, _BUILT_IN):
    return comm
  if comm is None:
    return SingleDevice()
  if isinstance(comm, str):
    return MeshAxis(comm)
  if _is_mpi4py_comm(comm):
    return MPI(comm)
  if isinstance(comm, Communicator):
    return comm
  # Passing the mesh itself is an easy mistake: `comm` names its data-parallel axis instead.
  hint = (
    " For a `jax.sharding.Mesh`, pass the name of its data-parallel axis, e.g. comm='data'."
    if isinstance(comm, jax.sharding.Mesh)
    else ""
  )
  raise TypeError(
    f"`comm` must be a mesh-axis name (str), an mpi4py communicator, None (one device) or an object with `size`, "
    f"`mean`, `all_to_all` and `all_gather`; got {type(comm).__name__}: {comm!r}.{hint}"
  )


def world_size(comm: Communicator) -> int:
  """The communicator's size as a checked positive Python int."""
  size = comm.size
  if not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(
      f"`comm.size` must be a positive Python int (the static number of data-parallel ranks), got "
      f"{size!r} from {comm!r}. Make the communicator's `size` return an int."
    )
  return int(size)
