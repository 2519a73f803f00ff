"""The error-feedback 1-bit compressed all-reduce (SPEC.md section 3), backend-agnostic: the algorithm only.

Each rank adds its worker error to its input, sends one sign bit per element (plus one float32 scale) in an
all-to-all, averages the chunk it owns ("server" step, with its own error feedback), and all-gathers the server
signs and scales. Every rank decodes the same bytes, so the result is bitwise identical everywhere. A whole pytree
travels as ONE flat buffer (leaves in tree-flatten order): one all-to-all and one all-gather per call, the
scales riding with the sign bytes. Over a `comm.TwoLevel` grid of H hosts by L ranks (SPEC.md section 3b) the
buffer is first averaged exactly inside each host, each rank compresses its 1/L shard among the hosts only, and the
ranks of each host gather the shards' sign bits and scales. `exchange` stops there and hands out that `SignPayload`
(1/32 of the decoded floats), so that a caller can decode it inside its own fused pass (`decode_like`);
`compressed_allreduce` is the two together.

Bytes sent per rank and call: about ``2 (P-1)/P * N_pad / 8`` plus O(P) scale bytes, 1/32 of a float32 ring
all-reduce. The error buffers are per-rank state: never replicate or average them (see `sharding`).

All arithmetic and every payload is float32 (SPEC.md). Leaves of lower precision (bfloat16, float16) are widened
and the results cast back; float64 leaves (possible only with ``jax_enable_x64``) are rejected with a TypeError
rather than silently rounded to float32. The optax transforms built on this exchange (`compressed_mean`,
`uncompressed_mean`) live in `gradient_mean`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lamb16 import _checks, comm as comm_lib


class CompressedAllReduceState(NamedTuple):
  """Per-rank error feedback of the compressed all-reduce (zeros at the start).

  Attributes:
    worker_error: float32 (N_pad,), what this rank's sign compression left out so far.
    server_error: float32 (N_pad / P,), what the compression of the chunk this rank averages left out so far.
  With one rank (or an empty input) both are empty: the exchange is the identity.
  """
  worker_error: jax.Array
  server_error: jax.Array

  # Fields that differ per rank (read by `sharding.state_partition_specs`).
  PER_RANK_FIELDS = ("worker_error", "server_error")


def padded_length(n: int, world_size: int, ranks_per_host: int = 1) -> int:
  """N rounded up to a multiple of ``L * H * lcm(H, 8)`` for H = world_size / L hosts of L = `ranks_per_host`
  ranks (SPEC.md sections 3 and 3b), so that each of the L shards splits into H chunks of whole bytes. With L = 1
  (every rank its own host) that is ``P * lcm(P, 8)``."""
  if world_size == 1:
    return n
  hosts = world_size // ranks_per_host
  quantum = ranks_per_host * hosts * math.lcm(hosts, 8)
  return -(-n // quantum) * quantum


def check_leaves(name: str, tree: Any) -> None:
  """Raises TypeError unless every leaf of `tree` is a real floating array that the float32 exchange represents:
  float64 leaves (``jax_enable_x64``) would be rounded to float32 without a word, so they are rejected."""
  _checks.check_float_leaves(name, tree)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jax.dtypes.canonicalize_dtype(leaf.dtype) == jnp.float64:
      raise TypeError(
          f"`{name}` leaf {jax.tree_util.keystr(path) or '<root>'} is float64, but the 1-bit exchange and "
          f"optimizers compute and communicate in float32 (SPEC.md), so its extra precision would be lost silently. "
          f"Cast it to float32 (e.g. `jax.tree.map(lambda x: x.astype(jnp.float32), tree)`), or keep it out of "
          f"the optimizer with `optax.masked` / `optax.partition`.")


def tree_size(tree: Any) -> int:
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def error_buffer_lengths(n: int, world: int, ranks_per_host: int = 1) -> tuple[int, int]:
  """Lengths of (worker_error, server_error) for exchanging `n` elements among `world` ranks, `ranks_per_host` to a
  host: each rank compresses a shard of ``N_pad / L`` elements among the H hosts (both empty where H is 1)."""
  hosts = world // ranks_per_host
  if hosts == 1:
    return 0, 0
  shard = padded_length(n, world, ranks_per_host) // ranks_per_host
  return shard, shard // hosts


def init_compressed_allreduce(tree_or_length: Any, comm: Any) -> CompressedAllReduceState:
  """Zero error buffers for exchanging `tree_or_length` (a pytree, abstract shapes fine, or an element count).

  Call it where `comm` is usable (inside `shard_map` for a mesh-axis name).
  """
  communicator = comm_lib.as_communicator(comm)
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  if isinstance(tree_or_length, (int, np.integer)):
    if tree_or_length < 0:
      raise ValueError(f"`tree_or_length` must be a pytree or a non-negative element count, got {tree_or_length}.")
    n, axes = int(tree_or_length), ()
  else:
    check_leaves("tree_or_length", tree_or_length)
    # Varying over the data axis, and over the other axes the tree varies over (a "model" axis that shards it).
    n, axes = tree_size(tree_or_length), comm_lib.other_axes(communicator, tree_or_length)
  zeros = lambda length: comm_lib.mark_varying(
      comm_lib.mark_per_rank(communicator, jnp.zeros([length], jnp.float32)), axes)
  return CompressedAllReduceState(*(zeros(length) for length in error_buffer_lengths(n, world, local)))


def check_state(state: CompressedAllReduceState, n: int, world: int, ranks_per_host: int = 1) -> None:
  """Raises ValueError unless `state` holds the error buffers of an `n`-element exchange at world size `world`
  (`ranks_per_host` to a host).

  A state made for another world size (e.g. restored from a run on a different number of ranks) or for another
  model would otherwise mix up error feedback silently, or fail later with an error that names no argument.
  """
  n_pad, chunk = error_buffer_lengths(n, world, ranks_per_host)
  expected = ((n_pad,), (chunk,))
  got = (jnp.shape(state.worker_error), jnp.shape(state.server_error))
  if got == expected:
    return
  made_for = ""
  grid = f" ({world // ranks_per_host} hosts of {ranks_per_host} ranks)" if ranks_per_host > 1 else ""
  if got == ((0,), (0,)):
    made_for = " (it looks made for 1 rank, e.g. comm=None)"
  elif ranks_per_host == 1 and len(got[0]) == 1 and len(got[1]) == 1 and got[1][0] and got[0][0] % got[1][0] == 0:
    ranks = got[0][0] // got[1][0]
    if ranks != world:
      made_for = f" (it looks made for {ranks} ranks)"
    elif got[0][0] == world * n_pad:
      made_for = (" (these look like the global arrays of all ranks: give each rank its own part, with the specs "
                  "of `state_partition_specs`)")
  raise ValueError(
      f"The compressed all-reduce state does not fit: its error buffers (worker_error, server_error) have shapes "
      f"{got[0]} and {got[1]}, but {n} elements at world size {world}{grid} need {expected[0]} and {expected[1]}"
      f"{made_for}. The state was made for another world size or another model: re-create it with `init` (the "
      f"optimizer's, or `init_compressed_allreduce`) where `comm` spans the current ranks. This restarts the error "
      f"feedback from zero, as DeepSpeed does on every checkpoint load.")


def signs(x: jax.Array) -> jax.Array:
  """sgn(x): +1 where x >= 0 (and where x is NaN, as DeepSpeed's ``sign().add(1).bool()``), -1 elsewhere."""
  return jnp.where(x < 0, -1.0, 1.0).astype(jnp.float32)


def pack_signs(x: jax.Array) -> jax.Array:
  """One bit per element, 1 for sgn(x) = +1, eight to a byte, most significant bit first."""
  return jnp.packbits(jnp.logical_not(x < 0), axis=-1, bitorder="big")


def unpack_signs(packed: jax.Array) -> jax.Array:
  """Inverse of `pack_signs`: uint8 (..., n/8) -> float32 ±1 (..., n)."""
  return jnp.unpackbits(packed, axis=-1, bitorder="big").astype(jnp.float32) * 2.0 - 1.0


def _empty_result(tree: Any) -> Any:
  """Fresh empty arrays like `tree`'s: an exchange's output is replicated (typed invariant inside `shard_map`), and so
  must an empty one be, or `lax.cond` / `scan` reject the mismatch with the non-empty branches and carries."""
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), x.dtype), tree)


