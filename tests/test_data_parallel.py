"""`optax_lamb16.data_parallel`: every optimizer trains through it, the compiled step communicates only as its
optimizer says, and the data-parallel mistakes it exists to prevent raise errors that name the fix."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lamb16
from tests import onebit_harness as h

# 1-bit warm-up at t = 2..6, compressed from t = 7; 0/1 Adam: variance steps, then a sync at t = 8, a local step,
# and a sync at the last step, t = 10.
WORLD, STEPS, FREEZE = 4, 9, 6


def loss_fn(params, batch):
  return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def problem(seed=0):
  """Params and STEPS batches of a least-squares fit whose every step sees the same data, ranks different parts."""
  rng = np.random.default_rng(seed)
  params = {"b": np.zeros(16, np.float32), "w": np.zeros((32, 16), np.float32)}
  x = rng.standard_normal((8 * WORLD, 32)).astype(np.float32)
  y = (x @ (rng.standard_normal((32, 16)) * 0.1) + 0.5).astype(np.float32)
  return params, [{"x": x, "y": y}] * STEPS


OPTIMIZERS = {
  # The 1-bit rules have no bias correction: their first steps are about 3x Adam's. Once compressed, every element
  # of the momentum comes back at the scale of the whole buffer, which a tiny v turns into a big step: a larger
  # eps keeps this small fit (the offset "b" dwarfs the gradients of "w") from jumping after the freeze.
  "onebit_adam": lambda: optax_lamb16.onebit_adam(3e-3, comm="data", freeze_step=FREEZE, eps=1e-3),
  "zero_one_adam": lambda: optax_lamb16.zero_one_adam(
    3e-3, comm="data", var_freeze_step=FREEZE, local_step_scaler=1, local_step_clipper=2
  ),
  "onebit_lamb": lambda: optax_lamb16.onebit_lamb(3e-3, comm="data", freeze_step=FREEZE, eps=1e-3),
  "compressed_mean+lamb16": lambda: optax.chain(optax_lamb16.compressed_mean("data"), optax_lamb16.lamb16(1e-2)),
  "lamb16_blockwise": lambda: optax_lamb16.lamb16_blockwise(1e-2, block_size=64),
  "optax.adam": lambda: optax.adam(3e-2),
}
COMPRESSED = ("onebit_adam", "zero_one_adam", "onebit_lamb", "compressed_mean+lamb16")


def outside_loops(hlo: str) -> list[str]:
  """The collective instructions of compiled HLO text that are not in the body of a while loop (the 1-bit
  optimizers run each phase's exchange in a loop of 0 or 1 trips: what is outside runs on every step)."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  found, computation = [], None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      computation = header.group(1)
    elif computation not in bodies and re.search(COLLECTIVE, line):
      found.append(line.strip())
  return found


COLLECTIVE = r" (all-reduce|all-gather|all-to-all|collective-permute)(-start)?\("


def elements(instruction: str) -> int:
  """Elements of a collective's result: the largest array of its (possibly tuple) shape (XLA combines the loss's
  scalar mean with another all-reduce)."""
  result = instruction.split("=", 1)[1][: re.search(COLLECTIVE, instruction).start()]
  return max(int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"\w+\[([\d,]*)\]", result))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_trains_through_data_parallel(name):
  with standard_promotion() if name.startswith("optax") else contextlib.nullcontext():
    train_and_check_communication(name)


def standard_promotion():
  """optax's own transforms are not written for the suite's strict dtype promotion (adam's bias correction)."""
  return jax.numpy_dtype_promotion("standard")


