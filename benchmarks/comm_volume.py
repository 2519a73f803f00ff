"""Bytes each rank sends per step, read from the compiled HLO of a `shard_map`ped gradient exchange.

Compares, for the MNIST convnet and a ~4M-parameter pytree on P host devices: the float32 `pmean` of the gradients,
the bfloat16 `pmean`, and `optax_lamb16.compressed_allreduce`. Each collective in the optimized HLO is costed with
the standard bandwidth-optimal algorithms: all-reduce of S bytes sends ``2 (P-1)/P S`` per rank, all-gather and
all-to-all with S bytes of output send ``(P-1)/P S``, reduce-scatter with S bytes of input ``(P-1)/P S``.

  python -m benchmarks.comm_volume [--devices 8] [--out docs/results/comm_volume.json]

How the bytes grow with the number of ranks (`--scaling`): the float32 `pmean`, the bfloat16 `pmean` and the
compressed exchange at each world size, for the 4M synthetic pytree and two transformers' parameter trees
(BERT-Large, GPT-2 XL; `MODELS`), compiled from abstract shapes only (nothing is allocated):

  python -m benchmarks.comm_volume --scaling 2,4,8,16,32,64 [--models 4M,bert-large,gpt2-xl]
                                   [--out docs/results/comm_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shlex
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument(
    "--scaling",
    default=None,
    help="comma-separated world sizes: bytes per rank at each (host devices: the largest of them)",
  )
  parser.add_argument("--models", default="4M,bert-large,gpt2-xl", help="with --scaling: the parameter trees")
  parser.add_argument(
    "--out",
    default=None,
    help="default docs/results/comm_volume.json, or docs/results/comm_scaling.json with --scaling",
  )
  args = parser.parse_args()
  if args.scaling:
    args.worlds = [int(w) for w in args.scaling.split(",")]
    args.devices = max(args.worlds)
  args.out = args.out or ("docs/results/comm_scaling.json" if args.scaling else "docs/results/comm_volume.json")
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # the device count must be fixed before jax is imported
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import optax_lamb16  # noqa: E402

DTYPE_BYTES = {
  "f32": 4,
  "bf16": 2,
  "f16": 2,
  "u8": 1,
  "s8": 1,
  "pred": 1,
  "s32": 4,
  "u32": 4,
  "f64": 8,
  "s64": 8,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
_INSTRUCTION = re.compile(r"=\s*(?P<shape>\(?[^=]*?\)?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z0-9]+)\[(?P<dims>[0-9,]*)\]")


def shape_bytes(shape_text: str) -> int:
  total = 0
  for match in _ARRAY.finditer(shape_text):
    dims = [int(d) for d in match["dims"].split(",") if d]
    count = 1
    for d in dims:
      count *= d
    total += count * DTYPE_BYTES[match["dtype"]]
  return total


def collectives_of(hlo_text: str, world: int) -> list[dict]:
  """Every collective instruction in optimized HLO text, with the bytes one rank sends for it."""
  found = []
  for line in hlo_text.splitlines():
    line = re.sub(r"/\*.*?\*/", "", line)  # drop /*index=5*/ comments inside long tuple shapes
    match = _INSTRUCTION.search(line)
    if not match or "-done" in line.split("=")[1].split("(")[0]:
      continue
    op, size = match["op"], shape_bytes(match["shape"])
    factor = {"all-reduce": 2 * (world - 1) / world}.get(op, (world - 1) / world)
    found.append({"op": op, "bytes": size, "sent_per_rank": factor * size})
  return found


def inter_host_bytes(hlo_text: str, mesh) -> tuple[float, float]:
  """(bytes one rank sends to other hosts, bytes it sends inside its host) per call, from the collectives of
  optimized HLO over a ("hosts", "local") `mesh`: a collective whose replica groups stay inside a host is host-local;
  one whose groups span hosts (one rank of each host, as the two-level exchange's) sends all of it across hosts."""
  host_of = {int(device.id): host for host, row in enumerate(mesh.devices) for device in row}
  inter = intra = 0.0
  for line in hlo_text.splitlines():
    groups = re.search(r"replica_groups=\{\{([0-9,]*)\}", line)
    if not groups:
      continue
    group = [int(i) for i in groups.group(1).split(",")]
    for op in collectives_of(line, len(group)):
      if len({host_of[i] for i in group}) == 1:
        intra += op["sent_per_rank"]
      else:
        inter += op["sent_per_rank"]
  return inter, intra


def measure_two_level(params, hosts: int, local: int) -> dict:
  """Bytes per rank of one two-level compressed exchange (SPEC.md section 3b) over `hosts` x `local` devices."""
  mesh = jax.make_mesh((hosts, local), ("hosts", "local"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  grid = optax_lamb16.comm.TwoLevel(fast="local", slow="hosts")
  axes = grid.axis_names
  state = optax_lamb16.sharded_init(optax_lamb16.compressed_mean(grid), params, mesh, axes)
  specs = optax_lamb16.state_partition_specs(state, axes)
  grads = jax.tree.map(lambda p: jnp.zeros((hosts * local, *p.shape), p.dtype), params)

  def step(g, s):
    return optax_lamb16.compressed_allreduce(jax.tree.map(lambda x: x[0], g), s, grid)

  f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(axes), specs), out_specs=(P(), specs)))
  inter, intra = inter_host_bytes(f.lower(grads, state).compile().as_text(), mesh)
  world, num_params = hosts * local, sum(x.size for x in jax.tree.leaves(params))
  float32_all_reduce = 2 * (world - 1) / world * 4 * num_params
  return {
    "hosts": hosts,
    "local": local,
    "num_params": num_params,
    "inter_host_bytes_per_rank": inter,
    "intra_host_bytes_per_rank": intra,
    "inter_host_fraction_of_float32": inter / float32_all_reduce,
  }


