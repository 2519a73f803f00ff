"""`optax_lamb16.apply_if_finite`: a NaN/inf on any one rank skips the step on every rank, on every backend; LAMB16's
float8 v overflowing to +inf is state, not a non-finite gradient (for optax.apply_if_finite too), and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests.workers import launch
from tests.workers.nonfinite_worker import check_skips_together
from tests.workers.optimizers import ALL_OPTIMIZERS

WORKER = launch.ROOT / "tests" / "workers" / "nonfinite_worker.py"


@pytest.mark.parametrize("name", ALL_OPTIMIZERS)
@pytest.mark.parametrize("world", [1, 4])
def test_a_bad_gradient_on_one_rank_skips_the_step_everywhere(name, world):
  mesh = None if world == 1 else h.host_mesh(world)
  assert check_skips_together(name, world, mesh) == []


@pytest.mark.slow
@pytest.mark.serial
def test_across_jax_distributed_processes(tmp_path):
  launch.run_distributed(WORKER, ["--out", str(tmp_path)], num_processes=2, devices_per_process=2)


@pytest.mark.slow
@pytest.mark.serial
def test_across_mpi_ranks(tmp_path):
  launch.run_mpi(WORKER, ["--out", str(tmp_path), "--mpi"], num_ranks=2)


def test_gives_up_after_max_consecutive_errors_like_optax():
  params = {"w": jnp.ones(3)}
  ours = optax_lamb16.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2)
  theirs = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2)
  state_ours, state_theirs = ours.init(params), theirs.init(params)
  for g in [1.0, jnp.nan, jnp.nan, jnp.nan, 2.0, jnp.inf]:
    grads = {"w": jnp.full(3, g)}
    u_ours, state_ours = jax.jit(ours.update)(grads, state_ours, params)
    u_theirs, state_theirs = theirs.update(grads, state_theirs, params)
    np.testing.assert_array_equal(u_ours["w"], u_theirs["w"])
    for a, b in zip(jax.tree.leaves(state_ours), jax.tree.leaves(state_theirs)):
      np.testing.assert_array_equal(a, b)
  assert int(state_ours.total_notfinite) == 4


def test_rejects_a_negative_max_consecutive_errors():
  with pytest.raises(ValueError, match="max_consecutive_errors"):
    optax_lamb16.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=-1)


# -- LAMB16's float8 v overflowing to +inf (optax_lamb16/_float8.py) is state, not a non-finite gradient -------------


def _overflowing_problem():
  """A big, otherwise quiet leaf (its v scale ~eps) with one large gradient: its v encodes to +inf after a step."""
  n = 200_000
  params = {"big": jnp.zeros(n), "w": jnp.ones(3)}
  grads = {"big": jnp.zeros(n).at[0].set(10.0).at[1].set(0.01), "w": jnp.full(3, 0.1)}
  return params, grads


def _holds_inf(state) -> bool:
  return any(
    leaf.dtype == jnp.float8_e5m2 and bool(jnp.isposinf(leaf.astype(jnp.float32)).any())
    for leaf in jax.tree.leaves(state)
  )


@pytest.mark.parametrize(
  "wrapper", [optax_lamb16.apply_if_finite, optax.apply_if_finite], ids=["optax_lamb16", "optax"]
)
def test_float8_state_overflow_is_not_taken_for_a_nonfinite_gradient(wrapper):
  params, grads = _overflowing_problem()
  tx = wrapper(optax_lamb16.lamb16(1e-2), max_consecutive_errors=2)
  step = jax.jit(tx.update)
  state = tx.init(params)
  start = params
  for _ in range(3):
    updates, state = step(grads, state, params)
    assert bool(state.last_finite) and int(state.total_notfinite) == 0
    assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    params = optax.apply_updates(params, updates)
    assert _holds_inf(state.inner_state)  # the overflowed v stays +inf (the documented, faithful behaviour)
  assert params["big"][1] != start["big"][1] and bool((params["w"] != start["w"]).all())  # training went on
  # A real non-finite gradient while the state holds inf: skipped, the state (its inf included) bitwise kept.
  updates, skipped = step({**grads, "w": jnp.array([0.1, jnp.nan, 0.1])}, state, params)
  assert not bool(skipped.last_finite) and int(skipped.total_notfinite) == 1
  assert not any(bool(u.any()) for u in jax.tree.leaves(updates))
  assert h.same_bits(skipped.inner_state, state.inner_state)


def test_a_state_holding_float8_inf_checkpoints_and_restores_bitwise(tmp_path):
  params, grads = _overflowing_problem()
  tx = optax_lamb16.apply_if_finite(optax_lamb16.lamb16(1e-2), max_consecutive_errors=2)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(grads, s, p)))
  params, state = step(params, tx.init(params))
  assert _holds_inf(state)
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(1, {"params": params, "opt_state": state}, world_size=1)
    restored = checkpoints.restore({"params": params, "opt_state": state}, world_size=1)
  assert h.same_bits(restored, {"params": params, "opt_state": state})
  runs = []
  for p, s in ((params, state), (restored["params"], restored["opt_state"])):
    for _ in range(3):
      p, s = step(p, s)
    runs.append((p, s))
  assert h.same_bits(*runs) and int(runs[0][1].total_notfinite) == 0
