"""1-bit LAMB against the NumPy oracle of SPEC.md sections 2 and 6, through warm-up and compression."""

import numpy as np
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests import reference

STEPS = 32


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_matches_numpy_oracle_through_both_phases(world, weight_decay):
  freeze_step = 10
  params, x, y, noise = h.make_problem(world, STEPS, seed=20 + world)
  make = lambda comm: optax_lamb16.onebit_lamb(0.01, comm=comm, freeze_step=freeze_step, weight_decay=weight_decay)
  got = h.run_jax(make, world, params, x, y, noise)
  oracle = reference.OnebitLambReference([params[n] for n in h.NAMES], world, freeze_step, 0.01,
                                         weight_decay=weight_decay)
  trajectory = h.run_oracle(oracle, world, params, x, y, noise)
  h.assert_close_to_oracle(got, trajectory, world)
  assert oracle.car.n_pad > oracle.car.n and np.any(oracle.tail != 0)  # the padding tail is carried
  # "z" never had a gradient: guarded zero momentum, so it moves by weight decay alone (and not at all without it).
  assert oracle.scaling[h.NAMES.index("z")] == 0.0
  assert np.all(got["z"] <= 1.0) and np.all(got["z"] > 0.9)
  for name in h.NAMES:
    assert np.all(np.isfinite(got[name]))
    for r in range(1, world):
      np.testing.assert_array_equal(got[name][r], got[name][0])
