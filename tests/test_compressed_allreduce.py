"""The error-feedback 1-bit compressed all-reduce against the NumPy oracle of SPEC.md section 3, and its invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from optax_lamb16 import _compression as car
from tests import onebit_harness as h
from tests import reference
from tests.workers.inputs import random_inputs


def make_mesh(world):
  return h.host_mesh(world)


def run_calls(inputs, comm="data", all_states=False):
  """inputs: (P, T, n) per-rank inputs of T consecutive calls. Returns per-rank outputs (P, T, n) and the states.

  The states are the final ones, as (P, length) arrays, or with `all_states` those after every call, (P, T, length).

  All T calls run in one `lax.scan` inside one `shard_map` (one dispatch: no back-to-back collective programs).
  """
  world = inputs.shape[0]

  def per_rank(x):  # x: (1, T, n), this rank's inputs
    state = optax_lamb16.init_compressed_allreduce(x.shape[-1], comm)

    def call(state, x_t):
      out, state = optax_lamb16.compressed_allreduce(x_t, state, comm)
      return state, (out, state)

    state, (outs, states) = jax.lax.scan(call, state, x[0])
    return outs[None], jax.tree.map(lambda s: s[None], states) if all_states else state

  state_specs = optax_lamb16.CompressedAllReduceState(P("data"), P("data"))
  f = jax.jit(jax.shard_map(per_rank, mesh=make_mesh(world), in_specs=P("data"), out_specs=(P("data"), state_specs)))
  outs, state = f(jnp.asarray(inputs))
  shape = (world, inputs.shape[1], -1) if all_states else (world, -1)
  return np.asarray(outs), jax.tree.map(lambda x: np.asarray(x).reshape(shape), h.flat_errors(state))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1000, 4 * 8 * 24 * 5], ids=["needs-padding", "no-padding"])
def test_matches_numpy_oracle_for_24_calls(world, n):
  """Every call, from the error buffers the previous call left, gives the oracle's output and error buffers.

  (Why not let the oracle run free for 24 calls: its float32 sums run in another order, so once in a while an element
  that sits at 0 gets the other sign; the error feedback then carries that difference on and the two trajectories,
  equally valid, part. That happens here with P = 8 around call 10.)
  """
  if n % (world * np.lcm(world, 8)) == 0:
    assert car.padded_length(n, world) == n
  else:
    assert car.padded_length(n, world) > n
  calls = 24
  inputs = random_inputs(world, calls, n, seed=world)
  outs, states = run_calls(inputs, all_states=True)
  stepped = reference.CompressedAllReduceReference(n, world)
  for t in range(calls):
    if t > 0:  # start this call from the error feedback the JAX code carried
      stepped.worker_error = list(states.worker_error[:, t - 1])
      stepped.server_error = list(states.server_error[:, t - 1])
    want = stepped([inputs[r, t] for r in range(world)])
    for r in range(world):
      np.testing.assert_allclose(outs[r, t], want, rtol=2e-6, atol=1e-6, err_msg=f"call {t}, rank {r}")
      np.testing.assert_allclose(states.worker_error[r, t], stepped.worker_error[r], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(states.server_error[r, t], stepped.server_error[r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_output_is_bitwise_identical_on_every_rank(world):
  outs, _ = run_calls(random_inputs(world, 5, 777, seed=1))
  for r in range(1, world):
    np.testing.assert_array_equal(outs[r], outs[0])


def test_one_rank_is_the_identity_and_keeps_no_error():
  x = random_inputs(1, 3, 100)
  outs, state = run_calls(x)
  np.testing.assert_array_equal(outs, x)
  assert state.worker_error.size == 0 and state.server_error.size == 0
  tree = {"a": jnp.arange(5.0), "b": jnp.ones((2, 2), jnp.bfloat16)}
  same, _ = optax_lamb16.compressed_allreduce(tree, optax_lamb16.init_compressed_allreduce(tree, None), None)
  assert same is tree


def test_empty_input_passes_through():
  outs, state = run_calls(np.zeros((4, 2, 0), np.float32))
  assert outs.shape == (4, 2, 0) and state.worker_error.size == 0


def test_sign_bits_are_packed_most_significant_first():
  x = jnp.array(
    [
      1.0,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
      0.0,  # + - - - - - - +  -> 0b10000001
      -0.5,
      jnp.nan,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
      -1.0,
    ]
  )  # NaN counts as +1 -> 0b01000000
  np.testing.assert_array_equal(car.pack_signs(x), [0b10000001, 0b01000000])
  np.testing.assert_array_equal(car.unpack_signs(car.pack_signs(x)), car.signs(x))
  np.testing.assert_array_equal(car.signs(x), reference.sgn(np.asarray(x)))


@pytest.mark.parametrize(
  "lengths", [(3, 5, 16), (0, 13, 0, 64, 7, 1, 26, 2), (1,) * 24, (20, 100, 4, 5, 3, 0, 27), (0, 0)]
)
def test_parts_are_packed_as_their_concatenation(lengths):
  """The exchange packs a buffer kept in parts part by part; parts that do not start or end on a byte boundary
  share bytes with their neighbours."""
  rng = np.random.default_rng(len(lengths))
  parts = [jnp.asarray(rng.standard_normal(n), jnp.float32) for n in lengths]
  whole = np.concatenate([np.asarray(part) for part in parts])
  np.testing.assert_array_equal(jax.jit(car.pack_signs)(parts), np.packbits(whole >= 0))


@pytest.mark.parametrize("rows", [1, 2, 5, 24])
def test_decoding_leaf_by_leaf_is_bitwise_the_decoded_buffer(rows):
  """`decode_like` decodes each leaf from its own range of the payload (leaves inside one chunk, across one
  boundary, across more than 8, empty and 0-d): bitwise the slices of the whole decoded buffer."""
  chunk = 64
  rng = np.random.default_rng(rows)
  payload = car.SignPayload(
    jnp.asarray(rng.integers(0, 256, (rows, chunk // 8)), jnp.uint8),
    jnp.asarray(rng.uniform(0.5, 2.0, rows), jnp.float32),
  )
  total = rows * chunk
  sizes = []
  for size in (5, 0, 1, 59, chunk + 3, 9 * chunk + 1):  # inside one chunk, empty, across 1, 1 and 9 boundaries
    if sum(sizes) + size < total:
      sizes.append(size)
  tree = {f"leaf{i}": jnp.zeros(size, jnp.bfloat16 if i == 2 else jnp.float32) for i, size in enumerate(sizes)}
  tree["scalar"], tree["rest"] = jnp.zeros([]), jnp.zeros((total - sum(sizes) - 1,))
  got = jax.jit(car.decode_like)(payload, tree)
  want = car.unflatten_like(car.decode(payload), tree)
  for key in tree:
    assert got[key].dtype == tree[key].dtype and got[key].shape == tree[key].shape, key
    np.testing.assert_array_equal(np.asarray(got[key], np.float32), np.asarray(want[key], np.float32), err_msg=key)


def test_error_feedback_makes_the_running_sum_converge():
  """sum_t out_t tracks sum_t mean_t with a bounded error (relative error ~ 1/T); without feedback it does not."""
  world, calls, n = 4, 256, 512
  inputs = random_inputs(world, calls, n, seed=5) + 0.3  # a bias that plain sign compression gets wrong
  true_running = np.cumsum(inputs.mean(axis=0), axis=0)
  outs, _ = run_calls(inputs)
  error = np.linalg.norm(np.cumsum(outs[0], axis=0) - true_running, axis=1) / np.linalg.norm(true_running, axis=1)
  # Without feedback: every call starts from zero error buffers.
  no_feedback = np.stack([run_calls(inputs[:, t : t + 1])[0][0, 0] for t in range(0, calls, 8)])
  error_nf = np.linalg.norm(
    np.cumsum(no_feedback, axis=0) - np.cumsum(inputs.mean(axis=0)[::8], axis=0), axis=1
  ) / np.linalg.norm(np.cumsum(inputs.mean(axis=0)[::8], axis=0), axis=1)
  assert error[255] < error[31] / 4, (error[31], error[255])  # shrinks ~ 1/T (8x more calls)
  assert error[255] < 0.05
  assert error_nf[-1] > 0.3 and error_nf[-1] > 0.5 * error_nf[3]  # does not shrink


def test_compressed_mean_transform_in_a_chain_keeps_replicas_identical():
  world = 4
  mesh = make_mesh(world)
  params = {"w": jnp.ones((6, 5)), "b": jnp.zeros(5)}
  tx = optax.chain(optax_lamb16.compressed_mean("data"), optax_lamb16.lamb16(0.01))
  state = optax_lamb16.sharded_init(tx, params, mesh, "data")
  specs = optax_lamb16.state_partition_specs(state, "data")
  assert specs[0] == optax_lamb16.CompressedAllReduceState((P("data"),) * 2, P("data"))
  assert all(s == P() for s in jax.tree.leaves(specs[1], is_leaf=lambda x: isinstance(x, P)))
  # One error vector for the two small leaves, then the padding's (per rank, laid out over the data axis).
  assert [w.shape for w in state[0].worker_error] == [(world * 35,), (world * (car.padded_length(35, world) - 35),)]

  def local_step(params, state, x):
    grads = jax.grad(lambda p: jnp.sum((x[0] @ p["w"] + p["b"]) ** 2))(optax_lamb16.local_view(params, "data"))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=(P(), specs)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((world, 3, 6)), jnp.float32)
  for _ in range(3):
    params, state = jax.block_until_ready(step(params, state, x))
  # The replicated output spec P() type-checks only because every rank holds the same params; check it directly.
  local = jax.jit(
    jax.shard_map(
      lambda p: jax.tree.map(lambda a: a[None], p), mesh=mesh, in_specs=P(), out_specs=P("data"), check_vma=False
    )
  )(params)
  for leaf in jax.tree.leaves(local):
    for r in range(1, world):
      np.testing.assert_array_equal(leaf[r], leaf[0])
  assert float(jnp.abs(h.flat_errors(state[0]).worker_error).sum()) > 0  # error feedback is being kept per rank


def test_large_leaves_keep_their_own_error_vectors_and_the_exchange_is_unchanged():
  """A leaf of at least `OWN_ERROR_VECTOR` elements keeps its worker error in a vector of its own, runs of smaller
  ones share one, then the padding's: their concatenation is SPEC.md's buffer, and three calls over a tree of both
  kinds match the oracle on the flattened tree, outputs bitwise the same on both ranks."""
  big = car.OWN_ERROR_VECTOR
  shapes = {"a": (300,), "b_big": (2, big // 2 + 100), "c": (40,), "d": (7,), "e_big": (big,)}
  sizes = tuple(math.prod(s) for s in shapes.values())
  assert car.error_groups(sizes) == ((0, 1), (1, 2), (2, 4), (4, 5))
  world, calls, n = 2, 3, sum(sizes)
  rng = np.random.default_rng(0)
  inputs = [{k: rng.standard_normal((world, *s)).astype(np.float32) for k, s in shapes.items()} for _ in range(calls)]

  def per_rank(trees, state=None):  # trees: this rank's inputs of each call (a named `jax.vmap` axis: the ranks)
    state = optax_lamb16.init_compressed_allreduce(trees[0], "data") if state is None else state
    outs = []
    for tree in trees:
      out, state = optax_lamb16.compressed_allreduce(tree, state, "data")
      outs.append(out)
    return outs, state

  outs, state = jax.jit(jax.vmap(per_rank, axis_name="data"))(inputs)
  pad = car.padded_length(n, world) - n
  assert [w.shape for w in state.worker_error] == [
    (world, 300),
    (world, big + 200),
    (world, 47),
    (world, big),
    (world, pad),
  ]
  oracle = reference.CompressedAllReduceReference(n, world)
  flat = lambda tree, r: np.concatenate([np.ravel(np.asarray(tree[k][r])) for k in shapes])
  for t in range(calls):
    want = oracle([flat(inputs[t], r) for r in range(world)])
    np.testing.assert_array_equal(flat(outs[t], 0), flat(outs[t], 1))
    np.testing.assert_allclose(flat(outs[t], 0), want, rtol=2e-6, atol=1e-6, err_msg=f"call {t}")
  errors = h.flat_errors(state).worker_error
  for r in range(world):
    np.testing.assert_allclose(errors[r], oracle.worker_error[r], rtol=1e-5, atol=1e-5)
  # A state made from the element count (one vector, then the padding's) exchanges the same tree as one flat buffer.
  from_count = lambda trees: per_rank(trees, optax_lamb16.init_compressed_allreduce(n, "data"))
  outs_flat, state_flat = jax.jit(jax.vmap(from_count, axis_name="data"))(inputs)
  assert [w.shape for w in state_flat.worker_error] == [(world, n), (world, pad)]
  for t in range(calls):
    np.testing.assert_allclose(flat(outs_flat[t], 0), flat(outs[t], 0), rtol=2e-6, atol=1e-6, err_msg=f"call {t}")


def test_unknown_comm_type_is_rejected():
  with pytest.raises(TypeError, match="`comm` must be"):
    optax_lamb16.compressed_mean(3.0)


def test_unbound_axis_name_is_a_clear_error():
  with pytest.raises(ValueError, match="comm='data' names a mesh axis that is not bound"):
    optax_lamb16.init_compressed_allreduce(10, "data")


def test_state_of_another_world_size_is_rejected():
  mesh = make_mesh(4)
  state_for_2 = optax_lamb16.CompressedAllReduceState(
    (jnp.zeros(100), jnp.zeros(car.padded_length(100, 2) - 100)), jnp.zeros(car.padded_length(100, 2) // 2)
  )

  def f(x):
    return optax_lamb16.compressed_allreduce(x[0], state_for_2, "data")[0]

  with pytest.raises(ValueError, match="another world size"):
    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P()))(jnp.zeros((4, 100)))


class _LoggingComm:
  """A user-supplied communicator: wraps the mesh axis and records what is exchanged."""

  def __init__(self):
    self.inner, self.calls = optax_lamb16.comm.MeshAxis("data"), []

  @property
  def size(self):
    return self.inner.size

  def mean(self, x):
    self.calls.append(("mean", x.dtype))
    return self.inner.mean(x)

  def all_to_all(self, x):
    self.calls.append(("all_to_all", x.dtype))
    return self.inner.all_to_all(x)

  def all_gather(self, x):
    self.calls.append(("all_gather", x.dtype))
    return self.inner.all_gather(x)

  def per_rank(self, x):  # optional member: lets shard_map type fresh per-rank buffers
    return self.inner.per_rank(x)


def test_custom_communicator_object_is_used_and_exchanges_packed_bytes():
  custom = _LoggingComm()
  inputs = random_inputs(2, 3, 100)
  outs_custom, _ = run_calls(inputs, comm=custom)
  outs_axis, _ = run_calls(inputs)
  np.testing.assert_array_equal(outs_custom, outs_axis)
  # Two rounds per call: an all-to-all of sign bytes, then an all-gather of server bytes, each carrying its scales.
  assert custom.calls == [("all_to_all", jnp.uint8), ("all_gather", jnp.uint8)]


def test_named_vmap_axis_is_the_same_exchange_as_shard_map():
  """`comm` may name a `jax.vmap` axis (ranks simulated on one device, as the docstring examples do): the same bits
  as over a mesh axis."""
  inputs = random_inputs(4, 6, 300, seed=3)

  def calls(x):  # x: (T, n) of one rank
    state = optax_lamb16.init_compressed_allreduce(x.shape[-1], "data")
    return jax.lax.scan(lambda s, x_t: optax_lamb16.compressed_allreduce(x_t, s, "data")[::-1], state, x)[1]

  vmapped = jax.jit(jax.vmap(calls, axis_name="data"))(jnp.asarray(inputs))
  np.testing.assert_array_equal(np.asarray(vmapped), run_calls(inputs)[0])


def _exchange_and_mean_calls(tree):
  """tree: {name: (P, T, n)} per-rank inputs of T calls. Returns the compressed_mean outputs {name: (P, T, n)}, the
  final error buffers and the uncompressed_mean outputs, over a mesh of P ranks (one dispatch)."""
  world = next(iter(tree.values())).shape[0]

  def per_rank(tree):
    tree = jax.tree.map(lambda x: x[0], tree)
    compressed, exact = optax_lamb16.compressed_mean("data"), optax_lamb16.uncompressed_mean("data")
    state = compressed.init(jax.tree.map(lambda x: x[0], tree))

    def call(state, x_t):
      out, state = compressed.update(x_t, state)
      return state, (out, exact.update(x_t, exact.init(x_t))[0])

    state, (outs, means) = jax.lax.scan(call, state, tree)
    return jax.tree.map(lambda x: x[None], (outs, means)), state

  specs = optax_lamb16.CompressedAllReduceState(P("data"), P("data"))
  f = jax.jit(jax.shard_map(per_rank, mesh=make_mesh(world), in_specs=P("data"), out_specs=(P("data"), specs)))
  (outs, means), state = f(jax.tree.map(jnp.asarray, tree))
  return jax.tree.map(np.asarray, outs), h.flat_errors(state), jax.tree.map(np.asarray, means)


def test_float64_leaves_are_exchanged_in_float32_and_averaged_exactly_in_float64():
  """With jax_enable_x64, next to a float32 leaf: the compressed exchange takes the float64 leaf rounded to float32
  (SPEC.md section 3: float32 signs, scales and error feedback) and hands its estimate back as float64, bitwise the
  exchange of the rounded tree widened (and the oracle's); the exact mean is float64 for the float64 leaf (float32
  would be 1e-8 off) and float32 for the float32 leaf."""
  world, calls = 4, 3
  rng = np.random.default_rng(64)
  tree = {"a": rng.standard_normal((world, calls, 40)), "b": rng.standard_normal((world, calls, 9)).astype(np.float32)}
  rounded = {"a": tree["a"].astype(np.float32), "b": tree["b"]}
  with jax.enable_x64(True):
    outs, errors, means = _exchange_and_mean_calls(tree)
    want_outs, want_errors, want_means = _exchange_and_mean_calls(rounded)
  assert (outs["a"].dtype, outs["b"].dtype, means["a"].dtype) == (np.float64, np.float32, np.float64)
  np.testing.assert_array_equal(outs["a"], want_outs["a"].astype(np.float64))
  np.testing.assert_array_equal(outs["b"], want_outs["b"])
  for error, want_error in zip(errors, want_errors):
    assert error.dtype == np.float32
    np.testing.assert_array_equal(error, want_error)
  oracle = reference.CompressedAllReduceReference(49, world)
  for t in range(calls):
    want = oracle([np.concatenate([rounded["a"][r, t], rounded["b"][r, t]]) for r in range(world)])
    np.testing.assert_allclose(np.concatenate([outs["a"][0, t], outs["b"][0, t]]), want, rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(means["a"], np.broadcast_to(tree["a"].mean(axis=0), means["a"].shape), rtol=1e-14)
  np.testing.assert_allclose(means["b"], np.broadcast_to(tree["b"].mean(axis=0), means["b"].shape), rtol=1e-6)


DOCTESTED = (
  "_compression",
  "_gradient_mean",
  "_onebit_adam",
  "_zero_one_adam",
  "_onebit_lamb",
  "comm",
  "_sharding",
  "_data_parallel",
)


def test_docstring_examples_run_on_a_single_device(tmp_path):
  """The examples must not rely on the 8 host devices this suite forces: run them with `doctest` in a fresh
  process that has one."""
  from tests.workers import launch

  script = tmp_path / "doctests.py"
  script.write_text(
    "import doctest, importlib, jax\n"
    "assert jax.device_count() == 1, jax.devices()\n"
    f"for name in {DOCTESTED!r}:\n"
    "  result = doctest.testmod(importlib.import_module('optax_lamb16.' + name))\n"
    "  assert result.failed == 0, (name, result)\n"
    "  print(name, result.attempted)\n"
  )
  launch.run_process(script, [], devices=1)
