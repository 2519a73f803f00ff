"""The 1-bit optimizers' drop-in mode (SPEC.md section 6b): the exact counterparts' rules with one rank, the NumPy
oracles with several, and the argument's checks and the faithful mode's step-size warning."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lamb16
from optax_lamb16 import _onebit
from tests import onebit_harness as h
from tests import reference

pytestmark = pytest.mark.filterwarnings("ignore::optax_lamb16._onebit.LargeFirstStepsWarning")  # tested below

STEPS = 12
NEVER = 10**6  # a freeze (and a variance-interval doubling) beyond the run
LR = 0.01


def _one_rank_trajectories(make_a, make_b, steps=STEPS):
  """Both optimizers on the one-rank least-squares problem with the same gradient noise; each one's params after
  every step, stacked as {name: (steps, ...)}, one jitted scan each."""
  params, x, y, noise = h.make_problem(1, steps)

  def run(tx):
    def step(carry, noise_t):
      carry = h.noisy_step(tx, *carry, x, y, noise_t, 0)
      return carry, carry[0]

    with jax.numpy_dtype_promotion("standard"):  # optax's own optimizers mix weakly typed scalars
      return jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), noise)[1])(params)

  return run(make_a()), run(make_b())


def _assert_same_trajectory(got, want, rtol=2e-6):
  for name in h.NAMES:
    for t in range(STEPS):
      gap = np.linalg.norm(np.asarray(got[name][t]) - np.asarray(want[name][t]))
      assert gap <= rtol * np.linalg.norm(np.asarray(want[name][t])), (name, t, gap)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_onebit_adam_warmup_is_optax_adamw_with_one_rank(weight_decay):
  make = lambda: optax_lamb16.onebit_adam(LR, comm=None, freeze_step=NEVER, weight_decay=weight_decay, mode="drop_in")
  got, want = _one_rank_trajectories(make, lambda: optax.adamw(LR, weight_decay=weight_decay))
  _assert_same_trajectory(got, want)
  if weight_decay:
    return
  # The faithful mode (no bias correction) is not: its first step is 3.2 x Adam's.
  faithful, _ = _one_rank_trajectories(
    lambda: optax_lamb16.onebit_adam(LR, comm=None, freeze_step=NEVER), lambda: optax.adam(LR)
  )
  with pytest.raises(AssertionError):
    _assert_same_trajectory(faithful, want)


def test_zero_one_adam_with_every_step_a_variance_step_is_optax_adam_with_one_rank():
  make = lambda: optax_lamb16.zero_one_adam(
    LR, comm=None, var_freeze_step=NEVER, var_update_scaler=NEVER, mode="drop_in"
  )
  _assert_same_trajectory(*_one_rank_trajectories(make, lambda: optax.adam(LR)))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_onebit_lamb_warmup_is_optax_lamb_with_one_rank(weight_decay):
  # Unclipped trust ratios as optax's; the problem's zero bias and gradient-free leaf take optax's ratio 1.
  make = lambda: optax_lamb16.onebit_lamb(
    LR, comm=None, freeze_step=NEVER, weight_decay=weight_decay, min_coeff=0.0, max_coeff=float("inf"), mode="drop_in"
  )
  want = lambda: optax.lamb(LR, eps=1e-8, weight_decay=weight_decay)  # optax.lamb's default eps is 1e-6
  _assert_same_trajectory(*_one_rank_trajectories(make, want))


WORLD = 2


def _against_oracle(make, oracle, per_rank_params=False):
  params, x, y, noise = h.make_problem(WORLD, STEPS, seed=3)
  got = h.run_jax(make, WORLD, params, x, y, noise, per_rank_params=per_rank_params)
  h.assert_close_to_oracle(got, h.run_oracle(oracle([params[n] for n in h.NAMES]), WORLD, params, x, y, noise), WORLD)


def test_onebit_adam_matches_the_oracle_through_both_phases():
  _against_oracle(
    lambda comm: optax_lamb16.onebit_adam(LR, comm=comm, freeze_step=5, weight_decay=0.01, mode="drop_in"),
    lambda p: reference.OnebitAdamReference(p, WORLD, 5, LR, weight_decay=0.01, drop_in=True),
  )


def test_zero_one_adam_matches_the_oracle_through_every_phase():
  # Variance steps at doubling intervals (t = 2, 3, 4, 6), compressed ones between, then local steps with syncs.
  schedules = dict(var_freeze_step=6, var_update_scaler=2, local_step_scaler=2, local_step_clipper=4)
  oracle = lambda p: reference.ZeroOneAdamReference(p, WORLD, LR, weight_decay=0.01, drop_in=True, **schedules)
  _against_oracle(
    lambda comm: optax_lamb16.zero_one_adam(LR, comm=comm, weight_decay=0.01, mode="drop_in", **schedules),
    oracle,
    per_rank_params=True,
  )


def test_onebit_lamb_matches_the_oracle_through_both_phases():
  _against_oracle(
    lambda comm: optax_lamb16.onebit_lamb(LR, comm=comm, freeze_step=5, weight_decay=0.01, mode="drop_in"),
    lambda p: reference.OnebitLambReference(p, WORLD, 5, LR, weight_decay=0.01, drop_in=True),
  )


def test_the_modes_differ_after_the_freeze_too():
  """With one rank the drop-in 1-bit Adam's compression phase is Adam with v frozen at its bias-corrected value: not
  the faithful mode's frozen uncorrected v, and not Adam (whose v keeps moving)."""
  params, x, y, noise = h.make_problem(1, STEPS)
  run = lambda mode: h.run_oracle(
    reference.OnebitAdamReference([params[n] for n in h.NAMES], 1, 4, LR, drop_in=mode), 1, params, x, y, noise
  )
  got = h.run_jax(
    lambda comm: optax_lamb16.onebit_adam(LR, comm=comm, freeze_step=4, mode="drop_in"), 1, params, x, y, noise
  )
  h.assert_close_to_oracle(got, run(True), 1)
  with pytest.raises(AssertionError):
    h.assert_close_to_oracle(got, run(False), 1)