def synthetic_params(big_leaves=4, big_shape=(1000, 1000), small_leaves=64, small_size=1024):
  params = {f"big_{i}": jnp.zeros(big_shape, jnp.float32) for i in range(big_leaves)}
  params.update({f"small_{i}": jnp.zeros((small_size,), jnp.float32) for i in range(small_leaves)})
  return params


def _dense(fan_in: int, fan_out: int) -> dict:
  return {
    "kernel": jax.ShapeDtypeStruct((fan_in, fan_out), jnp.float32),
    "bias": jax.ShapeDtypeStruct((fan_out,), jnp.float32),
  }


def _layer_norm(width: int) -> dict:
  return {"scale": jax.ShapeDtypeStruct((width,), jnp.float32), "bias": jax.ShapeDtypeStruct((width,), jnp.float32)}


def bert_large_params() -> dict:
  """BERT-Large's parameters as float32 shapes (Devlin et al. 2019: 24 layers, hidden 1024, MLP 4096, a 30,522-token
  vocabulary, 512 positions, 2 segment types; the pooler and the pre-training heads, the masked-LM decoder tied to
  the word embedding): 336,226,108 parameters in 398 leaves."""
  width, mlp, vocabulary = 1024, 4096, 30522
  params = {
    "word_embedding": jax.ShapeDtypeStruct((vocabulary, width), jnp.float32),
    "position_embedding": jax.ShapeDtypeStruct((512, width), jnp.float32),
    "segment_embedding": jax.ShapeDtypeStruct((2, width), jnp.float32),
    "embedding_norm": _layer_norm(width),
    "pooler": _dense(width, width),
    "mlm_transform": _dense(width, width),
    "mlm_norm": _layer_norm(width),
    "mlm_bias": jax.ShapeDtypeStruct((vocabulary,), jnp.float32),
    "next_sentence": _dense(width, 2),
  }
  for layer in range(24):
    params[f"layer_{layer}"] = {
      "query": _dense(width, width),
      "key": _dense(width, width),
      "value": _dense(width, width),
      "attention_out": _dense(width, width),
      "attention_norm": _layer_norm(width),
      "mlp_in": _dense(width, mlp),
      "mlp_out": _dense(mlp, width),
      "mlp_norm": _layer_norm(width),
    }
  return params


