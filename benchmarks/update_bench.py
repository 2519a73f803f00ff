"""Update cost of optax.adam, optax.lamb, optax_lamb16.lamb16 and lamb16_blockwise: state bytes, compiled peak
footprint, time.

For pytrees of about 4M and 50M parameters (a few big leaves plus many small ones), in ONE process so that the
ratios are fair:
- state bytes per parameter (what `init` returns);
- peak footprint of the jitted update = state bytes + XLA's temporary buffers (`compiled.memory_analysis()`), with
  the state donated (updated in place), as a training step would;
- median wall time of the update over repeated calls after warm-up, the optimizers interleaved in rounds;
- memory traffic: the least an update must move (one read of grads, state and params, one write of updates and
  state), the bandwidth that gives at the median time and, on a GPU whose peak is known (`PEAK_GBPS`, or
  --peak-gbps), its fraction of peak; and XLA's own estimate of the bytes the compiled update accesses.

  python -m benchmarks.update_bench [--sizes 4M,50M] [--repeats 20] [--peak-gbps X]
                                    [--out docs/results/update_bench.json]

How the cost grows with the number of parameters (`--scaling`): the same measurements on trees of 1, 4, 16, 48 and
96 leaves of 1024x1024 plus 64 leaves of 1024 (about 1M to 100M parameters, `SCALING`), for optax.adam, optax.lamb,
lamb16 and lamb16_blockwise (`--optimizers` picks others), each size's ratios against optax.lamb in the same run:

  python -m benchmarks.update_bench --scaling 1M,4M,16M,50M,100M [--repeats 20] [--note TEXT]
                                    [--out docs/results/update_scaling.json]

Prints a markdown table and writes JSON (with the device named, and the command).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import re
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optax_lamb16

OPTIMIZERS = {
  "optax.adam": lambda: optax.adam(1e-3),
  "optax.lamb": lambda: optax.lamb(1e-3, weight_decay=0.01),
  "optax.adamw": lambda: optax.adamw(1e-3, weight_decay=0.01),
  "optax_lamb16.adamw16": lambda: optax_lamb16.adamw16(1e-3, weight_decay=0.01),
  "optax_lamb16.lamb16": lambda: optax_lamb16.lamb16(1e-3, weight_decay=0.01),
  "optax_lamb16.lamb16_blockwise": lambda: optax_lamb16.lamb16_blockwise(1e-3, weight_decay=0.01),
  "lamb16_blockwise, stochastic v": lambda: optax_lamb16.lamb16_blockwise(
    1e-3, weight_decay=0.01, stochastic_rounding=True
  ),
  # The same maths as a chain of its building blocks: the straightforward, unfused version.
  "lamb16 as a chain": lambda: optax.chain(
    optax_lamb16.scale_by_lamb16(),
    optax.add_decayed_weights(0.01),
    optax_lamb16.scale_by_lamb16_trust_ratio(1e-3),
    optax.scale_by_learning_rate(1e-3),
  ),
}
# The default run (docs/results/update_bench.json). AdamW16 against optax.adamw, in one run:
#   python -m benchmarks.update_bench --optimizers optax.lamb,optax.adamw,optax_lamb16.adamw16 \
#     --out docs/results/adamw16_update.json
DEFAULT_OPTIMIZERS = (
  "optax.adam",
  "optax.lamb",
  "optax_lamb16.lamb16",
  "optax_lamb16.lamb16_blockwise",
  "lamb16_blockwise, stochastic v",
  "lamb16 as a chain",
)
SIZES = {  # name: (big leaves, big shape, small leaves, small size)
  "4M": (4, (1000, 1000), 64, 1024),
  "50M": (12, (2048, 2048), 256, 1024),
}
# --scaling's trees: the same leaf shapes at every size, only more big leaves.
SCALING = {
  name: (big, (1024, 1024), 64, 1024) for name, big in (("1M", 1), ("4M", 4), ("16M", 16), ("50M", 48), ("100M", 96))
}
SCALING_OPTIMIZERS = ("optax.adam", "optax.lamb", "optax_lamb16.lamb16", "optax_lamb16.lamb16_blockwise")


def make_tree(spec, key, scale=1.0):
  big_leaves, big_shape, small_leaves, small_size = spec
  keys = iter(jax.random.split(key, big_leaves + small_leaves))
  tree = {f"big_{i}": scale * jax.random.normal(next(keys), big_shape) for i in range(big_leaves)}
  tree.update({f"small_{i}": scale * jax.random.normal(next(keys), (small_size,)) for i in range(small_leaves)})
  return tree


# Peak memory bandwidth (GB/s) of the GPUs the library targets, by device kind (vendors' data sheets).
PEAK_GBPS = {
  "H200": 4800.0,
  "H100 SXM": 3350.0,
  "H100 PCIe": 2000.0,
  "H100": 3350.0,
  "A100-SXM4-80GB": 2039.0,
  "A100": 1555.0,
}


def peak_gbps(device_kind: str) -> float | None:
  return next((gbps for kind, gbps in PEAK_GBPS.items() if kind in device_kind), None)


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


class Runner:
  """One optimizer's compiled update (state donated, as in a training step) and the times of its calls."""

  def __init__(self, name: str, tx, params, grads):
    self.name, self.params, self.grads = name, params, grads
    self.state = tx.init(params)
    self.state_bytes = tree_bytes(self.state)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=(1,))
    self.compiled = update.lower(grads, self.state, params).compile()
    self.temp_bytes = int(getattr(self.compiled.memory_analysis(), "temp_size_in_bytes", 0))
    # The least traffic: every input read once (grads, params, state), every output written once (updates, state).
    reads, writes = tree_bytes((grads, params)) + self.state_bytes, tree_bytes(grads) + self.state_bytes
    self.min_traffic_bytes = reads + writes
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.xla_bytes_accessed = float((cost or {}).get("bytes accessed", float("nan")))
    self.times = []
    self.run(3, record=False)  # warm-up

  def run(self, calls: int, record: bool = True) -> None:
    for _ in range(calls):
      start = time.perf_counter()
      updates, self.state = self.compiled(self.grads, self.state, self.params)
      jax.block_until_ready((updates, self.state))
      if record:
        self.times.append(time.perf_counter() - start)

  def row(self) -> dict:
    return {
      "optimizer": self.name,
      "state_bytes": self.state_bytes,
      "temp_bytes": self.temp_bytes,
      "peak_bytes": self.state_bytes + self.temp_bytes,
      "median_seconds": statistics.median(self.times),
      "min_seconds": min(self.times),
      "min_traffic_bytes": self.min_traffic_bytes,
      "xla_bytes_accessed": self.xla_bytes_accessed,
      "achieved_gbps": self.min_traffic_bytes / statistics.median(self.times) / 1e9,
    }


