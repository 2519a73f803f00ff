"""Exact resume with `optax_lamb16.Checkpointer`: bitwise continuation in a new process, world-size changes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from optax_lamb16 import sharding
from tests import onebit_harness as h
from tests.workers import launch
from tests.workers.optimizers import make_optimizer

WORKER = launch.ROOT / "tests" / "workers" / "resume_worker.py"


@pytest.mark.parametrize("backend", ["single_device", "shard_map", "jax_distributed"])
def test_resume_in_a_new_process_is_bitwise_the_uninterrupted_run(backend, tmp_path):
  # Every optimizer, a save in each of its phases (0/1 Adam's between syncs too); params AND state compared.
  for phase in ("run", "resume"):
    args = ["--phase", phase, "--out", str(tmp_path)]
    if backend == "jax_distributed":
      launch.run_distributed(WORKER, args, num_processes=2, devices_per_process=2)
    else:
      launch.run_process(WORKER, args + (["--single"] if backend == "single_device" else []), devices=4)


def _mesh(world):
  return h.host_mesh(world)


def _trained(name, world, steps, per_rank_params=False):
  """A Stepper for `name` on `world` devices after `steps` steps of the harness problem."""
  params, x, y, noise = h.make_problem(world, steps)
  run = h.Stepper(lambda comm: make_optimizer(name, comm), params, _mesh(world), per_rank_params)
  xs, ys = run.put(x, P("data")), run.put(y, P("data"))
  for t in range(steps):
    run.params, run.state = jax.block_until_ready(run.step(run.params, run.state, xs, ys, run.noise(noise, t)))
  return run


def _bits(tree):
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", ["onebit_adam", "onebit_lamb"])
def test_a_world_size_change_is_an_error_unless_error_feedback_is_reset(name, tmp_path):
  saved = _trained(name, 4, 9)  # in the compression phase: error buffers are non-zero
  assert np.abs(np.asarray(saved.state.exchange.worker_error)).max() > 0
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(9, {"opt_state": saved.state}, world_size=4)
    fresh = h.Stepper(lambda comm: make_optimizer(name, comm), h.make_problem(2, 1)[0], _mesh(2))
    with pytest.raises(ValueError, match=r"4 data-parallel ranks, this job has 2 \(`world_size`\).*reset_error"):
      checkpoints.restore({"opt_state": fresh.state}, world_size=2)
    restored = checkpoints.restore({"opt_state": fresh.state}, world_size=2,
                                   on_world_size_change="reset_error_feedback")["opt_state"]
  # Error feedback (and 1-bit LAMB's padding tail) from zero, laid out for 2 ranks; everything else as saved.
  roles = jax.tree.leaves(sharding.leaf_roles(restored))
  assert sharding.ERROR_FEEDBACK in roles
  for role, got, was, want in zip(roles, *(jax.tree.leaves(s) for s in (restored, saved.state, fresh.state))):
    if role == sharding.REPLICATED:
      assert np.asarray(got).tobytes() == np.asarray(was).tobytes()
    else:
      assert got.shape == want.shape and got.sharding == want.sharding and not np.asarray(got).any()
  x, y, noise = h.make_problem(2, 1)[1:]
  params, _ = fresh.step(fresh.params, restored, fresh.put(x, P("data")), fresh.put(y, P("data")),
                         fresh.noise(noise, 0))  # and training goes on
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_a_world_size_change_takes_other_per_rank_state_from_rank_0(tmp_path):
  saved = _trained("zero_one_adam", 4, 14, per_rank_params=True)  # between syncs: momenta differ per rank
  mu = np.asarray(saved.state.mu["w"]).reshape(4, -1, 12)
  assert not np.array_equal(mu[0], mu[1])
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(14, saved.state, world_size=4)
    fresh = h.Stepper(lambda comm: make_optimizer("zero_one_adam", comm), h.make_problem(2, 1)[0], _mesh(2), True)
    restored = checkpoints.restore(fresh.state, world_size=2, on_world_size_change="reset_error_feedback")
  np.testing.assert_array_equal(np.asarray(restored.mu["w"]).reshape(2, -1, 12), np.stack([mu[0], mu[0]]))
  assert int(restored.count) == int(saved.state.count)


def test_dropping_the_error_feedback_on_resume_changes_the_run(tmp_path):
  # What DeepSpeed does on every load; it is why the exact-resume comparison above can fail.
  params, x, y, noise = h.make_problem(4, 12)
  runs = []
  for drop in (False, True):
    run = h.Stepper(lambda comm: make_optimizer("onebit_adam", comm), params, _mesh(4))
    xs, ys = run.put(x, P("data")), run.put(y, P("data"))
    p, s = run.params, run.state
    for t in range(12):
      if drop and t == 9:
        s = s._replace(exchange=jax.tree.map(jnp.zeros_like, s.exchange))
      p, s = jax.block_until_ready(run.step(p, s, xs, ys, run.noise(noise, t)))
    runs.append(np.asarray(p["w"]))
  assert not np.array_equal(runs[0], runs[1])


def test_restore_checks_structure_shapes_and_arguments(tmp_path):
  params = {"w": jnp.ones((3, 2)), "empty": jnp.zeros((0,)), "half": jnp.ones(4, jnp.bfloat16)}
  tx = optax_lamb16.lamb16(1e-2)
  state = tx.init(params)
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      checkpoints.restore(state, world_size=1)
    checkpoints.save(1, {"params": params, "opt_state": state}, world_size=1)
    restored = checkpoints.restore({"params": params, "opt_state": state}, world_size=1)
    assert _bits(restored) == _bits({"params": params, "opt_state": state})  # empty and bfloat16 leaves too
    with pytest.raises(ValueError, match="leaves only in one of them"):
      checkpoints.restore({"params": params}, world_size=1)
    wider = {"w": jnp.ones((3, 3)), "empty": params["empty"], "half": params["half"]}
    with pytest.raises(ValueError, match=r"\['opt_state'\].mu\['w'\] is float8_e4m3fn\[3, 2\]"):
      checkpoints.restore({"params": wider, "opt_state": tx.init(wider)}, world_size=1)
    with pytest.raises(ValueError, match="on_world_size_change"):
      checkpoints.restore(state, world_size=1, on_world_size_change="ignore")
