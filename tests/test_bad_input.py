"""Bad input: every check names the argument and the fix; odd but valid trees (empty, all-zero leaves) stay finite.

Complements the argument checks of test_onebit_common.py, test_lamb16.py and test_compressed_allreduce.py: those
match the argument's name; these also match the fix, and cover the optimizers and entry points they leave out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from optax_lamb16 import _float8 as float8
from tests import onebit_harness as h

# comm=None or a mesh-axis name; short warm-ups so that a few steps cross every phase.
MAKERS = {
  "lamb16": lambda lr, comm=None, **kw: optax_lamb16.lamb16(lr, **kw),
  "onebit_adam": lambda lr, comm=None, **kw: optax_lamb16.onebit_adam(lr, comm=comm, **{"freeze_step": 2, **kw}),
  "zero_one_adam": lambda lr, comm=None, **kw: optax_lamb16.zero_one_adam(
    lr,
    comm=comm,
    **{"var_freeze_step": 4, "var_update_scaler": 1, "local_step_scaler": 2, "local_step_clipper": 2, **kw},
  ),
  "onebit_lamb": lambda lr, comm=None, **kw: optax_lamb16.onebit_lamb(lr, comm=comm, **{"freeze_step": 2, **kw}),
  "compressed_mean": lambda lr, comm=None, **kw: optax.chain(
    optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(lr, **kw)
  ),
}
ONEBIT = ("onebit_adam", "zero_one_adam", "onebit_lamb")
COMMUNICATING = ONEBIT + ("compressed_mean",)
STEPS = 8  # crosses warm-up -> compression (1-bit Adam/LAMB) and variance -> local steps with syncs (0/1 Adam)


def make_mesh(world, axis="data"):
  return h.host_mesh(world, axis)


def all_finite(tree):
  return all(
    bool(jnp.all(jnp.isfinite(jnp.asarray(x).astype(jnp.float32))))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
  )


# A `Communicator` of `size` ranks on one device, all holding rank 0's values: enough to build and use states.
IdenticalRanks = optax_lamb16.comm.SimulatedRanks


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameters out of range: the message names the argument, the allowed range and the fix.

_COMMON_CASES = [
  (dict(learning_rate=-1.0), r"`learning_rate` must lie in \[0\.0, inf\], got -1\. Pass a non-negative float"),
  (dict(learning_rate=jnp.array([0.1, 0.2])), r"`learning_rate` must be a scalar \(or a schedule\).*\(2,\)"),
  (dict(b1=1.0), r"`b1` must lie in \[0\.0, 1\.0\), got 1\. Typical value: 0\.9"),
  (dict(b1=-0.5), r"`b1` must lie in \[0\.0, 1\.0\), got -0\.5\. Typical value"),
  (dict(b2=1.0), r"`b2` must lie in \[0\.0, 1\.0\), got 1\. Typical value: 0\.999"),
  (dict(eps=-1e-8), r"`eps` must lie in \(0\.0, inf\], got -1e-08\. It .* finite"),
  (dict(eps=0.0), r"`eps` must lie in \(0\.0, inf\], got 0\. It .*(all-zero|all zero)"),
  (dict(weight_decay=-0.1), r"`weight_decay` must lie in \[0\.0, inf\], got -0\.1\. Weight decay is a non-negative"),
]
_SPECIFIC_CASES = [
  ("lamb16", dict(reference_lr=0.0), r"`reference_lr` must lie in \(0\.0, inf\], got 0\. It is the learning rate"),
  ("lamb16", dict(trust_scale=-1.0), r"`trust_scale` must lie in \[0\.0, inf\], got -1\. The reference uses 0\.382"),
  ("onebit_adam", dict(freeze_step=-1), r"`freeze_step` must lie in \[2, inf\], got -1\. Steps count as in"),
  ("onebit_adam", dict(freeze_step=1), r"`freeze_step` must lie in \[2, inf\], got 1\. .*no warm-up .*int >= 2"),
  ("onebit_adam", dict(freeze_step=2.5), r"`freeze_step` must be a whole number of steps, got 2\.5\. Steps count"),
  ("onebit_lamb", dict(freeze_step=-3), r"`freeze_step` must lie in \[2, inf\], got -3\. Steps count as in"),
  ("onebit_lamb", dict(freeze_step=0), r"`freeze_step` must lie in \[2, inf\], got 0\. .*would never learn a trust"),
  ("zero_one_adam", dict(var_freeze_step=-1), r"`var_freeze_step` must lie in \[0, inf\], got -1\. Pass a"),
  ("zero_one_adam", dict(var_update_scaler=0), r"`var_update_scaler` must lie in \[1, inf\], got 0\. Pass a pos"),
  ("zero_one_adam", dict(local_step_scaler=0), r"`local_step_scaler` must lie in \[1, inf\], got 0\. Pass a pos"),
  ("zero_one_adam", dict(local_step_scaler=-5), r"`local_step_scaler` must lie in \[1, inf\], got -5\. Pass a"),
  ("zero_one_adam", dict(local_step_clipper=0), r"`local_step_clipper` must lie in \[1, inf\], got 0\. Pass a"),
  ("zero_one_adam", dict(local_step_clipper=2.5), r"`local_step_clipper` must be a whole number of steps, got 2\.5"),
  ("zero_one_adam", dict(var_update_scaler=1.5), r"`var_update_scaler` must be a whole number of steps, got 1\.5"),
  (
    "onebit_lamb",
    dict(factor_min=5.0, factor_max=4.0),
    r"`factor_min` \(5\) must not exceed `factor_max` \(4\)\. .*pass factor_min <= factor_max",
  ),
  (
    "onebit_lamb",
    dict(min_coeff=2.0, max_coeff=1.0),
    r"`min_coeff` \(2\) must not exceed `max_coeff` \(1\)\. .*pass min_coeff <= max_coeff",
  ),
  ("onebit_lamb", dict(min_coeff=-0.1), r"`min_coeff` must lie in \[0\.0, inf\], got -0\.1\. DeepSpeed's default"),
  ("onebit_lamb", dict(factor_max=-1.0), r"`factor_max` must lie in \[0\.0, inf\], got -1\. DeepSpeed's default"),
  ("onebit_lamb", dict(factor_threshold=1.5), r"`factor_threshold` must lie in \[0\.0, 1\.0\], got 1\.5\. DeepSpeed"),
]
HYPERPARAMETER_CASES = [
  pytest.param(name, kwargs, pattern, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}")
  for name in ("lamb16",) + ONEBIT
  for kwargs, pattern in _COMMON_CASES
] + [
  pytest.param(name, kwargs, pattern, id=f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}")
  for name, kwargs, pattern in _SPECIFIC_CASES
]


@pytest.mark.parametrize("name, kwargs, pattern", HYPERPARAMETER_CASES)
def test_out_of_range_hyperparameter_names_the_argument_and_the_fix(name, kwargs, pattern):
  kwargs = dict(kwargs)
  learning_rate = kwargs.pop("learning_rate", 0.01)
  with pytest.raises(ValueError, match=pattern):
    MAKERS[name](learning_rate, None, **kwargs)


@pytest.mark.parametrize("name", ("lamb16",) + ONEBIT)
def test_injected_hyperparameters_are_checked_when_concrete_and_skipped_when_traced(name):
  """`optax.inject_hyperparams` builds the optimizer with concrete arrays in `init` (checked) and with tracers inside
  a jitted `update` (not checkable: skipped, as the whole step must still trace)."""
  static = {
    "lamb16": {},
    "onebit_adam": dict(freeze_step=2),
    "onebit_lamb": dict(freeze_step=2),
    "zero_one_adam": dict(var_freeze_step=2),
  }[name]
  factory = getattr(optax_lamb16, name)
  static_args = ("comm",) + tuple(static) if name != "lamb16" else ()
  extra = dict(static, comm=None) if name != "lamb16" else {}
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  with pytest.raises(ValueError, match=r"`eps` must lie in \(0\.0, inf\]"):
    optax.inject_hyperparams(factory, static_args=static_args)(learning_rate=0.01, eps=0.0, **extra).init(params)
  with pytest.raises(ValueError, match=r"`b2` must lie in \[0\.0, 1\.0\)"):
    optax.inject_hyperparams(factory, static_args=static_args)(learning_rate=0.01, b2=1.0, **extra).init(params)
  tx = optax.inject_hyperparams(factory, static_args=static_args)(learning_rate=0.01, eps=1e-6, b2=0.99, **extra)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(params, state, params)
  assert all_finite(updates) and float(jnp.abs(updates["w"]).max()) > 0


def test_whole_float_step_counts_act_as_ints():
  """``freeze_step=1e1`` used to fail under strict dtype promotion, in the step logic, naming no argument."""
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = [{"w": jnp.array([0.5, -0.25, 1.0]) * (t + 1)} for t in range(STEPS)]
  for name, as_int, as_float in [
    ("onebit_adam", dict(freeze_step=3), dict(freeze_step=3.0)),
    ("onebit_lamb", dict(freeze_step=3), dict(freeze_step=np.float32(3))),
    (
      "zero_one_adam",
      dict(var_freeze_step=3, var_update_scaler=1, local_step_scaler=2, local_step_clipper=2),
      dict(var_freeze_step=3.0, var_update_scaler=1.0, local_step_scaler=2.0, local_step_clipper=2.0),
    ),
  ]:
    runs = []
    for kwargs in (as_int, as_float):
      tx = MAKERS[name](0.01, None, **kwargs)
      state, trajectory = tx.init(params), []
      for g in grads:
        updates, state = tx.update(g, state, params)
        trajectory.append(updates["w"])
      runs.append(np.stack(trajectory))
    np.testing.assert_array_equal(runs[1], runs[0], err_msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# `comm`: an axis that is not bound, an unknown type, a world size that changed since `init`.

UNBOUND = r"comm='data' names a mesh axis that is not bound here\. Call `init` and `update` inside `jax\.shard_map"


@pytest.mark.parametrize("name", COMMUNICATING)
def test_update_with_an_unbound_axis_names_comm(name):
  """The state comes from a single-device `init`; `update` alone meets the unbound axis (its warm-up branch would
  otherwise fail first, inside `pmean`, with "unbound axis name: data")."""
  params = {"w": jnp.ones(5), "b": jnp.zeros(2)}
  state = MAKERS[name](0.01, None).init(params)
  with pytest.raises(ValueError, match=UNBOUND):
    MAKERS[name](0.01, "data").update(params, state, params)


@pytest.mark.parametrize("name", COMMUNICATING)
def test_comm_axis_missing_from_the_shard_map_mesh_names_comm(name):
  params = {"w": jnp.ones(5)}
  mesh = make_mesh(2, "batch")  # the mesh's axis is "batch", the optimizer was told "data"
  tx = MAKERS[name](0.01, "data")
  init = jax.jit(jax.shard_map(tx.init, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
  with pytest.raises(ValueError, match=UNBOUND):
    init(params)
  update = jax.jit(
    jax.shard_map(lambda s, p: tx.update(p, s, p)[0], mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
  )
  with pytest.raises(ValueError, match=UNBOUND):
    update(MAKERS[name](0.01, None).init(params), params)


class _MissingAllGather:
  size = 2

  def mean(self, x):
    return x

  def all_to_all(self, x):
    return x


class _FloatSize(IdenticalRanks):
  size = 2.0

  def __init__(self):
    pass


BAD_COMMS = {
  "int": (42, r"got int: 42\."),
  "mesh": (make_mesh(2), r"got Mesh: .*pass the name of its data-parallel axis, e\.g\. comm='data'"),
  "tuple-of-names": (("data", "model"), r"got tuple: \('data', 'model'\)"),
  "missing-all_gather": (_MissingAllGather(), r"got _MissingAllGather"),
}
ENTRY_POINTS = {
  **{
    name: (lambda name: lambda comm: MAKERS[name](0.01, comm).init({"w": jnp.ones(3)}))(name) for name in COMMUNICATING
  },
  "init_compressed_allreduce": lambda comm: optax_lamb16.init_compressed_allreduce(16, comm),
  "compressed_allreduce": lambda comm: optax_lamb16.compressed_allreduce(
    jnp.ones(16), optax_lamb16.init_compressed_allreduce(16, None), comm
  ),
}


@pytest.mark.parametrize("comm", BAD_COMMS, ids=str)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_unknown_comm_type_names_comm_and_what_it_may_be(entry, comm):
  value, detail = BAD_COMMS[comm]
  with pytest.raises(
    TypeError,
    match=r"`comm` must be a mesh-axis name \(str\), an mpi4py communicator, None "
    r"\(one device\) or an object with `size`, `mean`, `all_to_all` and "
    r"`all_gather`; " + detail,
  ):
    ENTRY_POINTS[entry](value)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_custom_communicator_with_a_non_int_size_names_comm_size(entry):
  with pytest.raises(ValueError, match=r"`comm\.size` must be a positive Python int .* got 2\.0 .*return an int"):
    ENTRY_POINTS[entry](_FloatSize())


def _build_and_update(name, tree, world_init, world_new):
  """Builds `name`'s state as one rank of `world_init` ranks sees it, then traces an update at `world_new` ranks."""
  comm_of = lambda world: None if world == 1 else IdenticalRanks(world)
  tx_init, tx_new = MAKERS[name](0.01, comm_of(world_init)), MAKERS[name](0.01, comm_of(world_new))
  if name == "compressed_mean":  # the exchange alone: its update needs no params
    tx_init, tx_new = (
      optax_lamb16.compressed_mean(comm_of(world_init)),
      optax_lamb16.compressed_mean(comm_of(world_new)),
    )
  state = tx_init.init(tree)
  return jax.eval_shape(tx_new.update, tree, state, tree)


