"""1-bit LAMB against the NumPy oracle of SPEC.md sections 2 and 6, through warm-up and compression."""

import re

import jax
import jax.numpy as jnp
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
  got, states = h.run_jax(make, world, params, x, y, noise, with_states=True)
  oracle = reference.OnebitLambReference(
    [params[n] for n in h.NAMES], world, freeze_step, 0.01, weight_decay=weight_decay
  )
  trajectory = h.run_oracle(oracle, world, params, x, y, noise)
  h.assert_close_to_oracle(got, trajectory, world)
  # The padding tail is carried: this problem pads (setup), and the library's final tail is the oracle's, non-zero.
  assert oracle.car.n_pad > oracle.car.n
  for r in range(world):
    final = h.state_at(states, rank=r)
    assert final.padding_tail.shape == (oracle.car.n_pad - oracle.car.n,), final.padding_tail.shape
    assert np.any(final.padding_tail != 0)
    np.testing.assert_allclose(final.padding_tail, oracle.tail, rtol=1e-5, atol=1e-7)
    # "z" never had a gradient: its scaling coefficient (fixed at the first compression step) is the guarded 0, the
    # other leaves' are positive.
    assert final.scaling_coeff["z"] == 0.0
    assert all(final.scaling_coeff[n] > 0 for n in h.NAMES if n != "z"), final.scaling_coeff
  # So "z" has zero momentum and moves by weight decay alone (and not at all without it).
  assert np.all(got["z"] <= 1.0) and np.all(got["z"] > 0.9)
  for name in h.NAMES:
    assert np.all(np.isfinite(got[name]))
    for r in range(1, world):
      np.testing.assert_array_equal(got[name][r], got[name][0])


def test_momentum_mask_matches_numpy_oracle():
  """The mask multiplies the averaged momentum after it is divided by the scaling coefficient (SPEC.md section 6)."""
  world, freeze_step = 2, 6
  params, x, y, noise = h.make_problem(world, 20, seed=24)
  mask = h.partial_mask()
  make = lambda comm: optax_lamb16.onebit_lamb(
    0.01, comm=comm, freeze_step=freeze_step, weight_decay=0.01, momentum_mask=mask
  )
  got, states = h.run_jax(make, world, params, x, y, noise, with_states=True)
  oracle = reference.OnebitLambReference(
    [params[n] for n in h.NAMES], world, freeze_step, 0.01, weight_decay=0.01, mask=[mask[n] for n in h.NAMES]
  )
  h.assert_close_to_oracle(got, h.run_oracle(oracle, world, params, x, y, noise), world)
  for r in range(world):  # the mask acted on the library's momentum: masked rows exactly 0, the others not
    mu_w = h.state_at(states, rank=r).mu["w"]
    assert not mu_w[::2].any() and np.all(mu_w[1::2] != 0), mu_w
  unmasked = h.run_jax(
    lambda comm: optax_lamb16.onebit_lamb(0.01, comm=comm, freeze_step=freeze_step, weight_decay=0.01),
    world,
    params,
    x,
    y,
    noise,
  )
  assert np.abs(unmasked["w"][:, -1] - got["w"][:, -1]).max() > 1e-3  # and it changes the run


def test_untaken_phase_is_not_computed():
  """Each phase runs in its own loop of 0 or 1 trips (`_onebit.run_if`): the compiled update has two loops at its
  top level and none of the phases' reductions (norms, factor maxima) outside them, only the step's element-wise
  pass."""
  tx = optax_lamb16.onebit_lamb(0.01, comm=None, freeze_step=4, weight_decay=0.01)
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
  hlo = jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text()
  entry = hlo[hlo.index("ENTRY") :]
  entry = entry[: entry.index("\n}")]
  assert len(re.findall(r" while\(", entry)) == 2, entry
  # Computations that reduce (norms, factor maxima), and what the top level calls.
  reducing = {
    m.group(1) for m in re.finditer(r"\n(%[\w.-]+) [^\n]*\{\n((?:(?!\n\}).)*)", hlo, re.S) if " reduce(" in m.group(2)
  }
  called = set(re.findall(r"calls=(%[\w.-]+)", entry))
  assert reducing and not reducing & called and " reduce(" not in entry, reducing & called