def _with_scale(packed: jax.Array, scale: jax.Array) -> jax.Array:
  """Appends the float32 `scale`'s 4 bytes (one scale for all rows, or one per row) to each row of `packed` (uint8
  (..., n)), so that the scales travel in the same collective as the sign bytes: an exact bitcast, one round fewer
  per phase."""
  scale_bytes = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint8)
  return jnp.concatenate([packed, jnp.broadcast_to(scale_bytes, (*packed.shape[:-1], 4))], axis=-1)


def _split_scale(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of `_with_scale` on received rows: (sign bytes (P, n), float32 scales (P,))."""
  return rows[:, :-4], jax.lax.bitcast_convert_type(rows[:, -4:], jnp.float32)


def _rms(x: jax.Array) -> jax.Array:
  return jnp.linalg.norm(x) / jnp.sqrt(jnp.float32(x.size))


class SignPayload(NamedTuple):
  """What every rank holds after the exchange, before decoding: each server chunk's sign bits and scale.

  Attributes:
    bits: uint8 (R, C / 8), chunk r's sign bits (most significant bit first), chunks in buffer order.
    scales: float32 (R,), chunk r's server scale.
  The decoded buffer is ``scales[r] * sgn`` over chunk r (`decode`): 1/32 of its size, so an exchange that runs
  under a `lax.cond` or loop can hand it out cheaply and leave the decoding to the fused consumer.
  """
  bits: jax.Array
  scales: jax.Array


def decode(payload: SignPayload | jax.Array) -> jax.Array:
  """The flat float32 buffer an exchange delivered (`exchange_flat`); an exact mean (one rank or one host) is
  already that buffer."""
  if not isinstance(payload, SignPayload):
    return payload
  return (payload.scales[:, None] * unpack_signs(payload.bits)).reshape(-1)


def compressed_allreduce_flat(x: jax.Array, state: CompressedAllReduceState,
                              comm: Any) -> tuple[jax.Array, CompressedAllReduceState]:
  """The exchange on an already padded flat float32 buffer of length N_pad (SPEC.md section 3, steps 1-5; over a
  `comm.TwoLevel` grid, section 3b): `decode` of `exchange_flat`.

  Use `compressed_allreduce` for pytrees; this entry point exists for callers that keep their own padded buffer.
  """
  payload, state = exchange_flat(x, state, comm)
  return decode(payload), state


def exchange_flat(x: jax.Array, state: CompressedAllReduceState,
                  comm: Any) -> tuple[SignPayload | jax.Array, CompressedAllReduceState]:
  """`compressed_allreduce_flat` up to the decoding: returns the `SignPayload` every rank holds (with one rank or
  one host, where the mean is exact, the decoded buffer itself) and the new error feedback."""
  communicator = comm_lib.as_communicator(comm)
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  check_leaves("x", x)
  if x.ndim != 1 or (world > 1 and x.shape[0] != padded_length(x.shape[0], world, local)):
    raise ValueError(f"`x` must be a flat buffer padded to `padded_length(n, {world}, {local})`, got shape "
                     f"{x.shape}; `compressed_allreduce` pads pytrees itself.")
  check_state(state, x.shape[0], world, local)
  if x.size == 0:
    return _empty_result(x), state
  if world == 1:  # the identity, typed as replicated (see `compressed_allreduce`)
    return communicator.mean(x), state
  if local == 1:
    return _sign_exchange(x.astype(jnp.float32) + state.worker_error, state.server_error, communicator, world)
  return _two_level_exchange(x.astype(jnp.float32), state, communicator)


def _sign_exchange(corrected: jax.Array, server_error: jax.Array, communicator: comm_lib.Communicator,
                   world: int) -> tuple[SignPayload, CompressedAllReduceState]:
  """SPEC.md section 3, steps 1-5, among the `world` ranks of `communicator`, from step 1's sum `corrected` (the
  padded float32 buffer plus the worker error)."""
  chunk = corrected.shape[0] // world
  # 1-2. Worker: compress the buffer plus its residual to sign bits and one scale.
  worker_scale = _rms(corrected)
  worker_error = corrected - worker_scale * signs(corrected)
  # 3. Rank r receives chunk r of every rank, each followed by its sender's scale (one round, not two).
  received = communicator.all_to_all(_with_scale(pack_signs(corrected).reshape(world, chunk // 8), worker_scale))
  received_bits, worker_scales = _split_scale(received)
  # 4. Server: average the chunk this rank owns, sequentially over ranks (a fixed order, like the oracle).
  received_signs = unpack_signs(received_bits)
  averaged = jnp.zeros([chunk], jnp.float32)
  for rank in range(world):
    averaged = averaged + (worker_scales[rank] / world) * received_signs[rank]
  averaged = averaged + server_error
  server_scale = _rms(averaged)
  server_error = averaged - server_scale * signs(averaged)
  # 5. Everyone gathers every server's bits and scale (one round); `decode` gives the same values on every rank.
  all_bits, server_scales = _split_scale(communicator.all_gather(_with_scale(pack_signs(averaged), server_scale)))
  return SignPayload(all_bits, server_scales), CompressedAllReduceState(worker_error, server_error)


def _two_level_exchange(x: jax.Array, state: CompressedAllReduceState,
                        grid: comm_lib.TwoLevel) -> tuple[SignPayload | jax.Array, CompressedAllReduceState]:
  """SPEC.md section 3b: an exact mean inside the host, section 3 among the hosts on this rank's shard, a gather."""
  local, hosts = grid.ranks_per_host, comm_lib.world_size(grid.slow)
  # 1. Rank (h, l) receives shard l of every rank of host h and averages them, summing in rank order.
  received = grid.fast.all_to_all(x.reshape(local, -1))
  shard = received[0]
  for rank in range(1, local):
    shard = shard + received[rank]
  shard = shard / local
  if hosts == 1:  # one host: exact, and typed replicated over the slow axis
    return grid.fast.all_gather(grid.slow.mean(shard)).reshape(-1), state
  # 2. Shard l is compressed among the ranks (h, l) of all hosts: the same bytes decode on every host.
  payload, state = _sign_exchange(shard + state.worker_error, state.server_error, grid.slow, hosts)
  # 3. The ranks of a host gather their shards' bits and scales (one round, 1/32 of the shards' floats): shards in
  # rank order, each its hosts' chunks in order.
  gathered = grid.fast.all_gather(_with_scale(payload.bits, payload.scales))
  return SignPayload(*_split_scale(gathered.reshape(local * hosts, -1))), state