def gpt2_xl_params() -> dict:
  """GPT-2 XL's parameters as float32 shapes (Radford et al. 2019: 48 layers, width 1600, a 50,257-token vocabulary,
  1024 positions, the output head tied to the token embedding): 1,557,611,200 parameters in 580 leaves."""
  width = 1600
  params = {
    "token_embedding": jax.ShapeDtypeStruct((50257, width), jnp.float32),
    "position_embedding": jax.ShapeDtypeStruct((1024, width), jnp.float32),
    "final_norm": _layer_norm(width),
  }
  for layer in range(48):
    params[f"layer_{layer}"] = {
      "norm_1": _layer_norm(width),
      "qkv": _dense(width, 3 * width),
      "attention_out": _dense(width, width),
      "norm_2": _layer_norm(width),
      "mlp_in": _dense(width, 4 * width),
      "mlp_out": _dense(4 * width, width),
    }
  return params


def mnist_params():
  from flax import nnx

  from experiments import mnist_common

  return nnx.state(mnist_common.ReferenceConvNet(nnx.Rngs(0)), nnx.Param)


def exchanges():
  def pmean_f32(grads, state):
    return jax.tree.map(lambda g: jax.lax.pmean(g, "data"), grads), state

  def pmean_bf16(grads, state):
    return jax.tree.map(lambda g: jax.lax.pmean(g.astype(jnp.bfloat16), "data").astype(g.dtype), grads), state

  def compressed(grads, state):
    return optax_lamb16.compressed_allreduce(grads, state, "data")

  return {"float32 pmean": pmean_f32, "bfloat16 pmean": pmean_bf16, "compressed (1-bit)": compressed}


def abstract_exchange_inputs(params, mesh, world: int):
  """``(grads, state, state_specs)`` for one exchange of `params` (concrete or abstract) among `world` ranks, as
  shapes with their shardings: each rank's gradients (a leading axis of `world` rows, one per rank) and the
  compressed exchange's state, laid out as `sharded_init` lays it out. Nothing is allocated."""
  abstract_params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), p.dtype), params)
  state = jax.eval_shape(
    lambda p: optax_lamb16.sharded_init(optax_lamb16.compressed_mean("data"), p, mesh, "data"), abstract_params
  )
  state_specs = optax_lamb16.state_partition_specs(state, "data")
  state = jax.tree.map(
    lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)), state, state_specs
  )
  grads = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct((world, *p.shape), p.dtype, sharding=NamedSharding(mesh, P("data"))), abstract_params
  )
  return grads, state, state_specs


def measure(params, world: int) -> list[dict]:
  """One row per exchange of `exchanges()`: the collectives of its compiled HLO among `world` ranks (the first
  `world` devices) and the bytes one rank sends for them, as requested (HLO before XLA's passes) and as compiled."""
  mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:world])
  num_params = sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(params))
  grads, state, state_specs = abstract_exchange_inputs(params, mesh, world)
  rows = []
  for name, exchange in exchanges().items():

    def step(g, s, exchange=exchange):
      out, s = exchange(jax.tree.map(lambda x: x[0], g), s)
      return out, s

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), state_specs), out_specs=(P(), state_specs)))
    lowered = f.lower(grads, state)
    # As the program asks (before XLA's passes) and as this backend compiles it (XLA:CPU widens bf16 all-reduces).
    requested = collectives_of(lowered.as_text(dialect="hlo"), world)
    compiled = collectives_of(lowered.compile().as_text(), world)
    counts = {}
    for op in compiled:
      counts[op["op"]] = counts.get(op["op"], 0) + 1
    rows.append(
      {
        "exchange": name,
        "num_params": num_params,
        "world": world,
        "collectives": counts,
        "bytes_requested_per_rank": sum(op["sent_per_rank"] for op in requested),
        "bytes_sent_per_rank": sum(op["sent_per_rank"] for op in compiled),
      }
    )
  for key in ("bytes_requested_per_rank", "bytes_sent_per_rank"):
    for row in rows:
      row[key.replace("bytes", "fraction").replace("_per_rank", "_of_float32")] = row[key] / rows[0][key]
  return rows