@pytest.mark.parametrize("world_init, world_new", [(2, 4), (4, 2), (2, 3), (8, 2), (2, 1), (1, 2)])
@pytest.mark.parametrize("name", COMMUNICATING)
def test_state_from_another_world_size_is_rejected_naming_both_sizes(name, world_init, world_new):
  tree = {"w": jnp.ones((5, 7)), "b": jnp.ones(5)}  # 40 elements: padded to 48 for 2 ranks, 64 for 4 and 8, 72 for 3
  _build_and_update(name, tree, world_new, world_new)  # the same world size is fine
  made_for = "1 rank" if world_init == 1 else f"{world_init} ranks"
  with pytest.raises(
    ValueError,
    match=rf"at world size {world_new} need .*it looks made for {made_for}.*"
    r"re-create it with `init`",
  ):
    _build_and_update(name, tree, world_init, world_new)


def test_onebit_lamb_padding_tail_of_another_world_size_is_rejected():
  """1-bit LAMB's persistent padding also depends on the world size (e.g. error feedback reset, padding kept)."""
  tree = {"w": jnp.ones(40)}
  state_2 = optax_lamb16.onebit_lamb(0.01, comm=IdenticalRanks(2)).init(tree)
  state_4 = optax_lamb16.onebit_lamb(0.01, comm=IdenticalRanks(4)).init(tree)
  mixed = state_2._replace(exchange=state_4.exchange)
  with pytest.raises(ValueError, match=r"`padding_tail` .* shape \(8,\), but world size 4 needs \(24,\).*`init`"):
    optax_lamb16.onebit_lamb(0.01, comm=IdenticalRanks(4)).update(tree, mixed, tree)