def flatten(tree: Any) -> jax.Array:
  """All leaves as one float32 vector, in tree-flatten order."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([0], jnp.float32)
  return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])


def unflatten_like(flat: jax.Array, tree: Any) -> Any:
  """Inverse of `flatten`: splits `flat` into leaves with the shapes and dtypes of `tree`."""
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    size = math.prod(jnp.shape(leaf))
    out.append(flat[offset:offset + size].reshape(jnp.shape(leaf)).astype(leaf.dtype))
    offset += size
  return jax.tree.unflatten(treedef, out)


def exchange(tree: Any, state: CompressedAllReduceState,
             comm: Any) -> tuple[SignPayload | Any, CompressedAllReduceState]:
  """`compressed_allreduce` up to the decoding: the payload every rank holds (decode it with `decode_like`) and
  the new error feedback. Where the mean is exact (one rank, one host, an empty tree) the payload is the mean
  itself, a tree like `tree`. For callers that run the exchange in a loop or `lax.cond` and decode outside it."""
  communicator = comm_lib.as_communicator(comm)
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  check_leaves("tree", tree)
  n = tree_size(tree)
  check_state(state, n, world, local)
  if n == 0:
    return _empty_result(tree), state
  if world == 1:  # the identity; a mean over one rank also gives it the replicated type a mesh axis expects
    return exact_mean(tree, communicator), state
  if local > 1:
    payload, state = exchange_flat(jnp.pad(flatten(tree), (0, padded_length(n, world, local) - n)), state,
                                   communicator)
    return (payload if isinstance(payload, SignPayload) else unflatten_like(payload[:n], tree)), state
  return _sign_exchange(_flatten_onto(tree, state.worker_error), state.server_error, communicator, world)


def decode_like(payload: SignPayload | Any, tree: Any) -> Any:
  """The estimate an `exchange` of `tree` delivered, with `tree`'s structure, shapes and dtypes."""
  if not isinstance(payload, SignPayload):
    return payload
  return unflatten_like(decode(payload)[:tree_size(tree)], tree)


