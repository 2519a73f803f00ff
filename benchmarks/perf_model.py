"""Projected step time of exact Adam, 1-bit Adam and 0/1 Adam on GPU clusters: a model, not a measurement.

For each model of `MODELS` (BERT-Large, GPT-2 XL), number of GPUs and network bandwidth per GPU, one data-parallel
training step is

  step = compute + update + communication

- compute: the forward and backward pass, ``6 N T`` FLOPs for N parameters and T tokens per GPU per step, at an
  achieved fraction (`--mfu`) of the GPU's dense BF16 peak (`--peak-tflops`);
- update: the optimizer's step, memory-bound: 28 bytes moved per parameter (grads, params and Adam's two moments read,
  updates and moments written: `update_bench.py`'s least traffic for optax.adam) at `--hbm-fraction` of the GPU's
  memory bandwidth (`--hbm-gbps`), times each 1-bit step's compute cost relative to optax.adam as measured ON CPU by
  `exchange_compute.py` (docs/results/exchange_compute.json; GPU numbers are pending, so this factor is a stand-in);
- communication: ``bytes per rank / bandwidth + 2 (P - 1) latency`` (`--latency-us` per message; a ring all-reduce
  takes 2 (P - 1) messages, the compressed exchange's all-to-all and all-gather P - 1 each). The bytes per rank are
  read from the compiled HLO of each exchange (docs/results/comm_scaling.json, `comm_volume.py --scaling`) for up to
  64 ranks; beyond, from the exact formulas that those measurements check (`formula_bytes`).

Exact Adam all-reduces float32 gradients every step (with `bfloat16` also a 16-bit all-reduce: half the bytes, as a
mixed-precision baseline sends). 1-bit Adam, after its warm-up, sends one compressed exchange of the momentum per
step. 0/1 Adam, after its variance freeze, sends one compressed exchange per `--sync-interval` steps (16: the largest
interval DeepSpeed's default `local_step_clipper` allows) and nothing on the local steps between; its mean step is
reported. The exact step's all-reduce may overlap the backward pass (``overlap``: ``max(compute, communication)``);
the 1-bit steps' exchanges cannot, since they need the whole gradient (the momentum is exchanged, not the gradient).
With gradient accumulation (`--accumulation`: micro-batches per optimizer step) the compute per step grows and the
update and communication do not.

  python -m benchmarks.perf_model [--gpus 8,16,32,64,128,256] [--gbits 10,25,100,400] [--accumulation 1,4,16]
                                  [--mfu 0.4] [--latency-us 10] [--sync-interval 16]
                                  [--out docs/results/perf_model.json]

Prints markdown tables and writes JSON: the assumptions, and one row per model, GPU count and bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import pathlib
import shlex
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

# name -> (comm_scaling.json's model label, sequence length, sequences per GPU per step, description)
MODELS = {
  "bert-large": ("BERT-Large", 128, 32, "BERT-Large pre-training at sequence length 128, 32 sequences per GPU"),
  "gpt2-xl": ("GPT-2 XL", 1024, 4, "GPT-2 XL (1.5B) pre-training at sequence length 1024, 4 sequences per GPU"),
}
# optax.adam's least memory traffic per float32 parameter: grads, params, m and v read (16 B), updates, m, v written.
ADAM_BYTES_PER_PARAM = 28
# exchange_compute.json's rows whose compute cost (relative to optax.adam's step) each step here pays.
COMPUTE_ROWS = {
  "exact": "exact flat mean + optax.adam",
  "onebit": "onebit_adam, compression",
  "zero_one_local": "zero_one_adam, local step",
  "zero_one_sync": "zero_one_adam, sync step",
}


def padded_length(n: int, world: int) -> int:
  """The compressed exchange's buffer length: N rounded up to a multiple of ``P lcm(P, 8)`` (SPEC.md section 3;
  `optax_lamb16.compression.padded_length` with one rank per host)."""
  quantum = world * math.lcm(world, 8)
  return -(-n // quantum) * quantum


def formula_bytes(n: int, world: int) -> dict[str, float]:
  """Bytes one rank sends per exchange of n float32 values among `world` ranks: a ring all-reduce sends
  ``2 (P-1)/P`` of the buffer; the compressed exchange's all-to-all and all-gather each ``(P-1)/P`` of the sign bytes
  plus one float32 scale per chunk."""
  share = (world - 1) / world
  return {
    "float32": 2 * share * 4 * n,
    "bfloat16": 2 * share * 2 * n,
    "compressed": 2 * share * (padded_length(n, world) / 8 + 4 * world),
  }


def hlo_bytes(comm: dict) -> dict[tuple[str, int], dict[str, float]]:
  """(model label, world) -> bytes per rank of each exchange, from comm_scaling.json's compiled HLO. The bfloat16
  all-reduce is taken as requested (XLA:CPU widens it to float32 when it compiles; a GPU keeps it in 16 bits)."""
  out: dict[tuple[str, int], dict[str, float]] = {}
  for row in comm["rows"]:
    cell = out.setdefault((row["model"], row["world"]), {})
    if row["exchange"] == "float32 pmean":
      cell["float32"] = row["bytes_sent_per_rank"]
    elif row["exchange"] == "bfloat16 pmean":
      cell["bfloat16"] = row["bytes_requested_per_rank"]
    elif row["exchange"].startswith("compressed"):
      cell["compressed"] = row["bytes_sent_per_rank"]
  return out


def formula_check(comm: dict, measured: dict) -> float:
  """The largest relative difference between `formula_bytes` and the HLO's bytes over every measured point."""
  worst = 0.0
  for (label, world), cell in measured.items():
    expected = formula_bytes(comm["models"][label]["num_params"], world)
    for key, value in cell.items():
      worst = max(worst, abs(expected[key] - value) / value)
  return worst


