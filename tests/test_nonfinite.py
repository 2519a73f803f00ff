"""`optax_lamb16.apply_if_finite`: a NaN/inf on any one rank skips the step on every rank, on every backend."""

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


def test_across_jax_distributed_processes(tmp_path):
  launch.run_distributed(WORKER, ["--out", str(tmp_path)], num_processes=2, devices_per_process=2)


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
