"""One call for a data-parallel train step: `jax.shard_map`, local gradients, the state's layout and donation inside.

`data_parallel(loss_fn, tx, mesh)` returns an `init` that lays out params and optimizer state over the mesh, and a
jitted `step` that takes a globally sharded batch. Inside, each rank differentiates its slice of the batch with
respect to `local_view(params)` (its own gradients, no float32 all-reduce in the backward pass) and the optimizer
does the data-parallel communication: the 1-bit family and `compressed_mean` / `uncompressed_mean` communicate
themselves; an optimizer that does not (any plain optax one) is given the exact mean of the gradients first, which
is ordinary data parallelism. Only the data axis (or a `comm.TwoLevel` grid's two axes) is manual inside the step:
other mesh axes (a "model" axis that shards the params by `NamedSharding`) stay with the compiler, as under `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optax_lamb16 import _compression as compression
from optax_lamb16 import _gradient_mean as gradient_mean
from optax_lamb16 import _rank_types
from optax_lamb16 import _sharding as sharding
from optax_lamb16 import comm as comm_lib


class DataParallel:
  """A data-parallel training step and the layout it needs; made by `data_parallel`.

  Attributes:
    mesh: The device mesh.
    batch_sharding: Where the batch goes: its leading axis split over the data axis (or a grid's two axes).
    world_size: The number of data-parallel ranks.
  """

  def __init__(
    self,
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    comm: Any,
    has_aux: bool,
    donate: bool,
  ):
    self._loss_fn, self._given_tx, self._comm, self._has_aux, self._donate = loss_fn, tx, comm, has_aux, donate
    self.mesh = mesh
    axes = _data_axes(comm, mesh)
    self._axes = axes
    self._axis = axes[0] if len(axes) == 1 else axes  # as local_view, pmean and the specs take it
    self.world_size = int(np.prod([mesh.shape[name] for name in axes]))
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(self._axis))
    self._chosen: dict[str, Any] = {}  # fixed by `init`: the tx that runs, per-rank params, the jitted step

  def _shard_map(self, f, in_specs, out_specs):
    # Only the data axes are manual: other mesh axes (a "model" axis) stay with the compiler.
    return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(self._axes))

  def _plan(self, params: Any) -> tuple[optax.GradientTransformation, bool]:
    """(tx to run, params per rank?), read from `tx`'s state types and from whether its updates of local
    gradients come out averaged over the data axes (the varying-axis types of `shard_map` say so)."""
    tx, axis, found = self._given_tx, self._axis, {}

    def probe(params):
      state = tx.init(params)
      found["per_rank"] = per_rank = _params_per_rank(state)
      if per_rank:
        params = sharding.local_view(params, axis)
      grads = jax.tree.map(jnp.zeros_like, sharding.local_view(params, axis))
      updates, _ = tx.update(grads, state, params)
      found["varying"] = {set(self._axes) <= _rank_types.varying_axes(u) for u in jax.tree.leaves(updates)}
      found["exchanges"] = _exchange_states(state)
      return jnp.zeros([])

    jax.eval_shape(self._shard_map(probe, (PartitionSpec(),), PartitionSpec()), params)
    if found["per_rank"] or found["varying"] <= {False}:
      return tx, found["per_rank"]
    if found["varying"] == {True, False}:
      raise ValueError(
        f"`tx` returns updates of which some are averaged over {axis!r} and some are not, so "
        f"data_parallel cannot tell whether it communicates. Average all leaves (put "
        f"`optax_lamb16.uncompressed_mean({self._comm!r})` first in the chain) or none."
      )
    if found["exchanges"]:
      raise ValueError(
        f"`tx` holds a compressed exchange, but its updates are not averaged over {axis!r}: it was "
        f"built with another `comm`. Build it with comm={self._comm!r}, as given to data_parallel."
      )
    return optax.chain(gradient_mean.uncompressed_mean(self._comm), tx), False

  def init(self, params: Any) -> tuple[Any, Any]:
    """``(params, opt_state)`` laid out for `step`: the params (one copy per rank, stacked on a leading axis, where
    the optimizer keeps per-rank params: 0/1 Adam), and the optimizer state, its per-rank parts sharded over the
    data axis."""
    tx, per_rank = self._plan(params)
    if per_rank:
      params = jax.tree.map(lambda p: jnp.broadcast_to(p, (self.world_size, *jnp.shape(p))), params)
    param_spec = PartitionSpec(self._axis) if per_rank else PartitionSpec()
    opt_state, state_specs = sharding.init_laid_out(
      lambda p: tx.init(self._mine(p, per_rank)), params, self.mesh, self._axis, param_spec, frozenset(self._axes)
    )
    # Placed on the mesh, and copies: `step` donates them, which must not delete the caller's arrays. Params
    # already laid out on this mesh (e.g. sharded over a "model" axis) keep their layout.
    params = jax.tree.map(lambda p: jax.device_put(jnp.array(p, copy=True), self._placement(p, param_spec)), params)
    self._chosen.update(tx=tx, per_rank=per_rank, step=self._jitted_step(tx, per_rank, param_spec, state_specs))
    return params, opt_state

  def _placement(self, param: Any, spec: PartitionSpec) -> NamedSharding:
    kept = getattr(param, "sharding", None)
    if spec == PartitionSpec() and isinstance(kept, NamedSharding) and kept.mesh == self.mesh:
      return kept
    return NamedSharding(self.mesh, spec)

  @staticmethod
  def _mine(params: Any, per_rank: bool) -> Any:
    """Inside `shard_map`: this rank's params (its row of the stacked per-rank copies)."""
    return jax.tree.map(lambda a: a[0], params) if per_rank else params

  def _jitted_step(self, tx, per_rank, param_spec, state_specs):
    axis = self._axis

    def local_step(params, opt_state, batch):
      mine = self._mine(params, per_rank)
      # Per-rank params are this rank's already; replicated ones are viewed per rank so that the gradients stay
      # local (autodiff would otherwise sum them over the axis in a float32 all-reduce).
      view = mine if per_rank else sharding.local_view(mine, axis)
      out, grads = jax.value_and_grad(self._loss_fn, has_aux=self._has_aux)(view, batch)
      updates, opt_state = tx.update(grads, opt_state, mine)
      mine = optax.apply_updates(mine, updates)
      mean = lambda tree: jax.tree.map(lambda x: jax.lax.pmean(x, axis), tree)
      new_params = jax.tree.map(lambda a: a[None], mine) if per_rank else mine
      return (new_params, opt_state, *(mean(out) if self._has_aux else (mean(out),)))

    replicated = PartitionSpec()
    outs = (param_spec, state_specs, replicated) + ((replicated,) if self._has_aux else ())
    return jax.jit(
      self._shard_map(local_step, (param_spec, state_specs, PartitionSpec(axis)), outs),
      donate_argnums=(0, 1) if self._donate else (),
    )

  def step(self, params: Any, opt_state: Any, batch: Any) -> tuple[Any, ...]:
    """One jitted training step: ``(params, opt_state, loss)``, or ``(params, opt_state, loss, aux)``.

    `batch` is a pytree of arrays whose leading axis is the global batch. jax arrays are used as they are laid out
    (put them with `batch_sharding` to avoid a copy); host arrays are placed with `batch_sharding` (in a
    multi-process job each process passes its own part of the batch). `loss` and `aux` are averaged over the
    ranks. `params` and `opt_state` are donated unless `data_parallel` was given ``donate=False``.
    """
    compiled = self._after_init("step")
    _check_batch(batch, self.world_size)
    return compiled(params, opt_state, jax.tree.map(self._placed, batch))

  def _placed(self, x: Any) -> jax.Array:
    """Host data as a global array split over the data axis (each process's own part in a multi-process job)."""
    if isinstance(x, jax.Array):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, self.batch_sharding)
    return jax.make_array_from_process_local_data(self.batch_sharding, x)

  def _after_init(self, name: str) -> Any:
    if name not in self._chosen:
      raise ValueError("Call `init(params)` of this DataParallel first: it lays out params and state for `step`.")
    return self._chosen[name]

  @property
  def params_per_rank(self) -> bool:
    """Whether `init` stacked one copy of the params per rank (the optimizer keeps them per rank: 0/1 Adam)."""
    return self._after_init("per_rank")

  @property
  def tx(self) -> optax.GradientTransformation:
    """The transformation `step` runs: the given one, or ``optax.chain(uncompressed_mean(comm), tx)`` when it does
    not average over the ranks itself (then the state is that chain's)."""
    return self._after_init("tx")

  def unstack_params(self, params: Any) -> Any:
    """One copy of the params, for evaluation or export: rank 0's where they are kept per rank (the ranks agree
    after each sync step, up to rounding), else `params` as they are."""
    return jax.tree.map(lambda p: p[0], params) if self.params_per_rank else params


