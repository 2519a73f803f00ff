"""Bytes each rank sends per step, read from the compiled HLO of a `shard_map`ped gradient exchange.

Compares, for the MNIST convnet and a ~4M-parameter pytree on P host devices: the float32 `pmean` of the gradients,
the bfloat16 `pmean`, and `optax_lamb16.compressed_allreduce`. Each collective in the optimized HLO is costed with
the standard bandwidth-optimal algorithms: all-reduce of S bytes sends ``2 (P-1)/P S`` per rank, all-gather and
all-to-all with S bytes of output send ``(P-1)/P S``, reduce-scatter with S bytes of input ``(P-1)/P S``.

  python benchmarks/comm_volume.py [--devices 8] [--out docs/results/comm_volume.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--out", default="docs/results/comm_volume.json")
  return parser.parse_args()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # the device count must be fixed before jax is imported
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ARGS.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import optax_lamb16  # noqa: E402

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "u8": 1, "s8": 1, "pred": 1, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
               "f8e4m3fn": 1, "f8e5m2": 1}
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
  return {"hosts": hosts, "local": local, "num_params": num_params, "inter_host_bytes_per_rank": inter,
          "intra_host_bytes_per_rank": intra, "inter_host_fraction_of_float32": inter / float32_all_reduce}


def synthetic_params(big_leaves=4, big_shape=(1000, 1000), small_leaves=64, small_size=1024):
  params = {f"big_{i}": jnp.zeros(big_shape, jnp.float32) for i in range(big_leaves)}
  params.update({f"small_{i}": jnp.zeros((small_size,), jnp.float32) for i in range(small_leaves)})
  return params


def mnist_params():
  from flax import nnx

  import mnist_common
  return nnx.state(mnist_common.ReferenceConvNet(nnx.Rngs(0)), nnx.Param)


def exchanges():
  def pmean_f32(grads, state):
    return jax.tree.map(lambda g: jax.lax.pmean(g, "data"), grads), state

  def pmean_bf16(grads, state):
    return jax.tree.map(lambda g: jax.lax.pmean(g.astype(jnp.bfloat16), "data").astype(g.dtype), grads), state

  def compressed(grads, state):
    return optax_lamb16.compressed_allreduce(grads, state, "data")

  return {"float32 pmean": pmean_f32, "bfloat16 pmean": pmean_bf16, "compressed (1-bit)": compressed}


def measure(params, world: int) -> list[dict]:
  mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  state = optax_lamb16.sharded_init(optax_lamb16.compressed_mean("data"), params, mesh, "data")
  state_specs = optax_lamb16.state_partition_specs(state, "data")
  grads = jax.tree.map(lambda p: jnp.zeros((world, *p.shape), p.dtype), params)  # one row per rank
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
    rows.append({"exchange": name, "num_params": num_params, "world": world, "collectives": counts,
                 "bytes_requested_per_rank": sum(op["sent_per_rank"] for op in requested),
                 "bytes_sent_per_rank": sum(op["sent_per_rank"] for op in compiled)})
  for key in ("bytes_requested_per_rank", "bytes_sent_per_rank"):
    for row in rows:
      row[key.replace("bytes", "fraction").replace("_per_rank", "_of_float32")] = row[key] / rows[0][key]
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| model | params | P | exchange | collectives (compiled) | bytes / rank / step, requested | vs float32 "
           "| bytes / rank / step, compiled here | vs float32 |", "|---|---:|---:|---|---|---:|---:|---:|---:|"]
  for r in rows:
    ops = ", ".join(f"{n} {op}" for op, n in sorted(r["collectives"].items()))
    requested, compiled = r["fraction_requested_of_float32"], r["fraction_sent_of_float32"]
    lines.append(f"| {r['model']} | {r['num_params']:,} | {r['world']} | {r['exchange']} | {ops} | "
                 f"{r['bytes_requested_per_rank']:,.0f} | 1/{1 / requested:.1f} | "
                 f"{r['bytes_sent_per_rank']:,.0f} | 1/{1 / compiled:.1f} |")
  return "\n".join(lines)


def main():
  world = ARGS.devices
  rows = []
  for model, params in (("MNIST convnet", mnist_params()), ("4M synthetic", synthetic_params())):
    rows += [dict(row, model=model) for row in measure(params, world)]
  grids = [measure_two_level(synthetic_params(), world // local, local) for local in (2, 4) if world % local == 0
           and world // local > 1]
  print(f"jax {jax.__version__}, {world} {jax.devices()[0].platform.upper()} devices\n")
  print(markdown(rows))
  print("\n| two-level grid (4M synthetic) | bytes / rank to other hosts | vs float32 all-reduce over all ranks "
        "| 1 / (32 L) | bytes / rank inside the host |\n|---|---:|---:|---:|---:|")
  for g in grids:
    print(f"| {g['hosts']} hosts x {g['local']} | {g['inter_host_bytes_per_rank']:,.0f} | "
          f"1/{1 / g['inter_host_fraction_of_float32']:.0f} | 1/{32 * g['local']} | "
          f"{g['intra_host_bytes_per_rank']:,.0f} |")
  out = pathlib.Path(ARGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"jax": jax.__version__, "devices": world, "platform": jax.devices()[0].platform,
                             "rows": rows, "two_level": grids}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
