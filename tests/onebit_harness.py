"""A small data-parallel least-squares problem run by the JAX optimizers (in `shard_map`) and by the NumPy oracles.

Each rank has its own data (X_r, y_r) and adds its own noise to its gradient every step, so local gradients differ.
The model ``x @ w + b + s`` has a 2-D, a 1-D and a 0-d parameter (a scalar offset ``s``, so that every optimizer and
state layout meets a 0-d leaf), and a leaf ``z`` that never gets a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lamb16
from tests import reference

NAMES = ("b", "s", "w", "z")  # tree-flatten order of the params dict; "s" is 0-d; "z" never gets a gradient
DIM, OUT, EXAMPLES = 16, 12, 24
OFFSET = 2.0  # of the targets, learnt by the 0-d parameter "s"


def make_problem(world: int, steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  params = {
    "b": np.zeros(OUT, np.float32),
    "w": (rng.standard_normal((DIM, OUT)) * 0.3).astype(np.float32),
    "z": np.ones(5, np.float32),
  }
  x = rng.standard_normal((world, EXAMPLES, DIM)).astype(np.float32)
  y = (x @ rng.standard_normal((DIM, OUT)) + rng.standard_normal((world, EXAMPLES, OUT)) * 0.1).astype(np.float32)
  noise = {
    "b": rng.standard_normal((steps, world, OUT)).astype(np.float32) * 0.2,
    "w": rng.standard_normal((steps, world, DIM, OUT)).astype(np.float32) * 0.2,
    "z": np.zeros((steps, world, 5), np.float32),
  }
  # The 0-d offset: its noise drawn last, so that the other leaves' draws do not depend on it; the targets are offset
  # by OFFSET, so that s moves from 0.75 towards it and stays well away from 0 (relative errors stay meaningful).
  y = y + np.float32(OFFSET)
  params["s"] = np.asarray(0.75, np.float32)
  noise["s"] = rng.standard_normal((steps, world)).astype(np.float32) * 0.2
  return params, x, y, noise


def partial_mask() -> dict:
  """A `momentum_mask` for the problem: every other row of "w", the never-trained "z" and one entry of "b" masked."""
  w = np.ones((DIM, OUT), np.float32)
  w[::2] = 0.0
  b = np.ones(OUT, np.float32)
  b[3] = 0.0
  return {"b": b, "s": np.ones((), np.float32), "w": w, "z": np.zeros(5, np.float32)}


def numpy_grads(params: dict, x: np.ndarray, y: np.ndarray, noise_t: dict, rank: int) -> list[np.ndarray]:
  """Gradient of mean((x w + b - y)^2) on `rank`'s data, plus its noise; leaves in NAMES order."""
  residual = x[rank] @ params["w"] + params["b"] + params["s"] - y[rank]
  scale = np.float32(2.0 / residual.size)
  grads = {
    "b": scale * residual.sum(axis=0),
    "s": scale * residual.sum(),
    "w": scale * (x[rank].T @ residual),
    "z": np.zeros(5, np.float32),
  }
  return [(grads[n] + noise_t[n][rank]).astype(np.float32) for n in NAMES]


def host_mesh(world: int | None = None, axis: str = "data"):
  """A 1-D mesh over the first `world` devices (all of them by default, across processes too)."""
  world = jax.device_count() if world is None else world
  return jax.make_mesh((world,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:world])


def grid_mesh(hosts: int, local: int):
  """A 2-D mesh ("hosts", "local") over the first hosts * local devices, for `comm.TwoLevel`."""
  return jax.make_mesh(
    (hosts, local), GRID_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=jax.devices()[: hosts * local]
  )


GRID_AXES = ("hosts", "local")


def data_axes(mesh):
  """(comm, axes) of a test mesh: "data" on a 1-D mesh; on a `grid_mesh`, the two-level grid and its axis pair."""
  if tuple(mesh.axis_names) == GRID_AXES:
    return optax_lamb16.comm.TwoLevel(fast="local", slow="hosts"), GRID_AXES
  return "data", "data"


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] + params["b"] + params["s"] - y) ** 2)


def noisy_step(tx, params, state, x, y, noise, rank, view=None):
  """One update of `rank`'s least-squares problem with its gradient noise added; `view` is what to differentiate
  instead of `params` (e.g. `local_view(params)` inside `shard_map`)."""
  grads = jax.grad(_loss)(params if view is None else view, x[rank], y[rank])
  updates, state = tx.update(jax.tree.map(lambda g, n: g + n[rank], grads, noise), state, params)
  return optax.apply_updates(params, updates), state


