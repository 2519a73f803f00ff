"""The error-feedback 1-bit compressed all-reduce (Algorithms section 3), backend-agnostic: the algorithm only.

Each rank adds its worker error to its input, sends one sign bit per element (plus one float32 scale) in an
all-to-all, averages the chunk it owns ("server" step, with its own error feedback), and all-gathers the server
signs and scales. Every rank decodes the same bytes, so the result is bitwise identical everywhere. A whole pytree
travels as ONE flat buffer (leaves in tree-flatten order): one all-to-all and one all-gather per call, the
scales riding with the sign bytes. Over a `comm.TwoLevel` grid of H hosts by L ranks (Algorithms section 3b) the
buffer is first averaged exactly inside each host, each rank compresses its 1/L shard among the hosts only, and the
ranks of each host gather the shards' sign bits and scales. `exchange` stops there and hands out that `SignPayload`
(1/32 of the decoded floats), so that a caller can decode it inside its own fused pass (`decode_like`);
`compressed_allreduce` is the two together.

Bytes sent per rank and call: about ``2 (P-1)/P * N_pad / 8`` plus O(P) scale bytes, 1/32 of a float32 ring
all-reduce. The error buffers are per-rank state: never replicate or average them (see `sharding`).

The compressed exchange is float32 throughout (Algorithms section 3): its input is rounded to float32, its error
feedback is float32 and every payload is sign bits plus float32 scales; the estimate comes back in each leaf's dtype
(bfloat16 and float16 rounded, float64 widened exactly). Float64 error feedback would change nothing that matters:
the estimate of a mean of signs times a scale is a coarse one, and what each call leaves out is fed back whatever its
precision. The exact mean (`exact_mean`) runs in each leaf's arithmetic dtype: float32 (bfloat16 and float16
widened), or float64 for float64 leaves (possible only with ``jax_enable_x64``). The optax transforms built on these
exchanges (`compressed_mean`, `uncompressed_mean`) live in `gradient_mean`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_lamb16 import _checks, _common, _rank_types
from optax_lamb16 import comm as comm_lib


class CompressedAllReduceState(NamedTuple):
  """Per-rank error feedback of the compressed all-reduce (zeros at the start).

  Attributes:
    worker_error: what this rank's sign compression left out so far: the specified float32 (N_pad,) buffer, kept as a
      tuple of float32 vectors whose concatenation it is: one per group of leaves of the exchanged tree
      (`error_groups`: each large leaf alone, each run of small ones together), then one for the padding. The
      error of a large leaf then updates in place, and of its values only the sign bits are concatenated. Over a
      `comm.TwoLevel` grid one vector, the shard's; for an element count n, (n, N_pad - n).
    server_error: float32 (N_pad / P,), what the compression of the chunk this rank averages left out so far.
  With one rank (or an empty input) each is one empty vector: the exchange is the identity.
  """

  worker_error: tuple[jax.Array, ...]
  server_error: jax.Array

  # Fields that differ per rank (read by `sharding.state_partition_specs`).
  PER_RANK_FIELDS = ("worker_error", "server_error")


def padded_length(n: int, world_size: int, ranks_per_host: int = 1) -> int:
  """N rounded up to a multiple of ``L * H * lcm(H, 8)`` for H = world_size / L hosts of L = `ranks_per_host`
  ranks (Algorithms sections 3 and 3b), so that each of the L shards splits into H chunks of whole bytes. With L = 1
  (every rank its own host) that is ``P * lcm(P, 8)``."""
  if world_size == 1:
    return n
  hosts = world_size // ranks_per_host
  quantum = ranks_per_host * hosts * math.lcm(hosts, 8)
  return -(-n // quantum) * quantum


def leaf_sizes(tree: Any) -> tuple[int, ...]:
  """Element counts of `tree`'s leaves, in tree-flatten order."""
  return tuple(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
  return sum(leaf_sizes(tree))


# A leaf of at least this many elements keeps its worker error in a vector of its own; smaller ones share one with
# their neighbours. Each vector is one more argument, output and loop carry of every step (one per leaf made the
# steps that do not exchange slower on XLA:CPU), while a shared one costs only a concatenation of its small leaves.
OWN_ERROR_VECTOR = 1 << 16


def error_groups(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """The ``[start, stop)`` ranges of leaves (of `sizes` elements, in tree-flatten order) whose worker errors share
  one vector: a leaf of at least `OWN_ERROR_VECTOR` elements alone, consecutive smaller ones together until they
  reach that size."""
  groups, start, run = [], 0, 0
  for index, size in enumerate(sizes):
    if size >= OWN_ERROR_VECTOR and index > start:  # close the run of small leaves before it
      groups.append((start, index))
      start, run = index, 0
    run += size
    if run >= OWN_ERROR_VECTOR:
      groups.append((start, index + 1))
      start, run = index + 1, 0
  if start < len(sizes):
    groups.append((start, len(sizes)))
  return tuple(groups)


def error_buffer_lengths(sizes: tuple[int, ...], world: int, ranks_per_host: int = 1) -> tuple[tuple[int, ...], int]:
  """Lengths of (the worker_error vectors, server_error) for exchanging leaves of `sizes` elements among
  `world` ranks, `ranks_per_host` to a host: one worker vector per group of leaves (`error_groups`) plus the
  padding's (L = 1), or each rank's shard of ``N_pad / L`` elements, compressed among the H hosts (L > 1);
  everything empty where H is 1 or there is nothing to exchange."""
  hosts, n = world // ranks_per_host, sum(sizes)
  if hosts == 1 or n == 0:
    return (0,), 0
  n_pad = padded_length(n, world, ranks_per_host)
  if ranks_per_host > 1:
    return (n_pad // ranks_per_host,), n_pad // world
  return (*(sum(sizes[start:stop]) for start, stop in error_groups(sizes)), n_pad - n), n_pad // world


def init_compressed_allreduce(tree_or_length: Any, comm: Any) -> CompressedAllReduceState:
  """Zero error buffers for exchanging `tree_or_length` (a pytree, abstract shapes fine, or an element count).

  Made from the tree, the state keeps each large leaf's error in a vector of its own, which the exchange of that
  tree updates in place. Made from an element count, it serves any tree or flat buffer of that many elements, which
  the exchange then handles as one flattened buffer (a copy of the tree each call).

  Call it where `comm` is usable (inside `shard_map` for a mesh-axis name).
  """
  communicator = comm_lib.as_communicator(comm)
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  if isinstance(tree_or_length, (int, np.integer)):
    if tree_or_length < 0:
      raise ValueError(f"`tree_or_length` must be a pytree or a non-negative element count, got {tree_or_length}.")
    sizes, axes = (int(tree_or_length),), ()
  else:
    _checks.check_float_leaves("tree_or_length", tree_or_length)
    # Varying over the data axis, and over the other axes the tree varies over (a "model" axis that shards it).
    sizes, axes = leaf_sizes(tree_or_length), _rank_types.other_axes(communicator, tree_or_length)
  zeros = lambda length: _rank_types.mark_varying(
    _rank_types.mark_per_rank(communicator, jnp.zeros([length], jnp.float32)), axes
  )
  worker, server = error_buffer_lengths(sizes, world, local)
  return CompressedAllReduceState(tuple(zeros(length) for length in worker), zeros(server))


def check_state(
  state: CompressedAllReduceState, sizes: tuple[int, ...], world: int, ranks_per_host: int = 1, any_split: bool = False
) -> None:
  """Raises ValueError unless `state` holds the error buffers of an exchange of leaves of `sizes` elements at world
  size `world` (`ranks_per_host` to a host). With `any_split` (for a buffer that the exchange splits as the state's
  worker vectors are split: a flat one, or a tree given a state made from an element count) only the worker
  vectors' total length must fit, over one level (a two-level grid's state is one vector).

  A state made for another world size (e.g. restored from a run on a different number of ranks) or for another
  model would otherwise mix up error feedback silently, or fail later with an error that names no argument.
  """
  worker, chunk = error_buffer_lengths(sizes, world, ranks_per_host)
  got_worker = (
    tuple(int(math.prod(jnp.shape(w))) for w in state.worker_error) if isinstance(state.worker_error, tuple) else None
  )
  got_server = jnp.shape(state.server_error)
  well_formed = got_worker is not None and all(jnp.ndim(w) == 1 for w in state.worker_error)
  if (
    well_formed
    and got_server == (chunk,)
    and (got_worker == worker or (any_split and ranks_per_host == 1 and sum(got_worker) == sum(worker)))
  ):
    return
  if not well_formed:
    raise ValueError(
      f"The compressed all-reduce state's `worker_error` must be a tuple of 1-d float32 vectors (one per group of "
      f"leaves and one for the padding), got {jax.tree.map(jnp.shape, state.worker_error)}. Re-create the state "
      f"with `init` (the optimizer's, or `init_compressed_allreduce`)."
    )
  total, n_pad, server = sum(got_worker), sum(worker), int(math.prod(got_server))
  grid = f" ({world // ranks_per_host} hosts of {ranks_per_host} ranks)" if ranks_per_host > 1 else ""
  if (total, got_server) == (n_pad, (chunk,)):  # the right world size, split otherwise
    layout = (
      "one vector, this rank's shard of the two-level grid"
      if ranks_per_host > 1
      else "one per group of leaves (`error_groups`), then the padding's"
    )
    raise ValueError(
      f"The compressed all-reduce state does not fit: its worker_error vectors have lengths {got_worker}, but this "
      f"exchange needs {worker} ({layout}). Make the state with `init_compressed_allreduce` from the tree you "
      f"exchange (or the optimizer's `init` from the params), where `comm` is the communicator you exchange over."
    )
  made_for = ""
  if total == 0 and server == 0:
    made_for = " (it looks made for 1 rank, e.g. comm=None)"
  elif ranks_per_host == 1 and len(got_server) == 1 and server and total % server == 0:
    ranks = total // server
    if ranks != world:
      made_for = f" (it looks made for {ranks} ranks)"
    elif total == world * n_pad:
      made_for = (
        " (these look like the global arrays of all ranks: give each rank its own part, with the specs "
        "of `state_partition_specs`)"
      )
  raise ValueError(
    f"The compressed all-reduce state does not fit: its error buffers (worker_error, server_error) hold {total} "
    f"and {server} elements, but {sum(sizes)} elements at world size {world}{grid} need {n_pad} and "
    f"{chunk}{made_for}. The state was made for another world size or another model: re-create it with `init` "
    f"(the optimizer's, or `init_compressed_allreduce`) where `comm` spans the current ranks. This restarts the "
    f"error feedback from zero, as DeepSpeed does on every checkpoint load."
  )


def signs(x: jax.Array) -> jax.Array:
  """sgn(x): +1 where x >= 0 (and where x is NaN, as DeepSpeed's ``sign().add(1).bool()``), -1 elsewhere."""
  return jnp.where(x < 0, -1.0, 1.0).astype(jnp.float32)


def pack_signs(x: jax.Array | list[jax.Array]) -> jax.Array:
  """One bit per element, 1 for sgn(x) = +1, eight to a byte, most significant bit first (the last byte padded with
  zero bits). A list of vectors is packed as their concatenation, which is never formed (`_pack_parts`)."""
  if isinstance(x, list):
    return _pack_parts(x)
  return jnp.packbits(jnp.logical_not(x < 0), axis=-1, bitorder="big")


def _pack_parts(parts: list[jax.Array]) -> jax.Array:
  """`pack_signs` of the concatenation of `parts`: each part's whole bytes packed from the part alone, and only the
  bytes that straddle parts (a few elements each side, or runs of short parts) from a concatenation.

  XLA:CPU fuses a concatenation into its consumer as a choice among the operands for every element: packing the
  concatenation of a 4M-element buffer's five parts took several times as long as concatenating the parts' packed
  bytes (1/32 of the floats' size).
  """
  packed, straddling, offset = [], [], 0

  def pack_straddling():
    if sum(piece.shape[0] for piece in straddling):
      packed.append(pack_signs(jnp.concatenate(straddling)))
    straddling.clear()

  for part in parts:
    head = min(-offset % 8, part.shape[0])  # the elements that complete the byte begun before this part
    whole = (part.shape[0] - head) // 8 * 8
    straddling.append(part[:head])
    if whole:
      pack_straddling()
      packed.append(pack_signs(part[head : head + whole]))
    straddling.append(part[head + whole :])
    offset += part.shape[0]
  pack_straddling()
  return jnp.concatenate(packed) if packed else jnp.zeros([0], jnp.uint8)


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


def _rms(parts: list[jax.Array]) -> jax.Array:
  """The RMS of the concatenation of `parts`, reduced part by part (nothing concatenated)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(part)) for part in parts)) / jnp.sqrt(
    jnp.float32(sum(part.size for part in parts))
  )


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


def _decoded_slice(payload: SignPayload, start: int, size: int) -> jax.Array:
  """Elements ``[start, start + size)`` of `decode(payload)`, from the flat stream of sign bits and, for the scale,
  the chunk boundaries inside the range.

  A slice of `decode`'s (R, C) product that straddles two chunks made XLA:CPU divide every position by C (several
  times slower than a slice inside one chunk): up to 8 boundaries are compared with the position instead, and only more
  are found by division.
  """
  chunk = payload.bits.shape[-1] * 8
  # Only the bytes that hold the range are unpacked (the whole payload per leaf, outside `jit`, would cost O(N) each).
  signs = unpack_signs(payload.bits.reshape(-1)[start // 8 : -(-(start + size) // 8)])[start % 8 : start % 8 + size]
  if size == 0:
    return signs
  first, last = start // chunk, (start + size - 1) // chunk
  if first == last:
    return payload.scales[first] * signs
  position = jnp.arange(start, start + size)
  if last - first > 8:
    return payload.scales[position // chunk] * signs
  scale = payload.scales[first]
  for row in range(first + 1, last + 1):
    scale = jnp.where(position >= row * chunk, payload.scales[row], scale)
  return scale * signs


def exchange_flat(
  x: jax.Array, state: CompressedAllReduceState, communicator: comm_lib.Communicator
) -> tuple[SignPayload | jax.Array, CompressedAllReduceState]:
  """The exchange (Algorithms section 3, steps 1-5; over a `comm.TwoLevel` grid, section 3b) of an already padded
  flat float32 buffer of length N_pad, up to the decoding: returns the `SignPayload` every rank holds (with one rank or
  one host, where the mean is exact, the decoded buffer itself) and the new error feedback."""
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  _checks.check_float_leaves("x", x)
  if x.ndim != 1 or (world > 1 and x.shape[0] != padded_length(x.shape[0], world, local)):
    raise ValueError(
      f"`x` must be a flat buffer padded to `padded_length(n, {world}, {local})`, got shape "
      f"{x.shape}; `compressed_allreduce` pads pytrees itself."
    )
  check_state(state, (x.shape[0],), world, local, any_split=True)
  if x.size == 0:
    return _empty_result(x), state
  if world == 1:  # the identity, typed as replicated (see `compressed_allreduce`)
    return communicator.mean(x), state
  if local > 1:
    return _two_level_exchange(x.astype(jnp.float32), state, communicator)
  # Split as the state is (by the groups of leaves of the tree it was made for).
  parts = [part + error for part, error in zip(unflatten_like(x, state.worker_error), state.worker_error)]
  return _sign_exchange(parts, state.server_error, communicator, world)


def _sign_exchange(
  corrected: list[jax.Array], server_error: jax.Array, communicator: comm_lib.Communicator, world: int
) -> tuple[SignPayload, CompressedAllReduceState]:
  """Algorithms section 3, steps 1-5, among the `world` ranks of `communicator`, from step 1's sum `corrected` (the
  padded float32 buffer plus the worker error) in the parts its worker-error vectors split it into."""
  chunk = sum(part.shape[0] for part in corrected) // world
  # 1-2. Worker: compress the buffer plus its residual to sign bits and one scale. Part by part, so that each
  # vector's error is written over its old value and only the bits are concatenated (a quarter of the floats' bytes).
  worker_scale = _rms(corrected)
  worker_error = tuple(part - worker_scale * signs(part) for part in corrected)
  bits = pack_signs(corrected)
  # 3. Rank r receives chunk r of every rank, each followed by its sender's scale (one round, not two).
  received = communicator.all_to_all(_with_scale(bits.reshape(world, chunk // 8), worker_scale))
  received_bits, worker_scales = _split_scale(received)
  # 4. Server: average the chunk this rank owns, sequentially over ranks (a fixed order, like the oracle).
  received_signs = unpack_signs(received_bits)
  averaged = jnp.zeros([chunk], jnp.float32)
  for rank in range(world):
    averaged = averaged + (worker_scales[rank] / world) * received_signs[rank]
  averaged = averaged + server_error
  server_scale = _rms([averaged])
  server_error = averaged - server_scale * signs(averaged)
  # 5. Everyone gathers every server's bits and scale (one round); `decode` gives the same values on every rank.
  all_bits, server_scales = _split_scale(communicator.all_gather(_with_scale(pack_signs(averaged), server_scale)))
  return SignPayload(all_bits, server_scales), CompressedAllReduceState(worker_error, server_error)


def _two_level_exchange(
  x: jax.Array, state: CompressedAllReduceState, grid: comm_lib.TwoLevel
) -> tuple[SignPayload | jax.Array, CompressedAllReduceState]:
  """Algorithms section 3b: an exact mean inside the host, section 3 among the hosts on this rank's shard, a gather."""
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
  payload, state = _sign_exchange([shard + state.worker_error[0]], state.server_error, grid.slow, hosts)
  # 3. The ranks of a host gather their shards' bits and scales (one round, 1/32 of the shards' floats): shards in
  # rank order, each its hosts' chunks in order.
  gathered = grid.fast.all_gather(_with_scale(payload.bits, payload.scales))
  return SignPayload(*_split_scale(gathered.reshape(local * hosts, -1))), state


def flatten(tree: Any, dtype: Any = jnp.float32) -> jax.Array:
  """All leaves as one vector of `dtype` (float32 by default), in tree-flatten order."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([0], dtype)
  return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])


def unflatten_like(flat: jax.Array, tree: Any) -> Any:
  """Inverse of `flatten`: splits `flat` into leaves with the shapes and dtypes of `tree`."""
  return _leaves_from(lambda start, size: flat[start : start + size], tree)


def _leaves_from(elements: Any, tree: Any) -> Any:
  """A tree like `tree` whose leaves are, in tree-flatten order, ``elements(start, size)`` of a flat buffer,
  reshaped and cast like each leaf."""
  leaves, treedef = jax.tree.flatten(tree)
  out, offset = [], 0
  for leaf in leaves:
    size = math.prod(jnp.shape(leaf))
    out.append(elements(offset, size).reshape(jnp.shape(leaf)).astype(leaf.dtype))
    offset += size
  return jax.tree.unflatten(treedef, out)


def exchange(
  tree: Any, state: CompressedAllReduceState, communicator: comm_lib.Communicator
) -> tuple[SignPayload | Any, CompressedAllReduceState]:
  """`compressed_allreduce` up to the decoding: the payload every rank holds (decode it with `decode_like`) and
  the new error feedback. Where the mean is exact (one rank, one host, an empty tree) the payload is the mean
  itself, a tree like `tree`. For callers that run the exchange in a loop or `lax.cond` and decode outside it."""
  world, local = comm_lib.world_size(communicator), comm_lib.ranks_per_host(communicator)
  _checks.check_float_leaves("tree", tree)
  sizes = leaf_sizes(tree)
  n = sum(sizes)
  check_state(state, sizes, world, local, any_split=True)
  if n == 0:
    return _empty_result(tree), state
  if world == 1:  # the identity; a mean over one rank also gives it the replicated type a mesh axis expects
    return exact_mean(tree, communicator), state
  if local > 1 or tuple(error.shape[0] for error in state.worker_error) != error_buffer_lengths(sizes, world)[0]:
    # One flat buffer: a two-level grid's (whose state is its shard's error), or one split as the state is split
    # (a state made from an element count).
    payload, state = exchange_flat(jnp.pad(flatten(tree), (0, padded_length(n, world, local) - n)), state, communicator)
    return (payload if isinstance(payload, SignPayload) else unflatten_like(payload[:n], tree)), state
  leaves = [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
  corrected = [
    jnp.concatenate(leaves[start:stop]) + error for (start, stop), error in zip(error_groups(sizes), state.worker_error)
  ]
  return _sign_exchange([*corrected, state.worker_error[-1]], state.server_error, communicator, world)


def decode_like(payload: SignPayload | Any, tree: Any) -> Any:
  """The estimate an `exchange` of `tree` delivered, with `tree`'s structure, shapes and dtypes; or the buffer an
  `exchange_flat` delivered, split into leaves like `tree` (whose leaves, flattened and concatenated, are that
  buffer). Each leaf is decoded from its own range of the payload, so that it fuses into its consumer."""
  if isinstance(payload, SignPayload):
    return _leaves_from(lambda start, size: _decoded_slice(payload, start, size), tree)
  of_tree_itself = isinstance(tree, (jax.Array, np.ndarray)) and tree.shape == jnp.shape(payload)
  if isinstance(payload, jax.Array) and not of_tree_itself:  # an exact mean of a flat buffer
    return unflatten_like(payload, tree)
  return payload  # an exact mean of `tree` itself


def compressed_allreduce(tree: Any, state: CompressedAllReduceState, comm: Any) -> tuple[Any, CompressedAllReduceState]:
  """Estimates the mean over ranks of a per-rank pytree with one 1-bit error-feedback exchange.

  Args:
    tree: Per-rank pytree of floating arrays (e.g. local gradients or momenta).
    state: Its `CompressedAllReduceState` from `init_compressed_allreduce` (per rank).
    comm: A mesh-axis name, an mpi4py communicator, None, or a `comm.Communicator`.

  Returns:
    ``(estimate, new_state)``: the estimate has `tree`'s structure, shapes and dtypes and is bitwise identical on
    every rank; with one rank it is `tree` itself.

  The example simulates two ranks on one device with a named `jax.vmap` axis; in training the same code runs inside
  `jax.shard_map` over a mesh axis, or with an mpi4py communicator.

  Example:
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
  payload, state = exchange(tree, state, comm_lib.as_communicator(comm))
  return decode_like(payload, tree), state


def exact_mean(tree: Any, communicator: comm_lib.Communicator) -> Any:
  """The exact mean over ranks of a per-rank pytree, in each leaf's arithmetic dtype (`_common.arithmetic_dtype`:
  float32, or float64 for float64 leaves), returned in the leaves' dtypes: one all-reduce of the flattened leaves
  of each arithmetic dtype (one for a tree of float32, bfloat16 and float16 leaves)."""
  if isinstance(communicator, comm_lib.SingleDevice):
    return tree
  if tree_size(tree) == 0:
    return _empty_result(tree)
  leaves, treedef = jax.tree.flatten(tree)
  by_dtype = {}
  for index, leaf in enumerate(leaves):
    by_dtype.setdefault(_common.arithmetic_dtype(leaf.dtype), []).append(index)
  means = list(leaves)
  for dtype, indices in by_dtype.items():
    group = [leaves[index] for index in indices]
    mean = unflatten_like(communicator.mean(flatten(group, dtype)), group) if tree_size(group) else _empty_result(group)
    for index, leaf in zip(indices, mean):
      means[index] = leaf
  return jax.tree.unflatten(treedef, means)