def project(args, comm: dict, compute_ratios: dict[str, float]) -> list[dict]:
  """One row per (model, micro-batches per step, GPUs, Gbit/s): the projected step times and speed-ups."""
  measured = hlo_bytes(comm)
  hbm_bytes_per_s = args.hbm_gbps * 1e9 * args.hbm_fraction
  flops_per_s = args.peak_tflops * 1e12 * args.mfu
  latency = args.latency_us * 1e-6
  rows = []
  for key in args.models.split(","):
    label, sequence, sequences, _ = MODELS[key]
    n = comm["models"][label]["num_params"]
    adam_update = ADAM_BYTES_PER_PARAM * n / hbm_bytes_per_s
    update = {name: adam_update * ratio for name, ratio in compute_ratios.items()}
    for accumulation, gpus in itertools.product(args.accumulations, args.gpu_counts):
      compute = 6 * n * sequence * sequences * accumulation / flops_per_s
      from_hlo = (label, gpus) in measured
      sent = measured[(label, gpus)] if from_hlo else formula_bytes(n, gpus)
      hops = 2 * (gpus - 1) * latency
      for gbits in args.gbit_rates:
        rate = gbits * 1e9 / 8  # bytes per second
        comm_f32, comm_bf16 = sent["float32"] / rate + hops, sent["bfloat16"] / rate + hops
        comm_compressed = sent["compressed"] / rate + hops
        exact = compute + update["exact"] + comm_f32
        exact_bf16 = compute + update["exact"] + comm_bf16
        exact_overlap = max(compute, comm_f32) + update["exact"]
        onebit = compute + update["onebit"] + comm_compressed
        h = args.sync_interval
        zero_one = compute + ((h - 1) * update["zero_one_local"] + update["zero_one_sync"] + comm_compressed) / h
        rows.append(
          {
            "model": label,
            "num_params": n,
            "accumulation": accumulation,
            "gpus": gpus,
            "gbits": gbits,
            "bytes_source": "hlo" if from_hlo else "formula",
            "bytes_float32": sent["float32"],
            "bytes_bfloat16": sent["bfloat16"],
            "bytes_compressed": sent["compressed"],
            "compute_seconds": compute,
            "adam_update_seconds": adam_update,
            "exact_seconds": exact,
            "exact_bfloat16_seconds": exact_bf16,
            "exact_overlap_seconds": exact_overlap,
            "exact_comm_share": comm_f32 / exact,
            "onebit_seconds": onebit,
            "zero_one_mean_seconds": zero_one,
            "onebit_speedup": exact / onebit,
            "zero_one_speedup": exact / zero_one,
            "onebit_speedup_vs_bfloat16": exact_bf16 / onebit,
            "zero_one_speedup_vs_bfloat16": exact_bf16 / zero_one,
            "onebit_speedup_vs_overlap": exact_overlap / onebit,
            "zero_one_speedup_vs_overlap": exact_overlap / zero_one,
          }
        )
  return rows


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="bert-large,gpt2-xl")
  parser.add_argument("--gpus", default="8,16,32,64,128,256")
  parser.add_argument("--gbits", default="10,25,100,400", help="network bandwidth per GPU, Gbit/s")
  parser.add_argument(
    "--accumulation", default="1,4,16", help="micro-batches per optimizer step (the first: the main tables)"
  )
  parser.add_argument(
    "--peak-tflops",
    type=float,
    default=989.0,
    help="the GPU's dense BF16 peak (default: an H100 SXM's, NVIDIA's data sheet)",
  )
  parser.add_argument("--mfu", type=float, default=0.4, help="achieved fraction of --peak-tflops (an assumption)")
  parser.add_argument(
    "--hbm-gbps",
    type=float,
    default=3350.0,
    help="the GPU's memory bandwidth, GB/s (default: an H100 SXM's, update_bench.PEAK_GBPS)",
  )
  parser.add_argument(
    "--hbm-fraction",
    type=float,
    default=0.7,
    help="achieved fraction of --hbm-gbps in the optimizer's step (an assumption)",
  )
  parser.add_argument("--latency-us", type=float, default=10.0, help="latency per message, microseconds")
  parser.add_argument("--sync-interval", type=int, default=16, help="0/1 Adam's steps per 1-bit sync")
  parser.add_argument(
    "--comm",
    default=str(RESULTS / "comm_scaling.json"),
    help="bytes per rank per exchange (`comm_volume.py --scaling`)",
  )
  parser.add_argument(
    "--compute",
    default=str(RESULTS / "exchange_compute.json"),
    help="each step's compute relative to optax.adam (`exchange_compute.py`)",
  )
  parser.add_argument("--out", default="docs/results/perf_model.json")
  args = parser.parse_args()
  args.gpu_counts = [int(g) for g in args.gpus.split(",")]
  args.gbit_rates = [float(g) for g in args.gbits.split(",")]
  args.accumulations = [int(a) for a in args.accumulation.split(",")]
  return args


