"""0/1 Adam against the NumPy oracle of SPEC.md sections 2 and 5: variance-interval doubling, freeze, local steps
and syncs, with small scalers so that every phase happens within the run."""

import numpy as np
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests import reference

pytestmark = pytest.mark.filterwarnings("ignore::optax_lamb16._onebit.LargeFirstStepsWarning")  # tested in test_drop_in

STEPS = 40
SCHEDULE = dict(var_freeze_step=14, var_update_scaler=2, local_step_scaler=3, local_step_clipper=4)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_numpy_oracle_through_all_phases(world, weight_decay):
  params, x, y, noise = h.make_problem(world, STEPS, seed=10 + world)
  make = lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, weight_decay=weight_decay, **SCHEDULE)
  got, states = h.run_jax(make, world, params, x, y, noise, per_rank_params=True, with_states=True)
  oracle = reference.ZeroOneAdamReference(
    [params[n] for n in h.NAMES], world, 0.01, weight_decay=weight_decay, **SCHEDULE
  )
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
  # A sync zeroes the accumulated update lazily: it sets lr_sum to 0, which makes the buffer count as 0 whatever it
  # holds, and the first local step after it accumulates from 0 again: the buffer then holds that step's movement.
  after_sync = [t for t, kind in enumerate(log) if kind == "local" and t and log[t - 1] == "local+sync"]
  assert after_sync, log
  for t, kind in enumerate(log):
    lr_sum = states.lr_sum[:, t]
    if kind == "local+sync":
      assert (lr_sum == 0).all(), (t, lr_sum)
    elif kind == "local":
      assert (lr_sum > 0).all(), (t, lr_sum)
      if t in after_sync:
        for n in h.NAMES:
          moved = got[n][:, t] - got[n][:, t - 1]
          stored = states.accumulated_update[n][:, t].reshape(moved.shape)
          np.testing.assert_allclose(stored, moved, rtol=1e-5, atol=1e-7 * np.abs(got[n][:, t]).max())
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
  oracle = reference.ZeroOneAdamReference(
    [params[n] for n in h.NAMES], world, 0.01, weight_decay=0.01, mask=[mask[n] for n in h.NAMES], **SCHEDULE
  )
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  phases = h.zero_one_adam_phases(states)
  assert phases == oracle.log and "local+sync" in phases and "compressed" in phases, (phases, oracle.log)
  unmasked = h.run_jax(
    lambda comm: optax_lamb16.zero_one_adam(0.01, comm=comm, weight_decay=0.01, **SCHEDULE),
    world,
    params,
    x,
    y,
    noise,
    per_rank_params=True,
  )
  assert np.abs(unmasked["w"][:, -1] - got["w"][:, -1]).max() > 1e-3


def test_sharded_init_with_a_0d_param_matches_numpy_oracle_through_all_phases():
  """`sharded_init` used to give the per-rank momentum of the 0-d param "s" the spec P('data'), which a 0-d array
  cannot have; per-rank leaves are stored at least 1-d. Step by step (one program at a time) over global arrays."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

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

  step = jax.jit(
    jax.shard_map(
      local_step, mesh=mesh, in_specs=(P("data"), specs, P("data"), P("data"), P("data")), out_specs=(P("data"), specs)
    )
  )
  trajectory, schedule = [], []
  for t in range(steps):
    local, state = jax.block_until_ready(
      step(local, state, put(x, P("data")), put(y, P("data")), {n: put(a[t], P("data")) for n, a in noise.items()})
    )
    trajectory.append(jax.tree.map(np.asarray, local))
    schedule.append(state._replace(mu=None, nu=None, accumulated_update=None, exchange=None))  # the replicated scalars
  got = {n: np.stack([p[n] for p in trajectory], axis=1) for n in h.NAMES}
  oracle = reference.ZeroOneAdamReference([params[n] for n in h.NAMES], world, 0.01, weight_decay=0.01, **SCHEDULE)
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  phases = h.zero_one_adam_phases(jax.tree.map(lambda *a: np.stack(a)[None], *schedule))  # leaves (1, T)
  assert phases == oracle.log and {"variance", "compressed", "local", "local+sync"} <= set(phases), (phases, oracle.log)


def test_sync_after_a_zero_learning_rate_keeps_m_and_moves_nothing():
  """With a zero learning rate on every step since the last sync, `lr_sum` is 0 at the sync: DeepSpeed would set
  ``m = -w / 0`` (and move the params by what the error feedback still holds). The library keeps m (the local
  step's) and leaves every rank's params where they are."""
  import jax
  import jax.numpy as jnp
  import optax

  freeze, last_nonzero = 4, 9
  schedule = lambda count: jnp.where(count <= last_nonzero, 0.01, 0.0)  # syncs with lr > 0 first, then lr = 0
  tx = optax_lamb16.zero_one_adam(
    schedule, comm="data", var_freeze_step=freeze, local_step_scaler=1, local_step_clipper=2
  )
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32), "b": jnp.zeros((2, 7), jnp.float32)}

  def step(params, state, grads):
    updates, new_state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), new_state

  run = jax.jit(jax.vmap(step, axis_name="data"))
  state = jax.vmap(tx.init, axis_name="data")(params)
  checked = 0
  for _ in range(20):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    new_params, new_state = jax.block_until_ready(run(params, state, grads))
    updates_so_far = int(state.count[0]) - 1  # what the schedule sees
    sync = bool(state.frozen[0]) and (updates_so_far + 2) % int(state.local_step_interval[0]) == 0
    if sync and updates_so_far > last_nonzero and float(state.lr_sum[0]) == 0:
      assert np.abs(h.flat_errors(state.exchange).worker_error).max() > 0  # the exchange does deliver a nonzero w
      checked += 1
      for n in params:
        np.testing.assert_array_equal(new_params[n], params[n])
        local_m = 0.9 * np.asarray(state.mu[n], np.float64) + 0.1 * np.asarray(grads[n], np.float64)
        assert np.isfinite(np.asarray(new_state.mu[n])).all()
        np.testing.assert_allclose(new_state.mu[n], local_m, rtol=1e-6, atol=1e-7)
    params, state = new_params, new_state
  assert checked >= 2, checked
