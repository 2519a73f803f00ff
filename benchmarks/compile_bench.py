"""Compile time of the jitted update: optax.lamb against optax_lamb16's float8 optimizers, by number of leaves.

A transformer-like pytree of L layers, 12 leaves each (LayerNorm scales and biases, attention and MLP matrices and
their biases; width 256), for 24, 96 and 384 leaves. For each optimizer the time from `jax.jit(update).trace` to a
compiled executable (tracing, lowering and XLA's compilation, as a training script pays it once per process), the
best of `--repeats` fresh compilations (JAX's caches cleared between them), and its ratio to optax.lamb's in the same
run. The optimizers are interleaved, so that a slow spell of a shared machine hits them all alike.

  python -m benchmarks.compile_bench [--leaves 24,96,384] [--repeats 2] [--out docs/results/compile_time.json]

Prints a markdown table and writes JSON (with the device named).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import optax_lamb16
from benchmarks import update_bench  # the results' common fields

OPTIMIZERS = {
  "optax.lamb": lambda: optax.lamb(1e-3, weight_decay=0.01),
  "optax.adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
  "optax_lamb16.adamw16": lambda: optax_lamb16.adamw16(1e-3, weight_decay=0.01),
  "optax_lamb16.lamb16": lambda: optax_lamb16.lamb16(1e-3, weight_decay=0.01),
  "optax_lamb16.lamb16_blockwise": lambda: optax_lamb16.lamb16_blockwise(1e-3, weight_decay=0.01),
  "lamb16_blockwise, stochastic v": lambda: optax_lamb16.lamb16_blockwise(
    1e-3, weight_decay=0.01, stochastic_rounding=True
  ),
}
# The default run, docs/results/compile_time.json; AdamW16's against optax.adamw is docs/results/adamw16_compile.json.
DEFAULT = ("optax.lamb", "optax_lamb16.lamb16", "optax_lamb16.lamb16_blockwise", "lamb16_blockwise, stochastic v")
WIDTH = 256
LAYER = {  # name: shape, as width multiples: 12 leaves per layer
  "ln1_scale": (1,),
  "ln1_bias": (1,),
  "qkv": (1, 3),
  "qkv_bias": (3,),
  "out": (1, 1),
  "out_bias": (1,),
  "ln2_scale": (1,),
  "ln2_bias": (1,),
  "mlp_in": (1, 4),
  "mlp_in_bias": (4,),
  "mlp_out": (4, 1),
  "mlp_out_bias": (1,),
}


def make_tree(leaves: int) -> dict:
  """Abstract params (shapes only: compilation needs no values) of ``leaves // 12`` layers."""
  layers = leaves // len(LAYER)
  return {
    f"layer_{i}": {
      name: jax.ShapeDtypeStruct(tuple(WIDTH * d for d in dims), jnp.float32) for name, dims in LAYER.items()
    }
    for i in range(layers)
  }


def compile_seconds(make, params) -> float:
  """Seconds from tracing the jitted update to its executable, after clearing JAX's caches."""
  jax.clear_caches()
  tx = make()
  state = jax.eval_shape(tx.init, params)
  start = time.perf_counter()
  jax.jit(tx.update).trace(params, state, params).lower().compile()
  return time.perf_counter() - start


def markdown(rows) -> str:
  lines = ["| leaves | optimizer | compile s | vs optax.lamb |", "|---:|---|---:|---:|"]
  lines += [f"| {r['leaves']} | {r['optimizer']} | {r['compile_seconds']:.2f} | {r['vs_lamb']:.2f}x |" for r in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--leaves", default="24,96,384")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument(
    "--optimizers", default=",".join(DEFAULT), help="comma-separated names of OPTIMIZERS, optax.lamb among them"
  )
  parser.add_argument("--out", default="docs/results/compile_time.json")
  args = parser.parse_args()
  names = args.optimizers.split(",")
  if "optax.lamb" not in names or any(name not in OPTIMIZERS for name in names):
    parser.error(f"--optimizers must name optax.lamb and only optimizers of {list(OPTIMIZERS)}")
  rows = []
  for leaves in (int(x) for x in args.leaves.split(",")):
    params = make_tree(leaves)
    best = dict.fromkeys(names, float("inf"))
    for _ in range(args.repeats):
      for name in names:
        best[name] = min(best[name], compile_seconds(OPTIMIZERS[name], params))
    for name, seconds in best.items():
      row = {"leaves": leaves, "optimizer": name, "compile_seconds": seconds, "vs_lamb": seconds / best["optax.lamb"]}
      if "optax.adamw" in best:
        row["vs_adamw"] = seconds / best["optax.adamw"]
      rows.append(row)
    print(markdown([r for r in rows if r["leaves"] == leaves]), flush=True)
  print(f"\njax {jax.__version__}, {update_bench.machine_name()}\n")
  print(markdown(rows))
  update_bench.write_results(args.out, rows, width=WIDTH, leaves_per_layer=len(LAYER), repeats=args.repeats)


if __name__ == "__main__":
  main()