def markdown(rows: list[dict], key: str) -> str:
  """Speed-up (`key` of each row) by GPUs (rows) and Gbit/s (columns), for each model."""
  lines = []
  for label in dict.fromkeys(r["model"] for r in rows):
    model_rows = [r for r in rows if r["model"] == label and r["accumulation"] == rows[0]["accumulation"]]
    rates = list(dict.fromkeys(r["gbits"] for r in model_rows))
    lines += [
      f"\n{label}, {key}:",
      "| GPUs | " + " | ".join(f"{g:g} Gbit/s" for g in rates) + " |",
      "|---:|" + "---:|" * len(rates),
    ]
    for gpus in dict.fromkeys(r["gpus"] for r in model_rows):
      cells = [f"{r[key]:.2f}x" for r in model_rows if r["gpus"] == gpus]
      lines.append(f"| {gpus} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  args = parse_args()
  comm = json.loads(pathlib.Path(args.comm).read_text())
  compute = json.loads(pathlib.Path(args.compute).read_text())
  by_step = {r["step"]: r["vs_adam"] for r in compute["rows"]}
  compute_ratios = {name: by_step[step] for name, step in COMPUTE_ROWS.items()}
  rows = project(args, comm, compute_ratios)
  print(markdown(rows, "onebit_speedup"))
  print(markdown(rows, "zero_one_speedup"))
  assumptions = {
    "peak_tflops": args.peak_tflops,
    "mfu": args.mfu,
    "hbm_gbps": args.hbm_gbps,
    "hbm_fraction": args.hbm_fraction,
    "adam_bytes_per_param": ADAM_BYTES_PER_PARAM,
    "latency_us": args.latency_us,
    "sync_interval": args.sync_interval,
    "accumulation": args.accumulations,
    "compute_ratios_vs_adam": compute_ratios,
    "compute_ratios_source": f"{pathlib.Path(args.compute).name}: {compute['device']}, {compute['num_params']:,} "
    f"parameters, {compute['ranks']} ranks (CPU-measured; GPU numbers pending)",
    "comm_source": f"{pathlib.Path(args.comm).name}: {comm['command']}",
    "formula_max_relative_error": formula_check(comm, hlo_bytes(comm)),
    "models": {
      MODELS[k][0]: {
        "sequence": MODELS[k][1],
        "sequences_per_gpu": MODELS[k][2],
        "tokens_per_gpu": MODELS[k][1] * MODELS[k][2],
        "description": MODELS[k][3],
        "num_params": comm["models"][MODELS[k][0]]["num_params"],
      }
      for k in args.models.split(",")
    },
  }
  command = shlex.join(["python", "benchmarks/perf_model.py", *sys.argv[1:]])
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"command": command, "assumptions": assumptions, "rows": rows}, indent=1))
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
