"""AdamW16 (SPEC.md section 8) against its NumPy oracle and against `optax.adamw`, its state bytes, and its options."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lamb16
from tests import reference
from tests.test_lamb16 import make_grads, make_params

# Shorter than a block, a partial last block, whole blocks, and a large leaf with a partial last block. Nothing sums
# over a leaf, but XLA's float32 power (the bias corrections) is not NumPy's to the last ulp: the params move an ulp
# apart, so do the gradients that depend on them, and in a large leaf now and then an element on a float8 rounding
# boundary flips, which the trajectory carries on (measured: at most 2.8e-4 of the distance moved on 6,144 elements).
SHAPES = {"tiny": (10,), "small": (10, 64), "whole_blocks": (96, 64), "large": (256, 257)}
EXACT = ("tiny", "small")


def run_both(steps, grad_scale, seed=0, **kwargs):
  """`adamw16` (jitted) and the oracle on the same gradients: (state, worst drift per leaf, oracle)."""
  start = make_params(seed, SHAPES)
  names = sorted(start)
  lr = kwargs.pop("learning_rate", 1e-2)
  mask = kwargs.pop("mask", None)
  tx = optax_lamb16.adamw16(lr, mask=mask, **kwargs)
  oracle = reference.AdamW16Reference(
    [start[n] for n in names], decay_mask=None if mask is None else [mask[n] for n in names], **kwargs
  )
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  params, state = jax.tree.map(jnp.asarray, start), tx.init(start)
  params_np = [start[n] for n in names]
  rng = np.random.default_rng(seed + 1)
  drift = dict.fromkeys(names, 0.0)
  for t in range(steps):
    grads = make_grads(dict(zip(names, params_np)), rng, grad_scale)
    params, state = step(params, state, grads)
    params_np = oracle.step(params_np, [grads[n] for n in names], lr(t) if callable(lr) else lr)
    for n, want in zip(names, params_np):
      moved = np.linalg.norm(want - start[n])
      drift[n] = max(drift[n], np.linalg.norm(np.asarray(params[n]) - want) / moved)
  return state[0], drift, oracle


@pytest.mark.parametrize(
  "kwargs",
  [
    pytest.param(dict(), id="defaults"),
    pytest.param(dict(stochastic_rounding=False, weight_decay=0.1), id="nearest"),
    pytest.param(dict(nesterov=True, eps_root=1e-10, b1=0.8, b2=0.99), id="nesterov-eps_root"),
    pytest.param(dict(block_size=64, learning_rate=optax.linear_schedule(1e-2, 1e-3, 30)), id="block64-schedule"),
    pytest.param(dict(mask={"large": False, "small": True, "tiny": True, "whole_blocks": False}), id="mask"),
  ],
)
@pytest.mark.parametrize("grad_scale", [1.0, 1e-4], ids=["unit-grads", "tiny-grads"])
def test_matches_numpy_oracle_every_step(kwargs, grad_scale):
  state, drift, oracle = run_both(30, grad_scale, **kwargs)
  for name, worst in drift.items():
    assert worst <= (1e-5 if name in EXACT else 1e-3), (name, worst)
  for s, name in zip(oracle.states, sorted(SHAPES)):
    for got, want in ((state.mu[name], s.mq), (state.nu[name], s.vq)):
      agree = np.mean(np.asarray(got.astype(jnp.float32)) == want.astype(np.float32))
      assert agree == 1.0 if name in EXACT else agree > 0.999, (name, agree)
    for got, want in ((state.mu_scale[name], s.sm), (state.nu_scale[name], s.sv)):
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6 if name in EXACT else 1e-3)


@pytest.fixture
def standard_promotion():
  """optax's schedules and transforms are not written for the suite's strict dtype promotion."""
  with jax.numpy_dtype_promotion("standard"):
    yield


def test_equals_optax_adamw_where_every_moment_is_representable(standard_promotion):
  """With the gradients of each leaf all equal in magnitude, every stored moment is its block's largest, stored
  exactly at the format's top: the trajectory is `optax.adamw`'s to float32 rounding (here including nesterov, a
  schedule and a weight-decay mask)."""
  params = {"a": jnp.full((300,), 0.5), "b": jnp.full((4, 64), -1.0), "c": jnp.array(2.0)}
  kwargs = dict(
    learning_rate=optax.cosine_decay_schedule(1e-2, 20),
    weight_decay=0.1,
    nesterov=True,
    mask={"a": True, "b": False, "c": True},
  )
  ours, theirs = optax_lamb16.adamw16(**kwargs), optax.adamw(**kwargs)
  mine, s_ours, s_theirs, want = params, ours.init(params), theirs.init(params), params
  update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
  rng = np.random.default_rng(0)
  for _ in range(20):
    grads = {
      k: jnp.full(jnp.shape(v), rng.choice([-1.0, 1.0]) * 10.0 ** rng.uniform(-3, 1), jnp.float32)
      for k, v in params.items()
    }
    updates, s_ours = update_ours(grads, s_ours, mine)
    mine = optax.apply_updates(mine, updates)
    updates, s_theirs = update_theirs(grads, s_theirs, want)
    want = optax.apply_updates(want, updates)
  for k in params:
    np.testing.assert_allclose(np.asarray(mine[k]), np.asarray(want[k]), rtol=2e-6, atol=1e-7)


def test_state_is_two_bytes_per_parameter_plus_block_scales():
  params = {"w": jax.ShapeDtypeStruct((1024, 1000), jnp.float32), "b": jax.ShapeDtypeStruct((1000,), jnp.float32)}
  state = jax.eval_shape(optax_lamb16.adamw16(1e-3).init, params)
  n = 1024 * 1000 + 1000
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert total == 2 * n + 8 * (4000 + 4) + 4  # blocks of 256 of each leaf, and the count
  assert total / n <= 2.07
  inner = state[0]
  assert inner.mu["w"].dtype == jnp.float8_e4m3fn and inner.nu["w"].dtype == jnp.float8_e5m2


def test_stochastic_rounding_lets_a_declining_v_follow():
  """v of elements whose gradients shrink 30x over the run (0.2 % a step) beside their block's largest, which holds
  the scale: rounded to nearest their codes stay put (v ends 11x too large); rounded stochastically each element's
  stored v wanders around the float32 EMA (unbiased, though single elements sit a gap or two off), so their mean
  follows it."""
  n, steps = 256, 1500
  ratios = {}
  for stochastic in (False, True):
    tx = optax_lamb16.scale_by_adam16(stochastic_rounding=stochastic)
    state = tx.init({"w": jnp.zeros(n)})
    update = jax.jit(tx.update)
    v32 = np.zeros(n, np.float64)
    for t in range(steps):
      g = np.where(np.arange(n) == 0, 1.0, 0.05 * np.exp(-np.log(30.0) * t / steps)).astype(np.float32)
      _, state = update({"w": jnp.asarray(g)}, state)
      v32 = 0.999 * v32 + 0.001 * g.astype(np.float64) ** 2
    stored = np.asarray(state.nu["w"].astype(jnp.float32)) * np.asarray(state.nu_scale["w"])[0]
    ratios[stochastic] = np.mean(stored[1:]) / np.mean(v32[1:])
  assert abs(ratios[True] - 1) < 0.15 and ratios[False] > 5, ratios


def test_float8_health_reads_the_state():
  tx = optax_lamb16.adamw16(1e-3)
  params = {"w": jnp.ones(1000)}
  _, state = tx.update({"w": jnp.linspace(-1.0, 1.0, 1000)}, tx.init(params), params)
  health = optax_lamb16.float8_health(state)
  assert float(health["mu_saturated"]) == 0.0 and float(health["nu_inf"]) == 0.0
  assert float(health["nu_zero"]) < 0.01


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(b1=1.0), "b1"),
    (dict(b2=-0.1), "b2"),
    (dict(eps=-1e-8), "eps"),
    (dict(eps_root=-1.0), "eps_root"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(block_size=0), "block_size"),
    (dict(stochastic_rounding="yes"), "stochastic_rounding"),
    (dict(nesterov=1), "nesterov"),
  ],
)
def test_bad_hyperparameters_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_lamb16.adamw16(1e-3, **kwargs)


def test_bfloat16_params_get_bfloat16_updates_also_with_injected_hyperparameters():
  params = {"w": jnp.ones((300,), jnp.bfloat16)}
  tx = optax.inject_hyperparams(optax_lamb16.adamw16, hyperparam_dtype=jnp.float32)(
    learning_rate=1e-2, weight_decay=1e-2
  )
  updates, state = tx.update({"w": jnp.full((300,), 0.5, jnp.bfloat16)}, tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  assert float(jnp.abs(updates["w"].astype(jnp.float32)).min()) > 0
