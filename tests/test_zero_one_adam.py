"""0/1 Adam against the NumPy oracle of SPEC.md sections 2 and 5: variance-interval doubling, freeze, local steps
and syncs, with small scalers so that every phase happens within the run."""

import numpy as np
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests import reference

STEPS = 40
SCHEDULE = dict(var_freeze_step=14, var_update_scaler=2, local_step_scaler=3, local_step_clipper=4)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_numpy_oracle_through_all_phases(world, weight_decay):
  params, x, y, noise = h.make_problem(world, STEPS, seed=10 + world)
  make = lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, weight_decay=weight_decay, **SCHEDULE)
  got, states = h.run_jax(make, world, params, x, y, noise, per_rank_params=True, with_states=True)
  oracle = reference.ZeroOneAdamReference([params[n] for n in h.NAMES], world, 0.01, weight_decay=weight_decay,
                                          **SCHEDULE)
  trajectory = h.run_oracle(oracle, world, params, x, y, noise)
  # The library's phase schedule (from its state: frozen, var_interval, local_step_interval, count) is the oracle's,
  # on every rank, and goes through every phase: variance steps with a doubling interval, compressed steps, local
  # steps, syncs with a widening interval.
  log = h.zero_one_adam_phases(states)
  for r in range(world):
    assert h.zero_one_adam_phases(states, r) == oracle.log, (r, h.zero_one_adam_phases(states, r), oracle.log)
  assert {"variance", "compressed", "local", "local+sync"} <= set(log), log
  variance_steps = [t + 2 for t, kind in enumerate(log) if kind == "variance"]
  assert variance_steps[:4] == [2, 3, 4, 6], variance_steps  # interval 1, then 2 after two variance updates
  sync_steps = [t + 2 for t, kind in enumerate(log) if kind == "local+sync"]
  assert np.diff(sync_steps).max() == 4, sync_steps  # interval widened up to the clipper
  h.assert_close_to_oracle(got, trajectory, world)
  # A sync zeroes the accumulated update lazily: it sets lr_sum to 0, which makes the buffer count as 0, and the buffer
  # keeps that sync's update of the params; local steps accumulate again from 0.
  for t, kind in enumerate(log):
    lr_sum = states.lr_sum[:, t]
    if kind == "local+sync":
      assert (lr_sum == 0).all(), (t, lr_sum)
      for n in h.NAMES:
        moved = got[n][:, t] - (got[n][:, t - 1] if t else params[n])
        stored = states.accumulated_update[n][:, t].reshape(moved.shape)
        np.testing.assert_allclose(stored, moved, rtol=1e-5, atol=1e-7 * np.abs(got[n][:, t]).max())
    elif kind == "local":
      assert (lr_sum > 0).all(), (t, lr_sum)
  # Parameters differ per rank between syncs and agree again (to rounding) at sync steps.
  for t, kind in enumerate(log):
    spread = max(np.abs(got[n][:, t] - got[n][0, t]).max() for n in h.NAMES)
    if kind == "local":
      assert spread > 1e-6, (t, spread)
    else:  # a few float32 ulps of the largest parameter
      ulp = np.spacing(max(np.abs(got[n][:, t]).max() for n in h.NAMES))
      assert spread <= 4 * ulp, (t, kind, spread, ulp)


def test_momentum_mask_matches_numpy_oracle():
  """The mask multiplies every compressed exchange's output: the gradients' before the freeze, the accumulated
  updates' at syncs (SPEC.md section 5)."""
  world = 2
  params, x, y, noise = h.make_problem(world, 30, seed=13)
  mask = h.partial_mask()
  make = lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, weight_decay=0.01, momentum_mask=mask, **SCHEDULE)
  got, states = h.run_jax(make, world, params, x, y, noise, per_rank_params=True, with_states=True)
  oracle = reference.ZeroOneAdamReference([params[n] for n in h.NAMES], world, 0.01, weight_decay=0.01,
                                          mask=[mask[n] for n in h.NAMES], **SCHEDULE)
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  phases = h.zero_one_adam_phases(states)
  assert phases == oracle.log and "local+sync" in phases and "compressed" in phases, (phases, oracle.log)
  unmasked = h.run_jax(lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, weight_decay=0.01, **SCHEDULE),
                       world, params, x, y, noise, per_rank_params=True)
  assert np.abs(unmasked["w"][:, -1] - got["w"][:, -1]).max() > 1e-3


def test_sharded_init_with_a_0d_param_matches_numpy_oracle_through_all_phases():
  """`sharded_init` used to give the per-rank momentum of the 0-d param "s" the spec P('data'), which a 0-d array
  cannot have; per-rank leaves are stored at least 1-d. Step by step (one program at a time) over global arrays."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  world, steps = 2, 24
  params, x, y, noise = h.make_problem(world, steps, seed=14)
  mesh = h.host_mesh(world)
  tx = optax_lamb16.zero_one_adam(0.01, comm="data", weight_decay=0.01, **SCHEDULE)
  state = optax_lamb16.sharded_init(tx, params, mesh, "data")
  specs = optax_lamb16.state_partition_specs(state, "data")
  assert state.mu["s"].shape == (world,) and state.accumulated_update["s"].shape == (world,)
  assert specs.mu["s"] == P("data") and specs.nu["s"] == P() and state.nu["s"].shape == ()
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  local = {n: put(np.broadcast_to(p, (world, *p.shape)), P("data")) for n, p in params.items()}

  def local_step(params, state, x, y, noise_t):
    mine = jax.tree.map(lambda a: a[0], params)
    mine, state = h.noisy_step(tx, mine, state, x, y, noise_t, 0)
    return jax.tree.map(lambda a: a[None], mine), state

  step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(P("data"), specs, P("data"), P("data"), P("data")),
                               out_specs=(P("data"), specs)))
  trajectory, schedule = [], []
  for t in range(steps):
    local, state = jax.block_until_ready(step(local, state, put(x, P("data")), put(y, P("data")),
                                              {n: put(a[t], P("data")) for n, a in noise.items()}))
    trajectory.append(jax.tree.map(np.asarray, local))
    schedule.append(state._replace(mu=None, nu=None, accumulated_update=None, exchange=None))  # the replicated scalars
  got = {n: np.stack([p[n] for p in trajectory], axis=1) for n in h.NAMES}
  oracle = reference.ZeroOneAdamReference([params[n] for n in h.NAMES], world, 0.01, weight_decay=0.01, **SCHEDULE)
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  phases = h.zero_one_adam_phases(jax.tree.map(lambda *a: np.stack(a)[None], *schedule))  # leaves (1, T)
  assert phases == oracle.log and {"variance", "compressed", "local", "local+sync"} <= set(phases), (phases,
                                                                                                     oracle.log)
