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
  got = h.run_jax(make, world, params, x, y, noise, per_rank_params=True)
  oracle = reference.ZeroOneAdamReference([params[n] for n in h.NAMES], world, 0.01, weight_decay=weight_decay,
                                          **SCHEDULE)
  trajectory = h.run_oracle(oracle, world, params, x, y, noise)
  # The run goes through every phase: variance steps with a doubling interval, compressed steps, local steps, syncs
  # with a widening interval.
  log = oracle.log
  assert {"variance", "compressed", "local", "local+sync"} <= set(log), log
  variance_steps = [t + 2 for t, kind in enumerate(log) if kind == "variance"]
  assert variance_steps[:4] == [2, 3, 4, 6], variance_steps  # interval 1, then 2 after two variance updates
  sync_steps = [t + 2 for t, kind in enumerate(log) if kind == "local+sync"]
  assert np.diff(sync_steps).max() == 4, sync_steps  # interval widened up to the clipper
  h.assert_close_to_oracle(got, trajectory, world)
  # Parameters differ per rank between syncs and agree again (to rounding) at sync steps.
  for t, kind in enumerate(log):
    spread = max(np.abs(got[n][:, t] - got[n][0, t]).max() for n in h.NAMES)
    if kind == "local":
      assert spread > 1e-6, (t, spread)
    else:
      assert spread <= 1e-6, (t, kind, spread)