def trajectory_fn(make_tx, mesh, per_rank_params: bool = False, with_states: bool = False):
  """A jitted f(params, x, y, noise) -> each rank's params after every step, {name: (P, T, ...)}, over `mesh`.

  All steps run in one `lax.scan` inside one `shard_map` (one dispatch). Params are replicated values (typed
  invariant over the axis, as users keep them with spec P()) unless `per_rank_params` (0/1 Adam between syncs).
  `with_states`: f returns (params, states) instead, states the optimizer state after every step with every leaf
  stacked per rank as (P, T, ...) (each rank's own view of it: its shard of a per-rank leaf, a replicated leaf as
  that rank holds it).
  """
  comm, data = data_axes(mesh)
  tx = make_tx(comm)

  def per_rank(params, x, y, noise):
    if per_rank_params:
      params = jax.lax.pcast(params, data if isinstance(data, tuple) else (data,), to="varying")
    state = tx.init(params)

    def step(carry, noise_t):
      params, state = carry
      # local_view: this rank's own gradients (autodiff would otherwise psum them over the axis).
      grads = jax.grad(_loss)(
        optax_lamb16.local_view(jax.tree.map(lambda p: p.astype(jnp.float32), params), data), x[0], y[0]
      )
      grads = jax.tree.map(lambda g, n, p: (g + n[0]).astype(p.dtype), grads, noise_t, params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), ((params, state) if with_states else params)

    _, trajectory = jax.lax.scan(step, (params, state), noise)
    return jax.tree.map(lambda a: a[None], trajectory)

  noise_specs = {n: P(None, data) for n in NAMES}
  return jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=(P(), P(data), P(data), noise_specs), out_specs=P(data)))


def global_inputs(mesh, params, x, y, noise, param_dtype=jnp.float32):
  """The problem as global arrays over `mesh` (works across jax.distributed processes too)."""

  def put(array, spec):
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec), lambda index: array[index])

  params = {n: put(np.asarray(p).astype(param_dtype), P()) for n, p in params.items()}
  _, data = data_axes(mesh)
  return params, put(x, P(data)), put(y, P(data)), {n: put(a, P(None, data)) for n, a in noise.items()}


