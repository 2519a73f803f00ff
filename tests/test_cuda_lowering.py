"""What the GPU will run, read from programs lowered for "cuda" on this CPU: nothing is compiled or run.

``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` gives the StableHLO module a GPU would compile, with
the "cuda" branch of every `lax.platform_dependent`, also on a CPU-only jaxlib (collectives inside `jax.shard_map`
included). Two kinds of checks:

- The float8 optimizers (LAMB16, faithful and block-wise, with and without stochastic rounding, and their
  ``scale_by_*`` blocks): native float8 conversions (``stablehlo.convert`` to and from f8E4M3FN and f8E5M2) and no
  loop at all (``stablehlo.while``: the only loop StableHLO has), so no loop over a leaf's elements.
- The 1-bit family and `compressed_mean` inside `jax.shard_map` over 4 ranks: which collectives one step runs in
  each phase, with their operands' shapes and bytes. A phase switch is a loop of 0 or 1 trip (`_onebit.run_if`), so
  a small interpreter (`Program`) evaluates each loop's trip condition from the step's scalar inputs (the state's
  counters and flags) and collects the collectives of the loops that run. SPEC.md section 3: a compression step
  sends one all-to-all of ``N_pad / 8`` sign bytes plus a 4-byte float32 scale per rank, and one all-gather of
  ``N_pad / (8 P)`` bytes plus 4, and no float32 all-reduce; the warm-up's exact mean is one float32 all-reduce of
  the N elements.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.lib.mlir import ir
from jax.sharding import PartitionSpec as P

import optax_lamb16
from tests import onebit_harness as h

WORLD = 4
COLLECTIVES = (
  "stablehlo.all_reduce",
  "stablehlo.all_to_all",
  "stablehlo.all_gather",
  "stablehlo.reduce_scatter",
  "stablehlo.collective_permute",
  "stablehlo.collective_broadcast",
)
_NUMPY = {
  "i1": np.bool_,
  "i8": np.int8,
  "i32": np.int32,
  "i64": np.int64,
  "ui8": np.uint8,
  "ui32": np.uint32,
  "ui64": np.uint64,
  "f32": np.float32,
  "f64": np.float64,
}


def lower_for_cuda(f, *args, **jit_kwargs):
  return jax.jit(f, **jit_kwargs).trace(*args).lower(lowering_platforms=("cuda",))


def _element_type(value_type) -> str:
  return str(ir.RankedTensorType(value_type).element_type)


def _shape(value_type) -> tuple[int, ...]:
  return tuple(ir.RankedTensorType(value_type).shape)


class Program:
  """A lowered module, its operations, and the collectives one call runs for given inputs.

  `inputs` are the values of the module's arguments (``jit(..., keep_unused=True)``: its flattened arguments, in
  order); only the scalars that decide a loop's trip count are read. The interpreter knows the scalar operations
  that JAX emits for step counters and phase flags, and refuses anything else with an error that names it.
  """

  def __init__(self, lowered, inputs=()):
    self.module = lowered.compiler_ir("stablehlo")
    self.functions = {
      ir.StringAttr(op.attributes["sym_name"]).value: op
      for op in self.module.body.operations
      if op.operation.name == "func.func"
    }
    main = self.functions["main"].regions[0].blocks[0]
    inputs = [np.asarray(x) for x in inputs]
    if inputs:
      assert len(inputs) == len(main.arguments), (len(inputs), len(main.arguments))
    # Each block argument stands for the value it is bound to on entry (a loop's body: the first trip).
    self.bindings = dict(zip(main.arguments, inputs))
    for op in self.operations():
      if op.name in ("sdy.manual_computation", "stablehlo.while"):
        for region in op.regions:
          self.bindings.update(zip(region.blocks[0].arguments, op.operands))

  def operations(self, block=None):
    """Every operation of the module (of `block`), nested ones included."""
    blocks = [block] if block is not None else [f.regions[0].blocks[0] for f in self.functions.values()]
    for b in blocks:
      for op in b.operations:
        op = op.operation
        yield op
        for region in op.regions:
          for inner in region.blocks:
            yield from self.operations(inner)

  def value(self, v, env=None):
    """The concrete value of the scalar SSA value `v` (`env`: a called function's arguments)."""
    if isinstance(v, ir.BlockArgument):
      if env is not None and v in env:
        return env[v]
      bound = self.bindings[v]
      return bound if isinstance(bound, np.ndarray) else self.value(bound)
    op, name = v.owner, v.owner.name
    if name == "func.call":
      callee = self.functions[ir.FlatSymbolRefAttr(op.attributes["callee"]).value].regions[0].blocks[0]
      inner = dict(zip(callee.arguments, (self.value(x, env) for x in op.operands)))
      ret = next(o for o in callee.operations if o.operation.name == "func.return")
      return self.value(ret.operands[v.result_number], inner)
    if name == "stablehlo.constant":
      text = re.match(r"dense<([^>]*)>", str(op.attributes["value"])).group(1)
      number = {"true": True, "false": False}.get(text)
      number = float(text) if number is None else number
      return np.full(_shape(v.type), number, _NUMPY[_element_type(v.type)])
    if name == "stablehlo.optimization_barrier":
      return self.value(op.operands[v.result_number], env)
    a = [self.value(x, env) for x in op.operands]
    with np.errstate(over="ignore"):
      if name == "stablehlo.compare":
        direction = re.search(r"comparison_direction (\w+)", str(op.attributes["comparison_direction"])).group(1)
        return {
          "EQ": np.equal,
          "NE": np.not_equal,
          "LT": np.less,
          "LE": np.less_equal,
          "GT": np.greater,
          "GE": np.greater_equal,
        }[direction](a[0], a[1])
      binary = {
        "stablehlo.add": np.add,
        "stablehlo.subtract": np.subtract,
        "stablehlo.multiply": np.multiply,
        "stablehlo.remainder": np.fmod,
        "stablehlo.and": np.logical_and,
        "stablehlo.or": np.logical_or,
        "stablehlo.maximum": np.maximum,
        "stablehlo.minimum": np.minimum,
      }
      if name in binary:
        result = binary[name](a[0], a[1])
      elif name == "stablehlo.not":
        result = np.logical_not(a[0]) if a[0].dtype == np.bool_ else np.invert(a[0])
      elif name == "stablehlo.select":
        result = np.where(a[0], a[1], a[2])
      elif name in ("stablehlo.convert", "stablehlo.reshape", "stablehlo.broadcast_in_dim"):
        result = np.broadcast_to(a[0], _shape(v.type)) if name == "stablehlo.broadcast_in_dim" else a[0]
      else:
        raise NotImplementedError(f"Program.value cannot evaluate {name} (a trip count that depends on it?)")
    return np.asarray(result).astype(_NUMPY[_element_type(v.type)]).reshape(_shape(v.type))

  def runs(self, loop) -> bool:
    """Whether the `stablehlo.while` `loop` makes a first trip: its condition on the values it starts from."""
    ret = loop.regions[0].blocks[0].operations[len(loop.regions[0].blocks[0].operations) - 1]
    return bool(self.value(ret.operands[0]))

  def collectives_run(self, block=None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(operation, operand element type, operand shape) of each collective one call runs, in program order: those
    of the loops that make a trip (their body once), and of the functions called."""
    if block is None:
      block = self.functions["main"].regions[0].blocks[0]
    found = []
    for op in block.operations:
      op = op.operation
      if op.name in COLLECTIVES:
        found.append((op.name.split(".")[1], _element_type(op.operands[0].type), _shape(op.operands[0].type)))
      elif op.name == "stablehlo.while":
        if self.runs(op):
          found += self.collectives_run(op.regions[1].blocks[0])
      elif op.name == "func.call":
        callee = self.functions[ir.FlatSymbolRefAttr(op.attributes["callee"]).value]
        found += self.collectives_run(callee.regions[0].blocks[0])
      else:
        for region in op.regions:
          for inner in region.blocks:
            found += self.collectives_run(inner)
    return found


def _op_names(program: Program) -> set[str]:
  return {op.name for op in program.operations()}


def _float8_converts(program: Program) -> set[tuple[str, str]]:
  """(from, to) element types of the conversions to or from a float8 type."""
  converts = set()
  for op in program.operations():
    if op.name == "stablehlo.convert":
      pair = (_element_type(op.operands[0].type), _element_type(op.results[0].type))
      if any(t.startswith("f8") for t in pair):
        converts.add(pair)
  return converts


# ----------------------------------------------------------------------------------------------------------------------
# The float8 optimizers.

PARAMS = {"b": jnp.linspace(-1.0, 1.0, 48).astype(jnp.bfloat16), "w": jnp.linspace(-1.0, 1.0, 64 * 48).reshape(64, 48)}
FLOAT8 = {
  "lamb16": lambda: optax_lamb16.lamb16(1e-2, weight_decay=1e-2),
  "lamb16_blockwise": lambda: optax_lamb16.lamb16_blockwise(1e-2, weight_decay=1e-2, block_size=64),
  "lamb16_blockwise-stochastic_rounding": lambda: optax_lamb16.lamb16_blockwise(
    1e-2, weight_decay=1e-2, block_size=64, stochastic_rounding=True
  ),
  "scale_by_lamb16": lambda: optax_lamb16.scale_by_lamb16(),
  "scale_by_lamb16_blockwise": lambda: optax_lamb16.scale_by_lamb16_blockwise(block_size=64),
  "scale_by_lamb16_blockwise-stochastic_rounding": lambda: optax_lamb16.scale_by_lamb16_blockwise(
    block_size=64, stochastic_rounding=True
  ),
  "adamw16-stochastic_rounding": lambda: optax_lamb16.adamw16(1e-2, block_size=64),
  "adamw16": lambda: optax_lamb16.adamw16(1e-2, block_size=64, stochastic_rounding=False),
}


@pytest.mark.parametrize("name", sorted(FLOAT8))
def test_float8_optimizers_convert_natively_and_do_not_loop_on_the_gpu(name):
  """m and v are read back with native conversions from f8E4M3FN and f8E5M2, and stored with native conversions to
  them; with stochastic rounding v is stored by SPEC.md section 1b's choice between its two float8 neighbours (no
  rounding mode of a native conversion makes it), m still natively. No loop anywhere."""
  tx = FLOAT8[name]()
  program = Program(lower_for_cuda(tx.update, PARAMS, tx.init(PARAMS), PARAMS))
  expected = {("f8E4M3FN", "f32"), ("f8E5M2", "f32"), ("f32", "f8E4M3FN"), ("f32", "f8E5M2")}
  if name.endswith("stochastic_rounding"):
    expected.remove(("f32", "f8E5M2"))
  assert expected <= _float8_converts(program), _float8_converts(program)
  assert "stablehlo.while" not in _op_names(program), "the GPU program loops"


def test_the_loop_and_conversion_detectors_see_loops_and_float8():
  looping = lambda x: jax.lax.fori_loop(0, x.shape[0], lambda i, y: y.at[i].set(y[i] * 2), x)
  assert "stablehlo.while" in _op_names(Program(lower_for_cuda(looping, jnp.ones(8))))
  cast = lambda x: x.astype(jnp.float8_e4m3fn).astype(jnp.float32)
  assert _float8_converts(Program(lower_for_cuda(cast, jnp.ones(8)))) == {("f32", "f8E4M3FN"), ("f8E4M3FN", "f32")}


# ----------------------------------------------------------------------------------------------------------------------
# The 1-bit family: the collectives of each phase.

ONEBIT_PARAMS = {"b": jnp.zeros(30, jnp.bfloat16), "s": jnp.zeros([]), "w": jnp.zeros((64, 32))}
N = 30 + 1 + 64 * 32


def padded(n: int, world: int) -> int:
  """SPEC.md section 3: n rounded up to a multiple of P * lcm(P, 8)."""
  quantum = world * math.lcm(world, 8)
  return -(-n // quantum) * quantum


def exchange_collectives(n: int, world: int) -> list[tuple[str, str, tuple[int, ...]]]:
  """SPEC.md section 3's two collectives: the all-to-all of each rank's P chunks of sign bytes, each followed by the
  4 bytes of its float32 scale, and the all-gather of its server chunk's sign bytes and scale."""
  row = padded(n, world) // world // 8 + 4
  return [("all_to_all", "ui8", (world, row)), ("all_gather", "ui8", (1, row))]


EXACT_MEAN = [("all_reduce", "f32", (N,))]  # one float32 all-reduce of the flattened tree
ONEBIT = {  # name: (factory, per-rank params, {phase: (scalar state fields, collectives)})
  "onebit_adam": (
    lambda: optax_lamb16.onebit_adam(1e-2, comm="data", freeze_step=4, weight_decay=1e-2),
    False,
    {"warm-up": ({"count": 1}, EXACT_MEAN), "compression": ({"count": 4}, exchange_collectives(N, WORLD))},
  ),
  "onebit_lamb": (
    lambda: optax_lamb16.onebit_lamb(1e-2, comm="data", freeze_step=4, weight_decay=1e-2),
    False,
    {"warm-up": ({"count": 1}, EXACT_MEAN), "compression": ({"count": 4}, exchange_collectives(N, WORLD))},
  ),
  "zero_one_adam": (
    lambda: optax_lamb16.zero_one_adam(1e-2, comm="data", var_freeze_step=4, weight_decay=1e-2),
    True,
    {
      "variance": ({"count": 1}, EXACT_MEAN),
      "compressed": ({"count": 2, "var_interval": 2}, exchange_collectives(N, WORLD)),
      "local": ({"count": 2, "frozen": True, "local_step_interval": 2, "lr_sum": 0.01}, []),
      "sync": ({"count": 3, "frozen": True, "local_step_interval": 2, "lr_sum": 0.01}, exchange_collectives(N, WORLD)),
    },
  ),
  "compressed_mean": (
    lambda: optax_lamb16.compressed_mean("data"),
    False,
    {"every step": ({}, exchange_collectives(N, WORLD))},
  ),
  "uncompressed_mean": (lambda: optax_lamb16.uncompressed_mean("data"), False, {"every step": ({}, EXACT_MEAN)}),
}
PHASES = [
  pytest.param(name, phase, id=f"{name}-{phase}") for name, (_, _, phases) in ONEBIT.items() for phase in phases
]


def _with_scalars(state, fields: dict):
  """`state` with the scalar fields named in `fields` set (in the 1-bit state, the first element of a chain's)."""
  if not fields:
    return state
  if isinstance(state, tuple) and not hasattr(state, "_fields"):  # a chain: its first element
    return (_with_scalars(state[0], fields), *state[1:])
  return state._replace(**{name: jnp.asarray(value, getattr(state, name).dtype) for name, value in fields.items()})


@pytest.fixture(scope="module")
def onebit_programs():
  """Each communicating transform's step inside `shard_map` over 4 ranks, lowered for "cuda" once, with its
  arguments (params, state, grads)."""
  mesh = h.host_mesh(WORLD)
  programs = {}
  for name, (make, per_rank, _) in ONEBIT.items():
    tx = make()
    state = optax_lamb16.sharded_init(tx, ONEBIT_PARAMS, mesh, "data")
    specs = optax_lamb16.state_partition_specs(state, "data")
    params = (
      jax.tree.map(lambda p: jnp.broadcast_to(p, (WORLD, *p.shape)), ONEBIT_PARAMS) if per_rank else ONEBIT_PARAMS
    )
    grads = jax.tree.map(lambda p: jnp.zeros((WORLD, *p.shape), p.dtype), ONEBIT_PARAMS)

    def local(params, state, grads, tx=tx, per_rank=per_rank):
      mine = jax.tree.map(lambda a: a[0], params) if per_rank else params
      updates, state = tx.update(jax.tree.map(lambda g: g[0], grads), state, mine)
      return jax.tree.map(lambda u: u[None], updates) if per_rank else updates, state

    param_spec = P("data") if per_rank else P()
    step = jax.shard_map(local, mesh=mesh, in_specs=(param_spec, specs, P("data")), out_specs=(param_spec, specs))
    programs[name] = (lower_for_cuda(step, params, state, grads, keep_unused=True), (params, state, grads))
  return programs


@pytest.mark.parametrize("name, phase", PHASES)
def test_onebit_step_runs_the_collectives_of_its_phase_on_the_gpu(onebit_programs, name, phase):
  """The collectives a step of `phase` runs, in order, with their operand shapes: a compression step exactly SPEC.md
  section 3's all-to-all and all-gather of sign bytes and float32 scales (no float32 all-reduce), a warm-up or
  variance step exactly one float32 all-reduce of the N elements, a local step of 0/1 Adam nothing."""
  lowered, (params, state, grads) = onebit_programs[name]
  fields, expected = ONEBIT[name][2][phase]
  program = Program(lowered, jax.tree.leaves((params, _with_scalars(state, fields), grads)))
  ran = program.collectives_run()
  assert ran == expected, ran
  sent = {op: int(np.prod(shape)) * (4 if dtype == "f32" else 1) for op, dtype, shape in ran}
  if "all_to_all" in sent:  # the bytes of SPEC.md section 3: N_pad / 8 sign bytes and P scales; its server chunk
    assert sent["all_to_all"] == padded(N, WORLD) // 8 + 4 * WORLD
    assert sent["all_gather"] == padded(N, WORLD) // (8 * WORLD) + 4


def test_the_interpreter_follows_a_phase_switch_and_refuses_what_it_cannot_evaluate():
  """A loop of 0 or 1 trips around a collective (as `_onebit.run_if`) runs where its scalar says so; a trip count
  computed from a tensor is refused with an error that names the operation."""
  mesh = h.host_mesh(WORLD)

  def step(flag, x):
    return optax_lamb16._onebit.run_if(flag[0], lambda x, _: jax.lax.psum(x, "data"), x, jnp.zeros(x.shape))[1]

  f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
  lowered = lower_for_cuda(f, jnp.ones(1, jnp.bool_), jnp.ones(WORLD * 3), keep_unused=True)
  assert Program(lowered, [np.ones(1, np.bool_), np.ones(WORLD * 3)]).collectives_run() == [("all_reduce", "f32", (3,))]
  assert Program(lowered, [np.zeros(1, np.bool_), np.ones(WORLD * 3)]).collectives_run() == []
  tensor = jax.shard_map(lambda x: step(x[:1] > 0, x), mesh=mesh, in_specs=P("data"), out_specs=P())
  with pytest.raises(NotImplementedError, match="cannot evaluate stablehlo.slice"):
    Program(lower_for_cuda(tensor, jnp.ones(WORLD * 3)), [np.ones(WORLD * 3)]).collectives_run()