def train_and_check_communication(name):
  params, batches = problem()
  mesh = h.host_mesh(WORLD)
  dp = optax_lamb16.data_parallel(loss_fn, OPTIMIZERS[name](), mesh)
  params, opt_state = dp.init(params)
  assert dp.params_per_rank == (name == "zero_one_adam")
  losses = []
  for batch in batches:
    params, opt_state, loss = jax.block_until_ready(dp.step(params, opt_state, batch))
    losses.append(float(loss))
  assert losses[-1] < 0.95 * losses[0], losses
  one = dp.unstack_params(params)
  assert jax.tree.map(jnp.shape, one) == {"b": (16,), "w": (32, 16)}
  if dp.params_per_rank:  # stacked per rank; the last step is a sync
    np.testing.assert_allclose(
      np.asarray(params["w"]), np.broadcast_to(np.asarray(one["w"]), (WORLD, 32, 16)), rtol=1e-6, atol=1e-7
    )

  hlo = dp._chosen["step"].lower(params, opt_state, jax.device_put(batches[0], dp.batch_sharding)).compile().as_text()
  every_step = outside_loops(hlo)
  # What runs on every step crosses devices as scalars only: the loss's mean (and nothing else for compressed
  # optimizers; the exact mean of the flattened gradients for the others). No per-leaf gradient all-reduce.
  if name in COMPRESSED:  # sign bytes and per-rank scales only
    assert all(" u8[" in op.split("=", 1)[1] or elements(op) <= WORLD for op in every_step), every_step
    assert re.search(r"all-to-all\(", hlo) and re.search(r"all-gather(-start)?\(", hlo)
  else:  # exact data parallelism: one all-reduce of all gradients, flattened
    big = [op for op in every_step if elements(op) > 1]
    assert len(big) == 1 and elements(big[0]) == 32 * 16 + 16, every_step


@pytest.mark.parametrize("name", ["onebit_adam", "zero_one_adam"])
def test_the_step_is_bitwise_the_explicit_shard_map_pattern(name):
  """The helper adds nothing to the maths: the same steps written by hand with `shard_map`, `sharded_init`,
  `state_partition_specs` and `local_view` (per-rank params stacked for 0/1 Adam) give the same bits."""
  params, batches = problem()
  mesh = h.host_mesh(WORLD)
  dp = optax_lamb16.data_parallel(loss_fn, OPTIMIZERS[name](), mesh)
  got, opt_state = dp.init(params)
  for batch in batches:
    got, opt_state, _ = jax.block_until_ready(dp.step(got, opt_state, batch))

  tx, per_rank = OPTIMIZERS[name](), name == "zero_one_adam"
  stacked = jax.tree.map(lambda p: np.broadcast_to(p, (WORLD, *p.shape)), params) if per_rank else params
  spec = P("data") if per_rank else P()
  mine = lambda p: jax.tree.map(lambda a: a[0], p) if per_rank else p
  init = jax.shard_map(lambda p: tx.init(mine(p)), mesh=mesh, in_specs=(spec,), out_specs=P(), check_vma=False)
  specs = optax_lamb16.state_partition_specs(jax.eval_shape(init, stacked), "data")
  state = jax.jit(jax.shard_map(lambda p: tx.init(mine(p)), mesh=mesh, in_specs=(spec,), out_specs=specs))(stacked)

  def local_step(p, state, batch):
    own = mine(p)
    grads = jax.grad(loss_fn)(own if per_rank else optax_lamb16.local_view(own, "data"), batch)
    updates, state = tx.update(grads, state, own)
    new = optax.apply_updates(own, updates)
    return (jax.tree.map(lambda a: a[None], new) if per_rank else new), state

  step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(spec, specs, P("data")), out_specs=(spec, specs)))
  want = stacked
  for batch in batches:
    want, state = jax.block_until_ready(step(want, state, batch))
  for key in params:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


def test_plain_optax_matches_one_device_on_the_whole_batch():
  """Ordinary data parallelism: the mean of equal-sized local gradients is the whole batch's gradient."""
  with standard_promotion():
    check_against_one_device()


def check_against_one_device():
  params, batches = problem()
  dp = optax_lamb16.data_parallel(loss_fn, optax.adam(1e-2), h.host_mesh(WORLD))
  got, opt_state = dp.init(params)
  tx, want = optax.adam(1e-2), jax.tree.map(jnp.asarray, params)
  state = tx.init(want)
  for batch in batches:
    got, opt_state, _ = jax.block_until_ready(dp.step(got, opt_state, batch))
    updates, state = tx.update(jax.grad(loss_fn)(want, batch), state, want)
    want = optax.apply_updates(want, updates)
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=2e-6, atol=1e-7)