def test_state_sharded_for_2_ranks_used_on_4_inside_shard_map_is_rejected():
  """The realistic case: a state laid out by `sharded_init` on 2 devices, fed to a step on a 4-device mesh."""
  tx = optax_lamb16.onebit_adam(0.01, comm="data", freeze_step=2)

  def state_and_step(params):  # the state laid out for 2 ranks, the step for 4
    state = optax_lamb16.sharded_init(tx, params, make_mesh(2), "data")
    specs = optax_lamb16.state_partition_specs(state, "data")
    # Each rank's own gradients (here the params themselves, viewed per rank).
    update = lambda p, s: tx.update(optax_lamb16.local_view(p, "data"), s, p)[0]
    return state, jax.jit(jax.shard_map(update, mesh=make_mesh(4), in_specs=(P(), specs), out_specs=P()))

  params = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}  # each rank's error vectors: 40 (b and w) and 8 (padding)
  state, step = state_and_step(params)
  with pytest.raises(
    ValueError,
    match=r"hold 24 and 12 elements, but 40 elements at world size 4 need 64 and 16 "
    r"\(it looks made for 2 ranks\)",
  ):
    step(params, state)
  # Vectors that do not split into 4 ranks' parts: `shard_map` itself names them before the update runs.
  odd = {"w": jnp.ones((5, 7))}  # 35 elements, padded to 48: vectors of 35 and 13 per rank
  state, step = state_and_step(odd)
  with pytest.raises(
    ValueError,
    match=r"exchange\.worker_error\[0\] of shape float32\[70\].*4 does not evenly "
    r"divide 70",
  ):
    step(odd, state)
  # The global arrays passed to a rank whole (no per-rank specs) are recognised as such.
  with pytest.raises(ValueError, match=r"look like the global arrays of all ranks.*`state_partition_specs`"):
    jax.jit(
      jax.shard_map(lambda p, s: tx.update(p, s, p)[0], mesh=make_mesh(2), in_specs=P(), out_specs=P(), check_vma=False)
    )(odd, state)


