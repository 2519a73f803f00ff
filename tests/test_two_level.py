"""The two-level compressed exchange (SPEC.md section 3b, `comm.TwoLevel`) against its NumPy oracle, its invariants,
its inter-host bytes, and the three 1-bit optimizers over a hosts x local grid against their oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from benchmarks import comm_volume
from optax_lamb16 import _compression as car
from tests import onebit_harness as h
from tests import reference
from tests.workers.inputs import random_inputs

GRID = h.GRID_AXES


def grid_comm():
  return optax_lamb16.comm.TwoLevel(fast="local", slow="hosts")


def exchange_fn(hosts, local, n):
  """Jitted f(inputs (P, T, n)) -> (outputs (P, T, n), states after every call (P, T, length)), over the grid."""
  comm = grid_comm()

  def per_rank(x):
    state = optax_lamb16.init_compressed_allreduce(n, comm)

    def call(state, x_t):
      out, state = optax_lamb16.compressed_allreduce(x_t, state, comm)
      return state, (out, state)

    _, (outs, states) = jax.lax.scan(call, state, x[0])
    return outs[None], jax.tree.map(lambda s: s[None], states)

  specs = optax_lamb16.CompressedAllReduceState(P(GRID), P(GRID))
  return jax.jit(jax.shard_map(per_rank, mesh=h.grid_mesh(hosts, local), in_specs=P(GRID), out_specs=(P(GRID), specs)))


@pytest.mark.parametrize("hosts,local", [(2, 2), (2, 4), (4, 2), (3, 2), (1, 4)])
def test_matches_numpy_oracle_for_12_calls(hosts, local):
  """Each call, from the error buffers the previous call left, gives the oracle's output and error buffers."""
  world, calls, n = hosts * local, 12, 1000
  inputs = random_inputs(world, calls, n, seed=hosts * 10 + local)
  outs, states = jax.tree.map(np.asarray, exchange_fn(hosts, local, n)(jnp.asarray(inputs)))
  oracle = reference.TwoLevelCompressedAllReduceReference(n, hosts, local)
  per_rank_states = jax.tree.map(lambda a: a.reshape(world, calls, -1), h.flat_errors(states))
  for t in range(calls):
    if t > 0 and hosts > 1:  # start this call from the error feedback the JAX code carried
      for r in range(world):
        oracle.set_errors(r, per_rank_states.worker_error[r, t - 1], per_rank_states.server_error[r, t - 1])
    want = oracle([inputs[r, t] for r in range(world)])
    for r in range(world):
      np.testing.assert_allclose(outs[r, t], want, rtol=2e-6, atol=1e-6, err_msg=f"call {t}, rank {r}")
      if hosts > 1:
        worker, server = oracle.errors(r)
        np.testing.assert_allclose(per_rank_states.worker_error[r, t], worker, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(per_rank_states.server_error[r, t], server, rtol=1e-5, atol=1e-5)
  if hosts == 1:  # one host: the exact mean, and no error feedback to keep
    np.testing.assert_allclose(outs[0], inputs.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert [w.size for w in states.worker_error] == [0]


@pytest.mark.parametrize("hosts,local", [(2, 2), (2, 3)])
def test_output_is_bitwise_identical_on_every_rank(hosts, local):
  world = hosts * local
  outs, _ = exchange_fn(hosts, local, 777)(jnp.asarray(random_inputs(world, 4, 777, seed=3)))
  outs = np.asarray(outs)
  for r in range(1, world):
    np.testing.assert_array_equal(outs[r], outs[0])


def test_error_buffers_are_one_shard_long():
  """Each rank keeps the error of its 1/L shard: N_pad / L and N_pad / (L H) elements, not N_pad and N_pad / P."""
  n, hosts, local = 1000, 2, 4
  n_pad = car.padded_length(n, hosts * local, local)
  assert n_pad % (local * hosts * 8) == 0 and n_pad >= n
  assert car.error_buffer_lengths((n,), hosts * local, local) == ((n_pad // local,), n_pad // (local * hosts))
  assert car.error_buffer_lengths((600, 400), hosts * local, local) == ((n_pad // local,), n_pad // (local * hosts))
  _, states = exchange_fn(hosts, local, n)(jnp.zeros((hosts * local, 1, n)))
  assert [w.shape for w in states.worker_error] == [(hosts * local, 1, n_pad // local)]


def test_grid_collectives_match_the_flat_axis_pair():
  """`TwoLevel` is a whole `Communicator`: its all-to-all and all-gather over the grid are those of the axis pair
  ("hosts", "local") with the ranks hosts major."""
  hosts, local = 2, 3
  world = hosts * local
  comm = grid_comm()
  x = jnp.asarray(np.arange(world * world * 2, dtype=np.float32).reshape(world, world, 2))

  def per_rank(x):
    assert comm.size == world and optax_lamb16.comm.ranks_per_host(comm) == local  # static, where the axes are bound
    mine = x[0]
    return (
      comm.all_to_all(mine)[None],
      jax.lax.all_to_all(mine, GRID, 0, 0)[None],
      comm.all_gather(mine[0])[None],
      jax.lax.all_gather(mine[0], GRID)[None],
      comm.mean(mine)[None],
      jax.lax.pmean(mine, GRID)[None],
    )

  outs = jax.jit(
    jax.shard_map(per_rank, mesh=h.grid_mesh(hosts, local), in_specs=P(GRID), out_specs=P(GRID), check_vma=False)
  )(x)
  for got, want in zip(outs[::2], outs[1::2]):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("hosts,local", [(2, 2), (2, 4)])
def test_inter_host_bytes_are_at_most_one_32L_th_of_a_float32_all_reduce(hosts, local):
  """The must-show of the two-level exchange, read from the compiled HLO: the bytes a rank sends across hosts per
  call are at most 1 / (32 L) of what a flat float32 ring all-reduce over all P ranks sends per rank."""
  n = 1 << 20
  world = hosts * local
  f = exchange_fn(hosts, local, n)
  hlo = f.lower(jnp.zeros((world, 1, n))).compile().as_text()
  mesh = h.grid_mesh(hosts, local)
  ids = [int(d.id) for d in mesh.devices.flat]
  assert "all-to-all" in hlo and ids == sorted(ids)
  inter, intra = comm_volume.inter_host_bytes(hlo, mesh)
  flat_all_reduce = 2 * (world - 1) / world * 4 * n
  assert 0 < inter <= flat_all_reduce / (32 * local), (inter, flat_all_reduce / (32 * local))
  # Inside the host: the float32 all-to-all of the shards, (L-1)/L * 4 * N_pad bytes, and the all-gather of each
  # shard's sign bits and H scales, (L-1) * (N_pad / (8 L) + 4 H) bytes.
  n_pad = car.padded_length(n, world, local)
  shard_floats = (local - 1) / local * 4 * n_pad
  assert intra == pytest.approx(shard_floats + (local - 1) * (n_pad / (8 * local) + 4 * hosts)), intra


STEPS = 24


@pytest.mark.parametrize(
  "name,hosts", [("onebit_adam", 2), ("zero_one_adam", 2), ("onebit_lamb", 2), ("onebit_lamb", 1)]
)
def test_onebit_optimizers_over_the_grid_match_their_oracles(name, hosts):
  """Each 1-bit optimizer with `comm=TwoLevel(...)` over 2 hosts x 2 ranks follows its oracle (section 3b's
  exchange in place of section 3's) through every phase, and the replicas stay bitwise identical. On one host of 4
  ranks the exchange is an exact mean of 1-bit LAMB's flat buffer, which it splits back into leaves."""
  world = 4
  params, x, y, noise = h.make_problem(world, STEPS, seed=40)
  leaves = [params[n] for n in h.NAMES]
  schedule = dict(var_freeze_step=10, var_update_scaler=2, local_step_scaler=3, local_step_clipper=4)
  zero_var = dict(mask_zero_variance=True)  # "z" never has a gradient: keep the exchange's sign noise off it
  make, oracle, per_rank_params = {
    "onebit_adam": (
      lambda comm: optax_lamb16.onebit_adam(0.01, comm=comm, freeze_step=8, **zero_var),
      reference.OnebitAdamReference(leaves, world, 8, 0.01, **zero_var),
      False,
    ),
    "zero_one_adam": (
      lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, **schedule, **zero_var),
      reference.ZeroOneAdamReference(leaves, world, 0.01, **schedule, **zero_var),
      True,
    ),
    "onebit_lamb": (
      lambda comm: optax_lamb16.onebit_lamb(0.01, comm=comm, freeze_step=8, **zero_var),
      reference.OnebitLambReference(leaves, world, 8, 0.01, **zero_var),
      False,
    ),
  }[name]
  got = h.run_jax(make, world, params, x, y, noise, per_rank_params=per_rank_params, hosts=hosts)
  h.assert_close_to_oracle(got, h.run_oracle(reference.on_grid(oracle, hosts), world, params, x, y, noise), world)
  if not per_rank_params:
    for n in h.NAMES:
      for r in range(1, world):
        np.testing.assert_array_equal(got[n][r], got[n][0])


def test_state_of_a_flat_layout_is_rejected_on_the_grid():
  """Error buffers made for 4 ranks in one level (N_pad long) do not fit 2 hosts x 2 ranks (N_pad / 2 long)."""
  n = 1000
  flat_state = optax_lamb16.CompressedAllReduceState(
    (jnp.zeros(n), jnp.zeros(car.padded_length(n, 4) - n)), jnp.zeros(car.padded_length(n, 4) // 4)
  )
  comm = grid_comm()

  def f(x):
    return optax_lamb16.compressed_allreduce(x[0], flat_state, comm)[0]

  with pytest.raises(ValueError, match=r"2 hosts of 2 ranks"):
    jax.jit(jax.shard_map(f, mesh=h.grid_mesh(2, 2), in_specs=P(GRID), out_specs=P()))(jnp.zeros((4, n)))


def test_the_same_axis_twice_is_a_clear_error():
  with pytest.raises(ValueError, match="two different mesh axes"):
    optax_lamb16.comm.TwoLevel(fast="data", slow="data")