FACTORIES = {
  "onebit_adam": lambda **kw: optax_lamb16.onebit_adam(LR, comm=None, **kw),
  "scale_by_onebit_adam": lambda **kw: optax_lamb16.scale_by_onebit_adam(None, **kw),
  "zero_one_adam": lambda **kw: optax_lamb16.zero_one_adam(LR, comm=None, **kw),
  "onebit_lamb": lambda **kw: optax_lamb16.onebit_lamb(LR, comm=None, **kw),
}


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("bad", ["drop-in", "Faithful", None, 1])
def test_a_bad_mode_names_the_argument_and_the_choices(name, bad):
  with pytest.raises(ValueError, match=r"`mode` must be one of \('faithful', 'drop_in'\)"):
    FACTORIES[name](mode=bad)


def test_mode_stays_static_under_inject_hyperparams():
  params = {"w": jnp.array([1.0, -2.0])}
  grads = {"w": jnp.array([0.5, 0.5])}
  tx = optax.inject_hyperparams(optax_lamb16.onebit_adam, static_args=("comm", "freeze_step"))(
    learning_rate=LR, comm=None, freeze_step=10, mode="drop_in"
  )
  updates, state = tx.update(grads, tx.init(params), params)
  assert "mode" not in state.hyperparams
  np.testing.assert_allclose(updates["w"], [-LR, -LR], rtol=1e-6)  # Adam's first step: lr * sign(g)


@pytest.mark.parametrize("name", ["onebit_adam", "zero_one_adam"])
def test_the_faithful_mode_warns_of_large_first_steps_at_a_constant_learning_rate(name):
  with pytest.warns(_onebit.LargeFirstStepsWarning, match=r"up to 6\.6 x learning_rate around n = 12 \(3\.2 x on "):
    FACTORIES[name]()
  with warnings.catch_warnings():
    warnings.simplefilter("error", _onebit.LargeFirstStepsWarning)
    FACTORIES[name](mode="drop_in")
    schedule = optax.linear_schedule(0.0, LR, 10)
    (optax_lamb16.onebit_adam if name == "onebit_adam" else optax_lamb16.zero_one_adam)(schedule, comm=None)
    FACTORIES[name](b1=0.0, b2=0.0)  # Adam-sized first steps: (1 - b1) / sqrt(1 - b2) = 1