# ----------------------------------------------------------------------------------------------------------------------
# Grads and params that do not match, integer / complex leaves.


@pytest.mark.parametrize("name", MAKERS)
def test_grads_with_other_shapes_than_state_or_params_name_the_leaf(name):
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  tx = MAKERS[name](0.01, None)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"Leaf \['w'\] has shape \(3, 2\) in `updates` but \(2, 3\).*must match"):
    tx.update({"w": jnp.ones((3, 2)), "b": jnp.ones(3)}, state, params)
  if name != "compressed_mean":  # its update is given no params in a chain's first place; checked below
    with pytest.raises(ValueError, match=r"Leaf \['b'\] has shape \(3,\) in `updates` but \(4,\) in `params`"):
      tx.update(params, state, {"w": jnp.ones((2, 3)), "b": jnp.ones(4)})


def test_compressed_mean_rejects_grads_unlike_its_init_or_params():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  tx = optax_lamb16.compressed_mean(IdenticalRanks(2))
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"`updates` and `params` must have the same pytree structure"):
    tx.update({"w": jnp.ones((2, 3))}, state, params)
  with pytest.raises(ValueError, match=r"Leaf \['w'\] has shape \(2, 2\) in `updates` but \(2, 3\) in `params`"):
    tx.update({"w": jnp.ones((2, 2)), "b": jnp.ones(3)}, state, params)
  bigger = {"w": jnp.ones((20, 3)), "b": jnp.ones(3)}  # 63 elements: the error buffers were made for 9
  with pytest.raises(ValueError, match=r"63 elements at world size 2 need 64 and 32.*another model"):
    tx.update(bigger, state)


