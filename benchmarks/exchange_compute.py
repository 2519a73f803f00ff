"""Compute cost of the 1-bit compressed exchange and of the 1-bit optimizers' steps, on one device.

Each configuration runs as ONE rank of a P-rank job whose collectives are simulated locally with the same shapes
(`optax_lamb16.comm.SimulatedRanks`: rank 0 of P ranks that hold the same values),
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
import optax

import optax_lamb16
from update_bench import SIZES, make_tree


def _next_t(state):
  return int(state.count) + 1  # the step counter the next update runs with (SPEC.md section 2)


def configurations(comm):
  """name -> (transform, updates before timing, check): the updates bring the state into the phase the name says,
  and `check(state)` confirms it (None: one phase only)."""
  return {
      "optax.adam": (optax.adam(1e-3), 0, None),
      "compressed_mean": (optax_lamb16.compressed_mean(comm), 0, None),
      "uncompressed_mean + optax.adam": (optax.chain(optax_lamb16.uncompressed_mean(comm), optax.adam(1e-3)), 0,
                                         None),
      "onebit_adam, warm-up": (optax_lamb16.onebit_adam(1e-3, comm=comm, freeze_step=10), 0,
                               lambda s: _next_t(s[0]) <= 10),
      "onebit_adam, compression": (optax_lamb16.onebit_adam(1e-3, comm=comm, freeze_step=2), 2,
                                   lambda s: _next_t(s[0]) > 2),
      # Not frozen, and t = 3 is not a variance step (interval 2 after one doubling with scaler 1).
      "zero_one_adam, compressed step": (optax_lamb16.zero_one_adam(
          1e-3, comm=comm, var_freeze_step=100, var_update_scaler=1), 1,
          lambda s: not bool(s.frozen) and _next_t(s) % int(s.var_interval) != 0),
      # After the freeze the sync interval doubles every local step (scaler 1) up to 16: t = 7 is a local step.
      "zero_one_adam, local step": (optax_lamb16.zero_one_adam(
          1e-3, comm=comm, var_freeze_step=2, local_step_scaler=1, local_step_clipper=16), 5,
          lambda s: bool(s.frozen) and _next_t(s) % int(s.local_step_interval) != 0),
      "onebit_lamb, compression": (optax_lamb16.onebit_lamb(1e-3, comm=comm, freeze_step=2), 2,
                                   lambda s: _next_t(s) > 2),
      "compressed_mean + lamb16": (optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(1e-3)), 0,
                                   None),
  }


class Runner:
  def __init__(self, name, tx, warm_steps, check, params, grads):
    self.name, self.params, self.grads = name, params, grads
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(warm_steps):
      _, state = update(grads, state, params)
    self.state = jax.block_until_ready(state)
    if check is not None and not check(state):
      raise RuntimeError(f"{name}: the state is not in the phase this row times; fix `configurations`.")
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
  runners = [Runner(name, tx, warm, check, params, grads)
             for name, (tx, warm, check) in configurations(optax_lamb16.comm.SimulatedRanks(args.ranks)).items()]
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