def run_jax(
  make_tx,
  world: int,
  params: dict,
  x,
  y,
  noise,
  param_dtype=jnp.float32,
  per_rank_params=False,
  with_states=False,
  hosts=None,
):
  """`trajectory_fn` on the first `world` host devices of this process, as NumPy arrays: the params trajectory, or
  (params, states) with `with_states` (every state leaf (P, T, ...): rank r's state after step t at [r, t]).
  With `hosts`, over a `grid_mesh` of `hosts` x `world // hosts` ranks and a `comm.TwoLevel` communicator."""
  mesh = host_mesh(world) if hosts is None else grid_mesh(hosts, world // hosts)
  f = trajectory_fn(make_tx, mesh, per_rank_params, with_states)
  return jax.tree.map(np.asarray, f(*global_inputs(mesh, params, x, y, noise, param_dtype)))


def state_at(states, t: int = -1, rank: int = 0):
  """Rank `rank`'s state after step `t` (default: the last) from `run_jax(..., with_states=True)`'s states."""
  return jax.tree.map(lambda a: a[rank, t], states)


def zero_one_adam_phases(states, rank: int = 0) -> list[str]:
  """Each step's phase as rank `rank`'s 0/1 Adam state schedules it, in the oracle's `log` vocabulary.

  Step t (``count`` after it) runs from the state before it: a variance update if not `frozen` and
  ``t % var_interval == 0``, otherwise a compressed step until frozen; after the freeze a local step, and a sync too
  if ``t % local_step_interval == 0``. The state before the first step is `init`'s (count 1, intervals 1, unfrozen).
  """
  count = states.count[rank]
  frozen = np.concatenate([[False], states.frozen[rank, :-1]])
  var_interval = np.concatenate([[1], states.var_interval[rank, :-1]])
  local_interval = np.concatenate([[1], states.local_step_interval[rank, :-1]])
  assert list(count) == list(range(2, len(count) + 2)), count  # DeepSpeed's count: the first update has t = 2
  phases = []
  for t, was_frozen, v_int, l_int in zip(count, frozen, var_interval, local_interval):
    if not was_frozen:
      phases.append("variance" if t % v_int == 0 else "compressed")
    else:
      phases.append("local+sync" if t % l_int == 0 else "local")
  return phases


def run_mpi_rank(tx, rank: int, params: dict, x, y, noise):
  """This MPI rank's trajectory (no shard_map: one device per process, `tx` built with an mpi4py comm)."""

  def step(carry, noise_t):
    params, state = noisy_step(tx, *carry, x, y, noise_t, rank)
    return (params, state), params

  @jax.jit
  def run(params):
    return jax.lax.scan(step, (params, tx.init(params)), jax.tree.map(jnp.asarray, noise))[1]

  return jax.tree.map(np.asarray, run(jax.tree.map(jnp.asarray, params)))


def run_oracle(oracle, world: int, params: dict, x, y, noise, param_dtype=None) -> list[list[list[np.ndarray]]]:
  """Runs a NumPy oracle whose `step(params, local_grads)` returns every rank's new params (a list per rank) or
  the params all ranks share. Returns trajectory[t][rank] = list of leaves in NAMES order.

  `param_dtype` (e.g. ml_dtypes.bfloat16; None: float32): the params start rounded to it and the local gradients are
  rounded to it, as `trajectory_fn` and the single-device loops give them to the optimizer (make the oracle with
  the same `param_dtype`)."""
  rounded = reference.rounding_to(param_dtype)
  current = [[rounded(params[n]) for n in NAMES] for _ in range(world)]
  trajectory = []
  for t in range(noise["b"].shape[0]):
    noise_t = {n: noise[n][t] for n in NAMES}
    local = [[rounded(g) for g in numpy_grads(dict(zip(NAMES, current[r])), x, y, noise_t, r)] for r in range(world)]
    new = oracle.step(current, local)
    current = new if isinstance(new[0], list) else [new] * world
    trajectory.append(current)
  return trajectory


def assert_close_to_oracle(got: dict, trajectory, world: int, rtol: float = 1e-5) -> None:
  """Per step, rank and leaf: ||jax - oracle|| <= rtol * ||oracle||."""
  for t, per_rank in enumerate(trajectory):
    for r in range(world):
      for name, want in zip(NAMES, per_rank[r]):
        have = got[name][r, t].astype(np.float32)
        gap = np.linalg.norm(have - want)
        assert gap <= rtol * max(np.linalg.norm(want), 1e-30), (t, r, name, gap, np.linalg.norm(want))


class Stepper:
  """Step-by-step runs over global arrays, for loops that save, restore or inject between steps.

  `params`, `state` are the placed initial values (params stacked per rank for `per_rank_params`), `step(params,
  state, x, y, noise_t) -> (params, state)` one jitted update, `noise(noise, t)` step t's noise placed. Without a
  mesh everything runs on one device with `comm` (None, or an mpi4py communicator).
  """

  def __init__(self, make_tx, params: dict, mesh=None, per_rank_params: bool = False, comm=None):
    self.mesh, self.per_rank_params = mesh, per_rank_params
    if mesh is None:  # one device, or this process's rank of an MPI `comm` (then feed it its own data only)
      self.tx = make_tx(comm)
      self.params = jax.tree.map(jnp.asarray, params)
      self.state = jax.jit(self.tx.init)(self.params)
      self.step = jax.jit(self._single_step)
      return
    self.tx = make_tx("data")
    world = mesh.shape["data"]
    param_spec = P("data") if per_rank_params else P()
    if per_rank_params:
      params = {n: np.broadcast_to(p, (world, *p.shape)) for n, p in params.items()}
    self.params = {n: self.put(np.asarray(p), param_spec) for n, p in params.items()}
    local_init = lambda p: self.tx.init(self._mine(p))
    shapes = jax.eval_shape(
      jax.shard_map(local_init, mesh=mesh, in_specs=param_spec, out_specs=P(), check_vma=False), self.params
    )
    specs = optax_lamb16.state_partition_specs(shapes, "data")
    self.state = jax.jit(jax.shard_map(local_init, mesh=mesh, in_specs=param_spec, out_specs=specs))(self.params)
    self.step = jax.jit(
      jax.shard_map(
        self._local_step,
        mesh=mesh,
        in_specs=(param_spec, specs, P("data"), P("data"), P("data")),
        out_specs=(param_spec, specs),
      )
    )

  def put(self, array: np.ndarray, spec) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, spec), lambda index: array[index])

  def noise(self, noise: dict, t: int) -> dict:
    return {n: self.put(a[t], P("data")) for n, a in noise.items()}

  def _single_step(self, params, state, x, y, noise_t):
    return noisy_step(self.tx, params, state, x, y, noise_t, 0)

  def _mine(self, params):  # inside shard_map: this rank's params
    return jax.tree.map(lambda a: a[0], params) if self.per_rank_params else params

  def _local_step(self, params, state, x, y, noise_t):
    local = self._mine(params)
    view = None if self.per_rank_params else optax_lamb16.local_view(local, "data")
    local, state = noisy_step(self.tx, local, state, x, y, noise_t, 0, view)
    return (jax.tree.map(lambda a: a[None], local) if self.per_rank_params else local), state


def flat_errors(state: optax_lamb16.CompressedAllReduceState) -> optax_lamb16.CompressedAllReduceState:
  """`state` with its worker_error vectors concatenated on their last axis as NumPy: SPEC.md's one buffer (of one
  rank, or stacked over ranks and calls), as the oracles keep it."""
  return state._replace(worker_error=np.concatenate([np.asarray(w) for w in state.worker_error], axis=-1))


def same_bits(a, b) -> bool:
  """Bitwise equality of two pytrees of (global) arrays, on the shards this process holds."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if x.shape != y.shape or x.dtype != y.dtype:
      return False
    for u, v in zip(x.addressable_shards, y.addressable_shards):
      if np.asarray(u.data).tobytes() != np.asarray(v.data).tobytes():
        return False
  return True