BAD_DTYPES = [jnp.int32, jnp.complex64, jnp.bool_, jnp.uint8]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", MAKERS)
def test_non_float_leaves_are_rejected_at_init_and_update_naming_the_leaf(name, dtype):
  tx = MAKERS[name](0.01, None)
  fix = (
    r"optax_lamb16 needs real floating-point leaves\. Keep integer/complex leaves out of the optimizer, e\.g\. "
    r"with `optax\.masked`"
  )
  dtype_name = jnp.dtype(dtype).name
  with pytest.raises(TypeError, match=rf"`params` leaf \['n'\] has dtype {dtype_name}; " + fix):
    tx.init({"w": jnp.ones(3), "n": jnp.zeros(2, dtype)})
  params = {"w": jnp.ones(3)}
  with pytest.raises(TypeError, match=rf"`updates` leaf \['w'\] has dtype {dtype_name}; " + fix):
    tx.update({"w": jnp.ones(3, dtype)}, tx.init(params), params)
  # Abstract params are checked the same way.
  with pytest.raises(TypeError, match=rf"`params` leaf \['n'\] has dtype {dtype_name}"):
    jax.eval_shape(tx.init, {"n": jax.ShapeDtypeStruct((2,), dtype)})


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64], ids=lambda d: jnp.dtype(d).name)
def test_non_float_leaves_are_rejected_by_the_building_blocks(dtype):
  """The exchange used to cast integers to float32 and back (a silently truncated mean) and drop imaginary parts."""
  tree = {"w": jnp.ones(3), "n": jnp.ones(2, dtype)}
  name = jnp.dtype(dtype).name
  with pytest.raises(TypeError, match=rf"`tree` leaf \['n'\] has dtype {name}"):
    optax_lamb16.compressed_allreduce(tree, optax_lamb16.init_compressed_allreduce(5, None), None)
  with pytest.raises(TypeError, match=rf"`tree_or_length` leaf \['n'\] has dtype {name}"):
    optax_lamb16.init_compressed_allreduce(tree, None)
  with pytest.raises(TypeError, match=rf"`updates` leaf \['n'\] has dtype {name}"):
    optax_lamb16.scale_by_lamb16_trust_ratio(0.01).update(tree, optax.EmptyState(), tree)
  with pytest.raises(TypeError, match=rf"`updates` leaf \['n'\] has dtype {name}"):
    optax_lamb16.scale_by_lamb16().update(
      tree, optax_lamb16.scale_by_lamb16().init({"w": jnp.ones(3), "n": jnp.ones(2)})
    )
  with pytest.raises(ValueError, match=r"`tree_or_length` must be a pytree or a non-negative element count, got -1"):
    optax_lamb16.init_compressed_allreduce(-1, None)
  # A NumPy integer is an element count, not a one-element tree.
  assert [w.shape for w in optax_lamb16.init_compressed_allreduce(np.int64(40), IdenticalRanks(2)).worker_error] == [
    (40,),
    (8,),
  ]


