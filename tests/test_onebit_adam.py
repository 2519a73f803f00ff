"""1-bit Adam against the NumPy oracle of SPEC.md sections 2 and 4, through warm-up and compression."""

import numpy as np
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests import reference

pytestmark = pytest.mark.filterwarnings("ignore::optax_lamb16._onebit.LargeFirstStepsWarning")  # tested in test_drop_in

STEPS = 32


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_numpy_oracle_through_both_phases(world, weight_decay):
  freeze_step = 8  # 7 warm-up updates (t = 2..8), compression from t = 9
  params, x, y, noise = h.make_problem(world, STEPS, seed=world)
  mask = {
    "b": np.ones(h.OUT, np.float32),
    "s": np.ones((), np.float32),
    "w": np.ones((h.DIM, h.OUT), np.float32),
    "z": np.zeros(5, np.float32),
  }
  make = lambda comm: optax_lamb16.onebit_adam(
    0.01, comm=comm, freeze_step=freeze_step, weight_decay=weight_decay, momentum_mask=mask
  )
  got = h.run_jax(make, world, params, x, y, noise)
  oracle = reference.OnebitAdamReference(
    [params[n] for n in h.NAMES], world, freeze_step, 0.01, weight_decay=weight_decay, mask=[mask[n] for n in h.NAMES]
  )
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  # Bitwise identical parameters on all ranks at every step, in both phases.
  for name in h.NAMES:
    for r in range(1, world):
      np.testing.assert_array_equal(got[name][r], got[name][0])


def test_one_rank_is_adam_without_bias_correction_then_frozen_v():
  params, x, y, noise = h.make_problem(1, STEPS)
  make = lambda comm: optax_lamb16.onebit_adam(0.01, comm=comm, freeze_step=10)
  got_axis = h.run_jax(make, 1, params, x, y, noise)
  oracle = reference.OnebitAdamReference([params[n] for n in h.NAMES], 1, 10, 0.01)
  h.assert_close_to_oracle(got_axis, h.run_oracle(oracle, 1, params, x, y, noise), 1)
