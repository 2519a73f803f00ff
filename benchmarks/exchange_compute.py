"""Compute cost of the 1-bit compressed exchange and of the 1-bit optimizers' steps, on one device.

Each configuration runs as ONE rank of a P-rank job whose collectives are simulated locally with the same shapes
(`SimulatedRanks`: the all-to-all returns this rank's own chunks, the all-gather repeats this rank's value P times),
so the time is what the exchange computes (packing, error feedback, unpacking, scales, flatten and unflatten), with
no network. `optax.adam`'s update on the same tree is timed alongside, in interleaved rounds, as the yardstick.

  python benchmarks/exchange_compute.py [--size 4M] [--ranks 8] [--repeats 20] [--out docs/results/exchange_compute.json]

Prints a markdown table and writes JSON (with the device named). Each step is timed from the same input state
(not donated), so every call runs the phase named in its row.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import optax_lamb16
from update_bench import SIZES, make_tree


class SimulatedRanks:
  """A `Communicator` of `size` ranks on one device: collectives keep their shapes, nothing is sent."""

  def __init__(self, size: int):
    self.size = size

  def mean(self, x):
    return x

  def all_to_all(self, x):
    return x

  def all_gather(self, x):
    return jnp.broadcast_to(x, (self.size, *x.shape))


def configurations(comm):
  """name -> (transform, updates before timing): the updates bring the state into the phase the name says."""
  return {
      "optax.adam": (optax.adam(1e-3), 0),
      "compressed_mean": (optax_lamb16.compressed_mean(comm), 0),
      "uncompressed_mean + optax.adam": (optax.chain(optax_lamb16.uncompressed_mean(comm), optax.adam(1e-3)), 0),
      "onebit_adam, warm-up": (optax_lamb16.onebit_adam(1e-3, comm=comm, freeze_step=10), 0),
      "onebit_adam, compression": (optax_lamb16.onebit_adam(1e-3, comm=comm, freeze_step=2), 2),
      "zero_one_adam, compressed step": (optax_lamb16.zero_one_adam(1e-3, comm=comm, var_freeze_step=100), 1),
      # After the freeze, interval 16 is reached in 4 local steps (scaler 1); t = 7 is then a local step.
      "zero_one_adam, local step": (optax_lamb16.zero_one_adam(
          1e-3, comm=comm, var_freeze_step=2, local_step_scaler=1, local_step_clipper=16), 5),
      "onebit_lamb, compression": (optax_lamb16.onebit_lamb(1e-3, comm=comm, freeze_step=2), 2),
      "compressed_mean + lamb16": (optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(1e-3)), 0),
  }


class Runner:
  def __init__(self, name, tx, warm_steps, params, grads):
    self.name, self.params, self.grads = name, params, grads
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(warm_steps):
      _, state = update(grads, state, params)
    self.state = jax.block_until_ready(state)
    self.update = update
    self.times = []
    self.run(3, record=False)

  def run(self, calls, record=True):
    for _ in range(calls):
      start = time.perf_counter()
      jax.block_until_ready(self.update(self.grads, self.state, self.params))
      if record:
        self.times.append(time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="4M", choices=sorted(SIZES))
  parser.add_argument("--ranks", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", default="docs/results/exchange_compute.json")
  args = parser.parse_args()
  params = make_tree(SIZES[args.size], jax.random.key(0))
  grads = make_tree(SIZES[args.size], jax.random.key(1), scale=0.01)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  runners = [Runner(name, tx, warm, params, grads)
             for name, (tx, warm) in configurations(SimulatedRanks(args.ranks)).items()]
  for _ in range(args.rounds):
    for runner in runners:
      runner.run(max(1, args.repeats // args.rounds))
  adam = statistics.median(runners[0].times)
  rows = [{"step": r.name, "median_seconds": statistics.median(r.times), "min_seconds": min(r.times),
           "vs_adam": statistics.median(r.times) / adam} for r in runners]
  device = jax.devices()[0]
  machine = f"{device.platform.upper()} {device.device_kind}, {platform.processor() or platform.machine()}"
  print(f"jax {jax.__version__}, {machine}; {num_params / 1e6:.1f}M params, {args.ranks} simulated ranks\n")
  print("| step (one rank, compute only) | median ms | vs optax.adam |\n|---|---:|---:|")
  for r in rows:
    print(f"| {r['step']} | {r['median_seconds'] * 1e3:.2f} | {r['vs_adam']:.2f}x |")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"jax": jax.__version__, "device": machine, "num_params": num_params,
                             "ranks": args.ranks, "rows": rows}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