# ----------------------------------------------------------------------------------------------------------------------
# Empty (size-0) and all-zero leaves: they must work and stay finite, on one device and inside shard_map.


def _tree(kind, rng, lead=()):
  """Params (lead=()) or gradients (lead=(world, steps)) of a test tree: `kind` is one of TREES."""
  shapes = TREES[kind]
  draw = lambda name, shape: (
    rng.standard_normal((*lead, *shape)) if name == "w" and kind != "all-zero" else np.zeros((*lead, *shape))
  )
  return {name: jnp.asarray(draw(name, shape), jnp.float32) for name, shape in shapes.items()}


TREES = {
  "mixed": {"e": (0, 3), "w": (4, 6), "z": (5,), "e1": (0,)},  # empty leaves, an all-zero leaf, a trained leaf
  "only-empty": {"e": (0, 3), "e1": (0,)},
  "all-zero": {"w": (4, 6), "z": (5,)},
}


def _run_single(name, params, grads):
  tx = MAKERS[name](0.01, None, weight_decay=0.01)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s, u))(*tx.update(g, s, p)))
  state, all_updates = tx.init(params), []
  for t in range(STEPS):
    params, state, updates = step(params, state, jax.tree.map(lambda g: g[0, t], grads))
    all_updates.append(updates)
  return params, state, all_updates