def _flatten_onto(tree: Any, buffer: jax.Array) -> jax.Array:
  """``buffer + flatten(tree)`` zero-padded to the buffer's length, each leaf adding its slice of `buffer` before
  the concatenation: XLA then writes the concatenation into `buffer`'s own memory where that is donated (the
  worker error), while the sum of a flat copy of the tree and the buffer needs a second tree-sized temporary."""
  parts, offset = [], 0
  for leaf in jax.tree.leaves(tree):
    size = math.prod(jnp.shape(leaf))
    parts.append(jnp.ravel(leaf).astype(jnp.float32) + buffer[offset:offset + size])
    offset += size
  return jnp.concatenate([*parts, buffer[offset:]])


def compressed_allreduce(tree: Any, state: CompressedAllReduceState,
                         comm: Any) -> tuple[Any, CompressedAllReduceState]:
  """Estimates the mean over ranks of a per-rank pytree with one 1-bit error-feedback exchange.

  Args:
    tree: Per-rank pytree of floating arrays (e.g. local gradients or momenta).
    state: Its `CompressedAllReduceState` from `init_compressed_allreduce` (per rank).
    comm: A mesh-axis name, an mpi4py communicator, None, or a `comm.Communicator`.

  Returns:
    ``(estimate, new_state)``: the estimate has `tree`'s structure, shapes and dtypes and is bitwise identical on
    every rank; with one rank it is `tree` itself.

  Example (two ranks simulated on one device by a named `jax.vmap` axis; in training the same code runs inside
  `jax.shard_map` over a mesh axis, or with an mpi4py communicator):
    >>> import jax, jax.numpy as jnp, optax_lamb16
    >>> def mean_of(x):  # x: this rank's vector
    ...   state = optax_lamb16.init_compressed_allreduce(x, "data")
    ...   return optax_lamb16.compressed_allreduce(x, state, "data")[0]
    >>> x = jnp.array([[1.0, -2.0, 3.0, 4.0], [3.0, -2.0, 1.0, -4.0]])  # one row per rank
    >>> out = jax.vmap(mean_of, axis_name="data")(x)
    >>> bool((out[0] == out[1]).all())  # bitwise the same on every rank
    True
    >>> [round(v, 3) for v in out[0].tolist()]  # the exact mean is [2, -2, 2, 0]; later calls correct the error
    [1.281, -1.281, 1.281, 1.281]

  References:
    Tang et al., `1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence Speed
    <https://arxiv.org/abs/2102.02888>`_, 2021; DeepSpeed 0.19.6, ``deepspeed/runtime/comm/nccl.py``.
  """
  payload, state = exchange(tree, state, comm)
  return decode_like(payload, tree), state


def exact_mean(tree: Any, comm: Any) -> Any:
  """The exact float32 mean over ranks of a per-rank pytree, as one all-reduce of the flattened tree."""
  communicator = comm_lib.as_communicator(comm)
  if isinstance(communicator, comm_lib.SingleDevice):
    return tree
  if tree_size(tree) == 0:
    return _empty_result(tree)
  return unflatten_like(communicator.mean(flatten(tree)), tree)
