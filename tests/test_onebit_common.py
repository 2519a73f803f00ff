"""What all three 1-bit optimizers promise: one rank, comm=None, schedules, inject_hyperparams, bfloat16, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lamb16
from tests import onebit_harness as h
from tests import reference

STEPS = 24

OPTIMIZERS = {
    "onebit_adam": (lambda lr, comm, **kw: optax_lamb16.onebit_adam(lr, comm=comm, freeze_step=6, **kw),
                    lambda params, world: reference.OnebitAdamReference(params, world, 6, 0.01)),
    "zero_one_adam": (lambda lr, comm, **kw: optax_lamb16.zero_one_adam(
        lr, comm=comm, var_freeze_step=8, var_update_scaler=2, local_step_scaler=3, local_step_clipper=4, **kw),
                      lambda params, world: reference.ZeroOneAdamReference(
                          params, world, 0.01, var_freeze_step=8, var_update_scaler=2, local_step_scaler=3,
                          local_step_clipper=4)),
    "onebit_lamb": (lambda lr, comm, **kw: optax_lamb16.onebit_lamb(lr, comm=comm, freeze_step=6, **kw),
                    lambda params, world: reference.OnebitLambReference(params, world, 6, 0.01)),
}


def run_single(tx, params, x, y, noise, dtype=jnp.float32):
  """comm=None: a plain jitted loop on one device. Returns {name: (1, T, ...)} like the harness."""
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
  state = tx.init(params)

  @jax.jit
  def step(params, state, noise_t):
    grads = jax.grad(h._loss)(jax.tree.map(lambda p: p.astype(jnp.float32), params), x[0], y[0])
    grads = jax.tree.map(lambda g, n, p: (g + n[0]).astype(p.dtype), grads, noise_t, params)
    updates, state = tx.update(grads, state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))  # updates keep the params' dtype
    return optax.apply_updates(params, updates), state

  trajectory = []
  for t in range(noise["b"].shape[0]):
    params, state = step(params, state, {n: jnp.asarray(noise[n][t]) for n in h.NAMES})
    trajectory.append(params)
  return {n: np.stack([np.asarray(p[n], np.float32) for p in trajectory])[None] for n in h.NAMES}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_rank_and_comm_none_are_the_uncompressed_algorithm(name):
  make, make_oracle = OPTIMIZERS[name]
  params, x, y, noise = h.make_problem(1, STEPS, seed=30)
  on_axis = h.run_jax(lambda comm: make(0.01, comm), 1, params, x, y, noise,
                      per_rank_params=name == "zero_one_adam")
  alone = run_single(make(0.01, None), params, x, y, noise)
  oracle = make_oracle([params[n] for n in h.NAMES], 1)
  trajectory = h.run_oracle(oracle, 1, params, x, y, noise)
  h.assert_close_to_oracle(on_axis, trajectory, 1)
  h.assert_close_to_oracle(alone, trajectory, 1)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_mask_zero_variance_keeps_never_updated_params_still(name):
  """Leaf "z" never gets a gradient. Faithfully, the 1-bit exchange hands its momentum sign noise that, divided by
  sqrt(0) + eps, throws it far away; with mask_zero_variance it stays where it is. Both match their oracle."""
  make, make_oracle = OPTIMIZERS[name]
  world = 2
  params, x, y, noise = h.make_problem(world, STEPS, seed=32)
  per_rank = name == "zero_one_adam"
  faithful = h.run_jax(lambda comm: make(0.01, comm), world, params, x, y, noise, per_rank_params=per_rank)
  masked = h.run_jax(lambda comm: make(0.01, comm, mask_zero_variance=True), world, params, x, y, noise,
                     per_rank_params=per_rank)
  if name != "onebit_lamb":  # 1-bit LAMB already guards a leaf that is zero as a whole (scaling coefficient 0)
    assert np.abs(faithful["z"] - 1.0).max() > 10.0
  np.testing.assert_array_equal(masked["z"], 1.0)
  oracle = make_oracle([params[n] for n in h.NAMES], world)
  oracle.mask_zero_variance = True
  h.assert_close_to_oracle(masked, h.run_oracle(oracle, world, params, x, y, noise), world)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_schedule_inject_hyperparams_and_bfloat16(name):
  make, _ = OPTIMIZERS[name]
  params, x, y, noise = h.make_problem(1, STEPS, seed=31)
  plain = run_single(make(0.01, None), params, x, y, noise)
  # A constant schedule is the constant.
  scheduled = run_single(make(lambda count: jnp.float32(0.01), None), params, x, y, noise)
  for n in h.NAMES:
    np.testing.assert_array_equal(scheduled[n], plain[n])
  # The schedule is evaluated at the number of updates so far: zero for the first 3 updates = no movement.
  delayed = run_single(make(lambda count: jnp.where(count < 3, 0.0, 0.01).astype(jnp.float32), None),
                       params, x, y, noise)
  np.testing.assert_array_equal(delayed["w"][0, 2], params["w"])
  assert not np.array_equal(delayed["w"][0, 3], params["w"])
  # inject_hyperparams: numeric hyperparameters become state, comm and the step counts stay static.
  injected = optax.inject_hyperparams(lambda learning_rate, b1, comm: make(learning_rate, comm, b1=b1),
                                      static_args=("comm",))(learning_rate=0.01, b1=0.9, comm=None)
  from_injected = run_single(injected, params, x, y, noise)
  for n in h.NAMES:
    np.testing.assert_allclose(from_injected[n], plain[n], rtol=1e-6, atol=1e-7)
  # bfloat16 params: updates are bfloat16, the run stays close to the float32 one.
  low = run_single(make(0.01, None), params, x, y, noise, dtype=jnp.bfloat16)
  assert np.abs(low["w"][0, -1] - plain["w"][0, -1]).max() < 0.05


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_on_abstract_shapes_with_comm_none(name):
  tx = OPTIMIZERS[name][0](0.01, None)
  abstract = {"w": jax.ShapeDtypeStruct((300, 7), jnp.float32), "b": jax.ShapeDtypeStruct((7,), jnp.bfloat16)}
  shapes = jax.eval_shape(tx.init, abstract)
  concrete = jax.jit(tx.init)(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract))
  assert jax.tree.structure(shapes) == jax.tree.structure(concrete)
  assert [(a.shape, a.dtype) for a in jax.tree.leaves(shapes)] == [(a.shape, a.dtype) for a in jax.tree.leaves(
      concrete)]


@pytest.mark.parametrize("factory, kwargs, argument", [
    (optax_lamb16.onebit_adam, dict(learning_rate=-1.0), "learning_rate"),
    (optax_lamb16.onebit_adam, dict(b1=1.0), "b1"),
    (optax_lamb16.onebit_adam, dict(b2=-0.5), "b2"),
    (optax_lamb16.onebit_adam, dict(eps=-1.0), "eps"),
    (optax_lamb16.onebit_adam, dict(freeze_step=-1), "freeze_step"),
    (optax_lamb16.zero_one_adam, dict(var_freeze_step=-3), "var_freeze_step"),
    (optax_lamb16.zero_one_adam, dict(var_update_scaler=0), "var_update_scaler"),
    (optax_lamb16.zero_one_adam, dict(local_step_scaler=0), "local_step_scaler"),
    (optax_lamb16.zero_one_adam, dict(local_step_clipper=0), "local_step_clipper"),
    (optax_lamb16.onebit_lamb, dict(min_coeff=5.0, max_coeff=1.0), "min_coeff"),
    (optax_lamb16.onebit_lamb, dict(factor_min=5.0, factor_max=4.0), "factor_min"),
    (optax_lamb16.onebit_lamb, dict(coeff_beta=1.0), "coeff_beta"),
    (optax_lamb16.onebit_lamb, dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_name_the_argument(factory, kwargs, argument):
  with pytest.raises(ValueError, match=f"`{argument}`"):
    factory(comm=None, **kwargs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_trees_and_comm_are_rejected(name):
  make = OPTIMIZERS[name][0]
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  tx = make(0.01, None)
  state = tx.init(params)
  with pytest.raises(ValueError, match="same pytree structure"):
    tx.update({"w": jnp.zeros(3)}, state, params)
  with pytest.raises(ValueError, match="need `params`"):
    tx.update(params, state)
  with pytest.raises(TypeError, match=r"\['n'\].*int32"):
    tx.init({"w": jnp.zeros(3), "n": jnp.zeros(2, jnp.int32)})
  with pytest.raises(TypeError, match="`comm` must be"):
    make(0.01, 42)
  with pytest.raises(ValueError, match="comm='data' names a mesh axis that is not bound"):
    make(0.01, "data").init(params)