@pytest.mark.parametrize("kind", TREES)
@pytest.mark.parametrize("name", MAKERS)
def test_empty_and_all_zero_leaves_on_one_device(name, kind):
  rng = np.random.default_rng(0)
  params, grads = _tree(kind, rng), _tree(kind, rng, lead=(1, STEPS))
  shapes = jax.tree.map(jnp.shape, params)
  abstract = jax.eval_shape(
    MAKERS[name](0.01, None).init, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  )
  final, state, updates = _run_single(name, params, grads)
  assert jax.tree.map(jnp.shape, final) == shapes
  assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in jax.tree.leaves(abstract)]
  assert all_finite((final, state, updates)), name
  if kind == "all-zero":  # nothing to scale: every update is exactly zero, no 0/0 anywhere
    for u in updates:
      for leaf in jax.tree.leaves(u):
        np.testing.assert_array_equal(leaf, 0.0)
  if kind == "mixed":  # the empty leaves change nothing for the others
    keep = ("w", "z")
    alone, _, _ = _run_single(name, {n: params[n] for n in keep}, {n: grads[n] for n in keep})
    assert float(jnp.abs(final["w"] - params["w"]).max()) > 0
    for n in keep:
      np.testing.assert_allclose(final[n], alone[n], rtol=1e-5, atol=1e-7, err_msg=n)


@pytest.mark.parametrize("name", MAKERS)
def test_tree_without_leaves_works(name):
  """E.g. `optax.masked` with nothing selected, or an empty `optax.partition` group: the inner tree has no leaves."""
  tx = MAKERS[name](0.01, None)
  updates, state = jax.jit(tx.update)({}, tx.init({}), {})
  assert updates == {}
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  masked = optax.masked(tx, {"w": False, "b": False})
  updates, _ = masked.update(params, masked.init(params), params)
  np.testing.assert_array_equal(updates["w"], params["w"])  # masked-out leaves pass through untouched


def _run_on_mesh(name, params, grads, world):
  """Runs STEPS updates of `name` with comm="data" inside one shard_map; grads: {leaf: (world, STEPS, ...)}.

  Returns (params, state, updates), each leaf with a leading rank axis. A non-empty per-rank input rides along, as a
  real batch would: XLA's shard_map lowering cannot take inputs that are all size 0.
  """
  tx = MAKERS[name](0.01, "data", weight_decay=0.01)

  def per_rank(params, grads, batch):
    if name == "zero_one_adam":  # its params differ per rank between syncs
      params = jax.lax.pcast(params, ("data",), to="varying")
    state = tx.init(params)

    def step(carry, g):
      params, state = carry
      updates, state = tx.update(g, state, params)
      return (optax.apply_updates(params, updates), state), updates

    (params, state), updates = jax.lax.scan(step, (params, state), jax.tree.map(lambda g: g[0], grads))
    return jax.tree.map(lambda a: a[None], (params, state, updates)), batch

  f = jax.jit(jax.shard_map(per_rank, mesh=make_mesh(world), in_specs=(P(), P("data"), P("data")), out_specs=P("data")))
  return jax.block_until_ready(f(params, grads, jnp.ones(world)))[0]


@pytest.mark.parametrize("kind", TREES)
@pytest.mark.parametrize("name", COMMUNICATING)
def test_empty_and_all_zero_leaves_inside_shard_map_with_compression(name, kind):
  world = 2
  rng = np.random.default_rng(1)
  params, grads = _tree(kind, rng), _tree(kind, rng, lead=(world, STEPS))
  final, state, updates = _run_on_mesh(name, params, grads, world)
  assert jax.tree.map(lambda a: a.shape[1:], final) == jax.tree.map(jnp.shape, params)
  assert all_finite((final, state, updates)), name
  if kind == "all-zero":
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
  if kind == "mixed":
    assert float(jnp.abs(final["w"][0] - params["w"]).max()) > 0
    if name != "zero_one_adam":  # replicas agree (0/1 Adam's only at syncs)
      np.testing.assert_array_equal(final["w"][0], final["w"][1])
    if name != "onebit_lamb":  # 1-bit LAMB's mean momentum RMS counts every leaf, as its oracle does
      keep = ("w", "z")
      alone, _, _ = _run_on_mesh(name, {n: params[n] for n in keep}, {n: grads[n] for n in keep}, world)
      for n in keep:
        np.testing.assert_allclose(final[n], alone[n], rtol=1e-5, atol=1e-7, err_msg=n)