def _data_axes(comm: Any, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the data-parallel ranks span (one name, or a `TwoLevel` grid's (slow, fast)), checked."""
  if isinstance(comm, str):
    axes = (comm,)
  elif isinstance(comm, comm_lib.TwoLevel):
    axes = comm.axis_names
  else:
    raise TypeError(
      f"`comm` must be the name of a mesh axis (e.g. 'data') or a `comm.TwoLevel` of two mesh axes, got "
      f"{comm!r}. An MPI communicator has no mesh: write the step with `jax.jit` and pass "
      f"comm=MPI.COMM_WORLD to the optimizer (examples/mpi.py)."
    )
  sharding.check_mesh_axes(mesh, axes, f"comm={comm!r}")
  return axes


def _params_per_rank(state: Any) -> bool:
  """Whether any part of `state` is of a type that keeps the params themselves per rank (``PARAMS_PER_RANK``)."""
  nodes = jax.tree.leaves(state, is_leaf=lambda x: getattr(type(x), "PARAMS_PER_RANK", False))
  return any(getattr(type(node), "PARAMS_PER_RANK", False) for node in nodes)


def _exchange_states(state: Any) -> list[Any]:
  is_exchange = lambda x: isinstance(x, compression.CompressedAllReduceState)
  return [s for s in jax.tree.leaves(state, is_leaf=is_exchange) if is_exchange(s)]


def _check_batch(batch: Any, world: int) -> None:
  processes = jax.process_count()
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    shape = jnp.shape(leaf)
    # Host data in a multi-process job is this process's part, split over the ranks of this process.
    local = processes > 1 and not isinstance(leaf, jax.Array)
    ranks = world // processes if local else world
    if not shape or shape[0] % ranks:
      what = (
        f"this process's part of the global batch, split over its {ranks} data-parallel ranks"
        if local
        else f"the global batch, split over {world} data-parallel ranks"
      )
      raise ValueError(
        f"batch leaf {jax.tree_util.keystr(path) or '<root>'} has shape {shape}: its leading axis "
        f"is {what}, so it must be a multiple of {ranks}."
      )


def data_parallel(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  mesh: Mesh,
  comm: Any = "data",
  *,
  has_aux: bool = False,
  donate: bool = True,
) -> DataParallel:
  """A data-parallel training step for `loss_fn` and `tx` over `mesh`, with the layout and communication done.

  Works for every optimizer of this package (built with the same `comm`) and for plain optax ones. The 1-bit
  optimizers and `compressed_mean` exchange each rank's own gradients compressed; an optimizer that does not
  average over ranks itself is given their exact mean first (one float32 all-reduce of the flattened gradients).
  Which kind `tx` is, and whether it keeps per-rank params (0/1 Adam), is read from its types when `init` runs.

  Args:
    loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with `has_aux`), a scalar loss of one rank's
      slice of the batch. For a Flax NNX model, split it (``graphdef, params = nnx.split(model, nnx.Param)``) and
      merge inside: ``loss_fn = lambda p, b: loss(nnx.merge(graphdef, p), b)``.
    tx: The optimizer.
    mesh: The device mesh. Axes other than the data axes stay automatic: params sharded over a "model" axis by
      `NamedSharding` keep that sharding.
    comm: The data-parallel mesh axis (the `comm` the optimizer was built with), or a `comm.TwoLevel` grid of two
      mesh axes.
    has_aux: Whether `loss_fn` returns ``(loss, aux)``; `aux` (floats) is averaged over the ranks.
    donate: Donate params and optimizer state to `step` (their buffers are reused).

  Returns:
    A `DataParallel`: `init(params)` lays out params and state, `step(params, opt_state, batch)` trains.

  Example (on up to 4 devices; the 1-bit exchange replaces the gradients' all-reduce):
    >>> import jax, jax.numpy as jnp, optax_lamb16
    >>> world = min(4, jax.device_count())
    >>> mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
    ...                      devices=jax.devices()[:world])
    >>> tx = optax_lamb16.onebit_adam(1e-2, comm="data", freeze_step=3, mode="drop_in")
    >>> loss_fn = lambda params, batch: jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)
    >>> dp = optax_lamb16.data_parallel(loss_fn, tx, mesh)
    >>> params, opt_state = dp.init({"w": jnp.zeros((3, 1))})
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones((8, 1))}
    >>> losses = []
    >>> for _ in range(5):
    ...   params, opt_state, loss = jax.block_until_ready(dp.step(params, opt_state, batch))
    ...   losses.append(float(loss))
    >>> losses[-1] < losses[0]
    True
  """
  return DataParallel(loss_fn, tx, mesh, comm, has_aux, donate)
