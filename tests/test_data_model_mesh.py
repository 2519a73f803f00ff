"""The 1-bit optimizers on a ("data", "model") mesh whose model axis shards the params: they communicate over
`data` only, and each model shard trains exactly as the same block would on a data-only mesh."""

import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16

DATA, MODEL, STEPS = 2, 2, 12
SHAPE = (16, 12)  # "w" is sharded over "model" along its columns, "b" along its only axis

OPTIMIZERS = {
  "onebit_adam": (lambda: optax_lamb16.onebit_adam(0.01, comm="data", freeze_step=5), False),
  "zero_one_adam": (
    lambda: optax_lamb16.zero_one_adam(
      0.01, comm="data", var_freeze_step=5, var_update_scaler=2, local_step_scaler=2, local_step_clipper=4
    ),
    True,
  ),
  "onebit_lamb": (lambda: optax_lamb16.onebit_lamb(0.01, comm="data", freeze_step=5), False),
}


def trajectory_fn(make_tx, per_rank_params, mesh, w_spec, b_spec):
  """f(params, grads (T, DATA, ...)) -> params after every step, stacked over the data ranks (DATA, T, ...)."""
  tx = make_tx()

  def per_rank(params, grads):
    if per_rank_params:
      params = jax.lax.pcast(params, ("data",), to="varying")
    state = tx.init(params)

    def step(carry, grads_t):
      params, state = carry
      updates, state = tx.update(jax.tree.map(lambda g: g[0], grads_t), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params

    _, trajectory = jax.lax.scan(step, (params, state), grads)
    return jax.tree.map(lambda a: a[None], trajectory)

  param_specs = {"w": w_spec, "b": b_spec}
  grad_specs = {"w": P(None, "data", *w_spec), "b": P(None, "data", *b_spec)}
  out_specs = {"w": P("data", None, *w_spec), "b": P("data", None, *b_spec)}
  return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(param_specs, grad_specs), out_specs=out_specs))


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {"w": rng.standard_normal(SHAPE).astype(np.float32), "b": np.zeros(SHAPE[1], np.float32)}
  grads = {
    "w": rng.standard_normal((STEPS, DATA, *SHAPE)).astype(np.float32),
    "b": rng.standard_normal((STEPS, DATA, SHAPE[1])).astype(np.float32),
  }
  return params, grads


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_model_shards_train_as_separate_blocks_and_only_data_communicates(name):
  make_tx, per_rank_params = OPTIMIZERS[name]
  params, grads = problem()
  devices = np.array(jax.devices()[: DATA * MODEL]).reshape(DATA, MODEL)
  auto = jax.sharding.AxisType.Auto
  mesh = jax.sharding.Mesh(devices, ("data", "model"), axis_types=(auto, auto))
  f = trajectory_fn(make_tx, per_rank_params, mesh, P(None, "model"), P("model"))
  got = jax.tree.map(np.asarray, f(params, grads))

  # Every collective runs among devices of one model index: the optimizer touches the data axis only.
  model_of = {int(d.id): j for row in devices for j, d in enumerate(row)}
  hlo = f.lower(params, grads).compile().as_text()
  collectives = re.findall(
    r"(all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(.*?"
    r"replica_groups=\{([0-9,{}]*)\}",
    hlo,
  )
  assert any(op == "all-to-all" for op, _ in collectives), "no compressed exchange found"
  for op, groups in collectives:
    for group in re.findall(r"\{([0-9,]+)\}", groups):
      assert len({model_of[int(i)] for i in group.split(",")}) == 1, (op, groups)

  # Model shard j of "w" follows the data-only run of that column block alone (its own exchange, its own norms).
  data_mesh = jax.make_mesh((DATA,), ("data",), axis_types=(auto,), devices=jax.devices()[:DATA])
  block = SHAPE[1] // MODEL
  for j in range(MODEL):
    columns = slice(j * block, (j + 1) * block)
    alone = trajectory_fn(make_tx, per_rank_params, data_mesh, P(), P())(
      {"w": params["w"][:, columns], "b": params["b"][columns]},
      {"w": grads["w"][..., columns], "b": grads["b"][..., columns]},
    )
    np.testing.assert_array_equal(got["w"][..., columns], np.asarray(alone["w"]), err_msg=f"model shard {j}")
    np.testing.assert_array_equal(got["b"][..., columns], np.asarray(alone["b"]), err_msg=f"model shard {j}")


def test_leaves_sharded_differently_over_the_model_axis_are_a_clear_error():
  """One compressed exchange carries every leaf: a model-sharded leaf and a replicated one cannot share it."""
  params, grads = problem()
  auto = jax.sharding.AxisType.Auto
  mesh = jax.sharding.Mesh(
    np.array(jax.devices()[: DATA * MODEL]).reshape(DATA, MODEL), ("data", "model"), axis_types=(auto, auto)
  )
  f = trajectory_fn(OPTIMIZERS["onebit_adam"][0], False, mesh, P(None, "model"), P())
  with pytest.raises(ValueError, match=r"vary over different mesh axes.*optax.partition"):
    f(params, grads)