# ----------------------------------------------------------------------------------------------------------------------
# Float8 overflow of LAMB16's second moment: faithful, documented, and as documented.


def test_variance_encode_overflows_exactly_where_documented():
  scale = jnp.float32(2.0**-20)  # about eps = 1e-6, and a power of two: v / scale is exact
  below, at = 61439.0 * scale, 61440.0 * scale
  stored = float8.encode_variance(jnp.array([below, at, 10.0]), scale).astype(jnp.float32)
  assert stored[0] == 57344.0  # the largest finite e5m2 value: rounds down, no saturation needed
  assert jnp.isposinf(stored[1]) and jnp.isposinf(stored[2])  # v = 10: still +inf while 10 / scale >= 61440
  assert jnp.isfinite(float8.encode_variance(jnp.float32(10.0), jnp.float32(10 / 61439.0)).astype(jnp.float32))
  # The first moment is clipped before its cast: no NaN (e4m3fn's overflow) even for huge values.
  assert jnp.all(jnp.isfinite(float8.encode_momentum(jnp.array([1e30, -1e30, jnp.inf]), scale).astype(jnp.float32)))


OVERFLOWING = {"lamb16": lambda: optax_lamb16.lamb16(0.01), "scale_by_lamb16": optax_lamb16.scale_by_lamb16}


@pytest.mark.parametrize("name", OVERFLOWING)
def test_lamb16_variance_overflow_stops_one_element_without_nan_until_its_scale_grows(name):
  """What float8.py, `lamb16` and `scale_by_lamb16` document, for the fused step and for the block: one large
  gradient in a big quiet leaf stores v = +inf; the element's update (the block's direction) is then exactly 0
  (never NaN) while every other element and leaf trains on; once the leaf's scale exceeds 10 / 61440 the element's
  v is stored finite again (clipped to 10) and it moves again."""
  n = 200_000
  params = {"big": jnp.full(n, 0.5), "small": jnp.linspace(-1.0, 1.0, 7)}
  quiet = {"big": jnp.zeros(n).at[0].set(10.0).at[1:].set(0.01), "small": jnp.linspace(1.0, 2.0, 7)}
  tx = OVERFLOWING[name]()
  step = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = step(quiet, state, params)
  assert updates["big"][0] != 0  # this step still used the float32 v
  assert jnp.isposinf(state.nu["big"][0].astype(jnp.float32))
  for _ in range(3):
    updates, state = step(quiet, state, params)
    assert updates["big"][0] == 0.0 and jnp.all(updates["big"][1:] != 0)
    assert jnp.isposinf(state.nu["big"][0].astype(jnp.float32)) and float(state.nu_scale["big"]) < 10 / 61440
    assert all_finite((updates, state.mu, state.mu_scale, state.nu_scale, state.nu["small"]))
  # The other leaf is untouched by the overflow: the same updates as when trained alone.
  alone_tx = OVERFLOWING[name]()
  alone_state = alone_tx.init({"small": params["small"]})
  for _ in range(4):
    alone_updates, alone_state = alone_tx.update({"small": quiet["small"]}, alone_state, {"small": params["small"]})
  np.testing.assert_allclose(updates["small"], alone_updates["small"], rtol=1e-5)
  # Large gradients everywhere lift the leaf's scale above 10 / 61440: v[0] is stored finite (10) again.
  updates, state = step({"big": jnp.full(n, 10.0), "small": quiet["small"]}, state, params)
  assert float(state.nu_scale["big"]) > 10 / 61440
  recovered = float(state.nu["big"][0].astype(jnp.float32) * state.nu_scale["big"])
  assert 8.0 < recovered <= 12.0, recovered
  updates, state = step(quiet, state, params)
  assert updates["big"][0] != 0 and all_finite((updates, state))