def measure_all(params, grads, repeats: int, rounds: int = 5, names=tuple(OPTIMIZERS)) -> list[dict]:
  """Times the optimizers `names` in interleaved rounds, so that a slow spell of a shared machine hits them all
  alike."""
  runners = [Runner(name, OPTIMIZERS[name](), params, grads) for name in names]
  for _ in range(rounds):
    for runner in runners:
      runner.run(max(1, repeats // rounds))
  return [runner.row() for runner in runners]


def _ratio(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}x"


def markdown(rows) -> str:
  lines = [
    "| pytree | optimizer | state B/param | XLA temp MB | peak MB (state + temp) | peak vs optax.lamb "
    "| median update ms | time vs optax.lamb | time vs lamb16 | least traffic MB | GB/s at it | of peak |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    of_peak = f"{r['of_peak_bandwidth']:.0%}" if r.get("of_peak_bandwidth") is not None else "n/a"
    lines.append(
      f"| {r['pytree']} ({r['num_params'] / 1e6:.1f}M) | {r['optimizer']} | "
      f"{r['state_bytes'] / r['num_params']:.3f} | {r['temp_bytes'] / 1e6:.1f} | "
      f"{r['peak_bytes'] / 1e6:.1f} | {r['peak_vs_lamb']:.2f}x | {r['median_seconds'] * 1e3:.2f} | "
      f"{r['time_vs_lamb']:.2f}x | {_ratio(r['time_vs_lamb16'])} | {r['min_traffic_bytes'] / 1e6:.0f} | "
      f"{r['achieved_gbps']:.0f} | {of_peak} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", default="4M,50M")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument(
    "--peak-gbps",
    type=float,
    default=None,
    help="the device's peak memory bandwidth in GB/s (default: PEAK_GBPS by device kind)",
  )
  parser.add_argument(
    "--scaling",
    default=None,
    help="comma-separated sizes of SCALING (1M,4M,16M,50M,100M): how the cost grows with the number of parameters",
  )
  parser.add_argument(
    "--optimizers",
    default=None,
    help="comma-separated names of OPTIMIZERS (optax.lamb among them; default: all of them, or "
    "SCALING_OPTIMIZERS with --scaling)",
  )
  parser.add_argument("--note", default=None, help="a note on the machine, stored in the JSON")
  parser.add_argument(
    "--out",
    default=None,
    help="default docs/results/update_bench.json, or docs/results/update_scaling.json with --scaling",
  )
  args = parser.parse_args()
  trees = SCALING if args.scaling else SIZES
  sizes = (args.scaling or args.sizes).split(",")
  # Names are separated by commas without a space after them (some names hold ", ").
  names = (
    re.split(r",(?! )", args.optimizers)
    if args.optimizers
    else list(SCALING_OPTIMIZERS if args.scaling else DEFAULT_OPTIMIZERS)
  )
  if "optax.lamb" not in names or any(name not in OPTIMIZERS for name in names):
    parser.error(f"--optimizers must name optax.lamb and only optimizers of {list(OPTIMIZERS)}")
  out = args.out or ("docs/results/update_scaling.json" if args.scaling else "docs/results/update_bench.json")
  device = jax.devices()[0]
  peak = args.peak_gbps or (peak_gbps(device.device_kind) if device.platform == "gpu" else None)
  rows = []
  for size in sizes:
    params = make_tree(trees[size], jax.random.key(0))
    grads = make_tree(trees[size], jax.random.key(1), scale=0.01)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    # Fewer calls on the large trees, whose calls take long enough to time well.
    repeats = args.repeats if num_params < 5_000_000 else max(3, args.repeats // 2)
    size_rows = measure_all(params, grads, repeats, names=names)
    lamb = next(r for r in size_rows if r["optimizer"] == "optax.lamb")
    lamb16 = next((r for r in size_rows if r["optimizer"] == "optax_lamb16.lamb16"), None)
    adamw = next((r for r in size_rows if r["optimizer"] == "optax.adamw"), None)
    for r in size_rows:
      if adamw:
        r.update(
          peak_vs_adamw=r["peak_bytes"] / adamw["peak_bytes"],
          time_vs_adamw=r["median_seconds"] / adamw["median_seconds"],
        )
      r.update(
        pytree=size,
        num_params=num_params,
        num_leaves=len(jax.tree.leaves(params)),
        peak_vs_lamb=r["peak_bytes"] / lamb["peak_bytes"],
        time_vs_lamb=r["median_seconds"] / lamb["median_seconds"],
        time_vs_lamb16=r["median_seconds"] / lamb16["median_seconds"] if lamb16 else None,
        of_peak_bandwidth=r["achieved_gbps"] / peak if peak else None,
      )
    rows += size_rows
    del params, grads
  print(f"jax {jax.__version__}, {machine_name()}\n")
  print(markdown(rows))
  metadata = {"peak_gbps": peak}
  if args.scaling:
    metadata.update(
      command=shlex.join(["python", "benchmarks/update_bench.py", *sys.argv[1:]]),
      machine_note=args.note,
      repeats=args.repeats,
      rounds=5,
    )
  write_results(out, rows, **metadata)


def machine_name() -> str:
  """The first device and the host's processor, as the results record them."""
  device = jax.devices()[0]
  return f"{device.platform.upper()} {device.device_kind}, {platform.processor() or platform.machine()}"


def write_results(path: str, rows: list[dict], **metadata) -> None:
  """Writes ``{"jax", "optax", "device", **metadata, "rows"}`` as JSON to `path` (docs/results/*.json)."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(
      {"jax": jax.__version__, "optax": optax.__version__, "device": machine_name(), **metadata, "rows": rows}, indent=1
    )
  )
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