def test_model_axis_sharding_is_kept_and_training_matches_the_data_only_mesh():
  params, batches = problem()
  auto = jax.sharding.AxisType.Auto
  mesh = jax.make_mesh((WORLD // 2, 2), ("data", "model"), axis_types=(auto, auto), devices=jax.devices()[:WORLD])
  sharded = {
    "b": jax.device_put(params["b"], NamedSharding(mesh, P("model"))),
    "w": jax.device_put(params["w"], NamedSharding(mesh, P(None, "model"))),
  }
  runs = []
  for mesh_, start in ((mesh, sharded), (h.host_mesh(WORLD // 2), params)):
    dp = optax_lamb16.data_parallel(loss_fn, OPTIMIZERS["onebit_adam"](), mesh_)
    p, s = dp.init(start)
    for batch in batches:
      p, s, _ = jax.block_until_ready(dp.step(p, s, batch))
    runs.append(p)
  assert runs[0]["w"].sharding.spec == P(None, "model")
  np.testing.assert_allclose(np.asarray(runs[0]["w"]), np.asarray(runs[1]["w"]), rtol=1e-5, atol=1e-6)


def test_two_level_grid():
  params, batches = problem()
  grid = optax_lamb16.comm.TwoLevel(fast="local", slow="hosts")
  dp = optax_lamb16.data_parallel(
    loss_fn, optax_lamb16.onebit_adam(1e-2, comm=grid, freeze_step=FREEZE), h.grid_mesh(2, 2), grid
  )
  params, opt_state = dp.init(params)
  assert dp.batch_sharding.spec == P(("hosts", "local"))
  losses = [float(jax.block_until_ready(dp.step(params, opt_state, batches[0]))[2])]
  assert np.isfinite(losses[0])


def test_has_aux_is_averaged_over_ranks():
  params, batches = problem()
  aux_loss = lambda p, b: (loss_fn(p, b), {"first_x": b["x"][0, 0]})
  dp = optax_lamb16.data_parallel(aux_loss, optax.sgd(0.1), h.host_mesh(WORLD), has_aux=True, donate=False)
  params, opt_state = dp.init(params)
  *_, aux = dp.step(params, opt_state, batches[0])
  x = batches[0]["x"].reshape(WORLD, -1, 32)
  np.testing.assert_allclose(float(aux["first_x"]), np.mean(x[:, 0, 0]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Mistakes that used to pass silently or fail with JAX's own words.


def manual_step(tx, mesh, param_spec, forget_local_view=False):
  """The explicit shard_map pattern, optionally with the `local_view` mistake."""
  state = optax_lamb16.sharded_init(tx, {"w": jnp.zeros(8)}, mesh, "data", param_specs=param_spec)
  specs = optax_lamb16.state_partition_specs(state, "data")

  def step(params, state, x):
    loss = lambda p: jnp.sum(p["w"] * x)
    grads = jax.grad(loss)(params if forget_local_view else optax_lamb16.local_view(params, "data"))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(
    jax.shard_map(step, mesh=mesh, in_specs=(param_spec, specs, P("data")), out_specs=(param_spec, specs))
  ), state


@pytest.mark.parametrize(
  "make",
  [
    lambda: optax_lamb16.onebit_adam(1e-2, comm="data"),
    lambda: optax.chain(optax_lamb16.compressed_mean("data"), optax.sgd(0.1)),
    lambda: optax.chain(optax_lamb16.uncompressed_mean("data"), optax.sgd(0.1)),
  ],
  ids=["onebit_adam", "compressed_mean", "uncompressed_mean"],
)
def test_forgetting_local_view_is_an_error_naming_it(make):
  mesh = h.host_mesh(WORLD)
  step, state = manual_step(make(), mesh, P(), forget_local_view=True)
  with pytest.raises(ValueError, match=r"leaf \['w'\] is the same on every rank.*local_view\(params, 'data'\)"):
    step({"w": jnp.zeros(8)}, state, jnp.ones(WORLD * 8))


def test_without_type_checks_local_gradients_are_not_mistaken_for_summed_ones():
  """Under ``check_vma=False`` nothing is typed varying, so nothing can be told: no error, the step runs."""
  tx = optax_lamb16.onebit_adam(1e-2, comm="data")
  mesh = h.host_mesh(WORLD)
  state = optax_lamb16.sharded_init(tx, {"w": jnp.zeros(8)}, mesh, "data")
  specs = optax_lamb16.state_partition_specs(state, "data")
  update = lambda p, s, x: tx.update({"w": x}, s, p)[0]
  step = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=(P(), specs, P("data")), out_specs=P(), check_vma=False))
  assert np.all(np.isfinite(np.asarray(step({"w": jnp.zeros(8)}, state, jnp.ones(WORLD * 8))["w"])))


def test_zero_one_adam_with_replicated_params_names_per_rank_params():
  mesh = h.host_mesh(WORLD)
  step, state = manual_step(optax_lamb16.zero_one_adam(1e-2, comm="data"), mesh, P())
  with pytest.raises(ValueError, match=r"replicated over \('data',\).*per rank.*P\('data'\).*data_parallel"):
    step({"w": jnp.zeros(8)}, state, jnp.ones(WORLD * 8))


def test_axes_the_mesh_lacks_are_named_with_the_mesh_axes():
  mesh = h.host_mesh(WORLD)
  with pytest.raises(ValueError, match=r"axis 'batch', which the mesh lacks \(its axes: \('data',\)\)"):
    optax_lamb16.sharded_init(optax_lamb16.onebit_adam(1e-2, comm="batch"), {"w": jnp.zeros(8)}, mesh, "batch")
  with pytest.raises(ValueError, match=r"axis 'batch', which the mesh lacks"):
    optax_lamb16.data_parallel(loss_fn, optax.adam(1e-2), mesh, "batch")


def test_an_optimizer_built_for_another_comm_is_an_error():
  params, _ = problem()
  dp = optax_lamb16.data_parallel(loss_fn, optax_lamb16.onebit_adam(1e-2, comm=None), h.host_mesh(WORLD))
  with pytest.raises(ValueError, match=r"built with another `comm`. Build it with comm='data'"):
    dp.init(params)


def test_unbound_axis_under_plain_jit_points_to_data_parallel():
  tx = optax_lamb16.onebit_adam(1e-2, comm="data")
  with pytest.raises(ValueError, match=r"not bound here.*data_parallel\(loss_fn, tx, mesh, 'data'\)"):
    jax.jit(tx.init)({"w": jnp.zeros(8)})


def test_step_before_init_and_bad_batches_are_errors():
  dp = optax_lamb16.data_parallel(loss_fn, optax.sgd(1e-2), h.host_mesh(WORLD))
  params, batches = problem()
  with pytest.raises(ValueError, match=r"Call `init\(params\)`"):
    dp.step(params, None, batches[0])
  params, opt_state = dp.init(params)
  with pytest.raises(ValueError, match=r"batch leaf \['x'\] has shape \(6, 32\).*multiple of 4"):
    dp.step(params, opt_state, {"x": batches[0]["x"][:6], "y": batches[0]["y"][:6]})


def test_steps_run_inside_jit_and_scan():
  """`step` is a jitted function like any other: ordinary `jax.jit` code (here a `lax.scan` over batches) calls it."""
  params, batches = problem()
  dp = optax_lamb16.data_parallel(loss_fn, OPTIMIZERS["onebit_adam"](), h.host_mesh(WORLD), donate=False)
  start, opt_state = dp.init(params)
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches[:3])

  @jax.jit
  def three_steps(params, opt_state, stacked):
    def one(carry, batch):
      params, opt_state, loss = dp.step(*carry, batch)
      return (params, opt_state), loss

    return jax.lax.scan(one, (params, opt_state), stacked)

  (scanned, _), losses = jax.block_until_ready(three_steps(start, opt_state, stacked))
  want, state = start, opt_state
  for batch in batches[:3]:
    want, state, _ = jax.block_until_ready(dp.step(want, state, batch))
  np.testing.assert_array_equal(np.asarray(scanned["w"]), np.asarray(want["w"]))
  assert losses.shape == (3,)


@pytest.mark.parametrize("name", ["onebit_adam", "zero_one_adam"])
def test_init_places_copies_on_the_mesh_and_a_restored_run_steps_on(name, tmp_path):
  """`init` returns params on the mesh and never the caller's arrays (the step donates them); params restored
  from a checkpoint into `init`'s layout step on, bitwise as the run that never stopped."""
  params, batches = problem()
  caller = jax.tree.map(jnp.asarray, params)
  dp = optax_lamb16.data_parallel(loss_fn, OPTIMIZERS[name](), h.host_mesh(WORLD))
  laid_out, opt_state = dp.init(caller)
  for leaf in jax.tree.leaves(laid_out):
    assert isinstance(leaf.sharding, NamedSharding) and leaf.sharding.mesh == dp.mesh
  laid_out, opt_state, _ = jax.block_until_ready(dp.step(laid_out, opt_state, batches[0]))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(caller))
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(1, {"params": laid_out, "opt_state": opt_state}, world_size=WORLD)
    target = dict(zip(("params", "opt_state"), dp.init(caller)))
    restored = checkpoints.restore(target, world_size=WORLD)
  want, _, _ = jax.block_until_ready(dp.step(laid_out, opt_state, batches[1]))
  got, _, _ = jax.block_until_ready(dp.step(restored["params"], restored["opt_state"], batches[1]))
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))
