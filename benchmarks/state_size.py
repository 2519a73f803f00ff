"""Optimizer state bytes per parameter: optax.adam, optax.lamb, optax_lamb16.lamb16 and lamb16_blockwise.

Measures the state that `init` returns (via `jax.eval_shape`, so nothing is allocated) for the MNIST reference
convnet and for synthetic pytrees of about 4M and 50M parameters (a few big leaves plus many small ones).

  python -m benchmarks.state_size [--out docs/results/state_size.json]

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import optax

import optax_lamb16

OPTIMIZERS = {
  "optax.adam": lambda: optax.adam(1e-3),
  "optax.lamb": lambda: optax.lamb(1e-3),
  "optax_lamb16.lamb16": lambda: optax_lamb16.lamb16(1e-3),
  "optax_lamb16.lamb16_blockwise": lambda: optax_lamb16.lamb16_blockwise(1e-3),
}


def synthetic_pytree(big_leaves: int, big_shape: tuple[int, int], small_leaves: int, small_size: int):
  """Abstract params: `big_leaves` matrices plus `small_leaves` vectors (biases, norms), float32."""
  tree = {f"big_{i}": jax.ShapeDtypeStruct(big_shape, jnp.float32) for i in range(big_leaves)}
  tree.update({f"small_{i}": jax.ShapeDtypeStruct((small_size,), jnp.float32) for i in range(small_leaves)})
  return tree


def mnist_pytree():
  from flax import nnx

  from experiments import mnist_common

  model = nnx.eval_shape(lambda: mnist_common.ReferenceConvNet(nnx.Rngs(0)))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(model, nnx.Param))


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure() -> list[dict]:
  pytrees = {
    "MNIST convnet": mnist_pytree(),
    "4M synthetic": synthetic_pytree(4, (1000, 1000), 64, 1024),
    "50M synthetic": synthetic_pytree(12, (2048, 2048), 256, 1024),
  }
  rows = []
  for tree_name, params in pytrees.items():
    num_params = sum(x.size for x in jax.tree.leaves(params))
    num_leaves = len(jax.tree.leaves(params))
    for opt_name, make in OPTIMIZERS.items():
      state_bytes = tree_bytes(jax.eval_shape(make().init, params))
      rows.append(
        {
          "pytree": tree_name,
          "num_params": num_params,
          "num_leaves": num_leaves,
          "optimizer": opt_name,
          "state_bytes": state_bytes,
          "bytes_per_param": state_bytes / num_params,
          "bytes_over_2_per_param_per_leaf": (state_bytes - 2 * num_params) / num_leaves,
        }
      )
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| pytree | params | leaves | optimizer | state bytes | bytes / param |", "|---|---:|---:|---|---:|---:|"]
  for r in rows:
    lines.append(
      f"| {r['pytree']} | {r['num_params']:,} | {r['num_leaves']} | {r['optimizer']} | "
      f"{r['state_bytes']:,} | {r['bytes_per_param']:.4f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="docs/results/state_size.json")
  args = parser.parse_args()
  rows = measure()
  print(markdown(rows))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"jax": jax.__version__, "optax": optax.__version__, "rows": rows}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