def markdown(rows: list[dict]) -> str:
  lines = [
    "| model | params | P | exchange | collectives (compiled) | bytes / rank / step, requested | vs float32 "
    "| bytes / rank / step, compiled here | vs float32 |",
    "|---|---:|---:|---|---|---:|---:|---:|---:|",
  ]
  for r in rows:
    ops = ", ".join(f"{n} {op}" for op, n in sorted(r["collectives"].items()))
    requested, compiled = r["fraction_requested_of_float32"], r["fraction_sent_of_float32"]
    lines.append(
      f"| {r['model']} | {r['num_params']:,} | {r['world']} | {r['exchange']} | {ops} | "
      f"{r['bytes_requested_per_rank']:,.0f} | 1/{1 / requested:.1f} | "
      f"{r['bytes_sent_per_rank']:,.0f} | 1/{1 / compiled:.1f} |"
    )
  return "\n".join(lines)


# --scaling's parameter trees: name -> (label, function returning the tree).
MODELS = {
  "4M": ("4M synthetic", synthetic_params),
  "bert-large": ("BERT-Large", bert_large_params),
  "gpt2-xl": ("GPT-2 XL", gpt2_xl_params),
  "mnist": ("MNIST convnet", mnist_params),
}


def main_scaling():
  """Bytes per rank of each exchange at every world size of ``--scaling``, for each tree of ``--models``."""
  rows, models = [], {}
  for key in ARGS.models.split(","):
    label, make = MODELS[key]
    params = make()
    leaves = jax.tree.leaves(params)
    models[label] = {
      "num_params": sum(math.prod(jnp.shape(x)) for x in leaves),
      "leaves": len(leaves),
      "description": " ".join((make.__doc__ or label).split()),
    }
    for world in ARGS.worlds:
      rows += [dict(row, model=label) for row in measure(params, world)]
      print(f"{label}: {world} ranks done", flush=True)
  print(f"jax {jax.__version__}, {ARGS.devices} {jax.devices()[0].platform.upper()} devices\n")
  print(markdown(rows))
  out = pathlib.Path(ARGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  command = shlex.join(["python", "benchmarks/comm_volume.py", *sys.argv[1:]])
  out.write_text(
    json.dumps(
      {
        "jax": jax.__version__,
        "devices": ARGS.devices,
        "platform": jax.devices()[0].platform,
        "command": command.strip(),
        "models": models,
        "rows": rows,
      },
      indent=1,
    )
  )
  print(f"\nwrote {out}")


def main():
  if ARGS.scaling:
    main_scaling()
    return
  world = ARGS.devices
  rows = []
  for model, params in (("MNIST convnet", mnist_params()), ("4M synthetic", synthetic_params())):
    rows += [dict(row, model=model) for row in measure(params, world)]
  grids = [
    measure_two_level(synthetic_params(), world // local, local)
    for local in (2, 4)
    if world % local == 0 and world // local > 1
  ]
  print(f"jax {jax.__version__}, {world} {jax.devices()[0].platform.upper()} devices\n")
  print(markdown(rows))
  print(
    "\n| two-level grid (4M synthetic) | bytes / rank to other hosts | vs float32 all-reduce over all ranks "
    "| 1 / (32 L) | bytes / rank inside the host |\n|---|---:|---:|---:|---:|"
  )
  for g in grids:
    print(
      f"| {g['hosts']} hosts x {g['local']} | {g['inter_host_bytes_per_rank']:,.0f} | "
      f"1/{1 / g['inter_host_fraction_of_float32']:.0f} | 1/{32 * g['local']} | "
      f"{g['intra_host_bytes_per_rank']:,.0f} |"
    )
  out = pathlib.Path(ARGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(
      {
        "jax": jax.__version__,
        "devices": world,
        "platform": jax.devices()[0].platform,
        "rows": rows,
        "two_level": grids,
      },
      indent=1,
    )
  )
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
