"""The 1-bit optimizers as drop-ins for Adam and LAMB on experiments/charlm.py's byte-level transformer, data parallel.

Trains the byte-level transformer of `charlm` (its corpus, model, batches and evaluation, imported) on --devices host
devices through `optax_lamb16.data_parallel`: each rank differentiates its slice of the global batch and the
optimizer communicates. The optimizers (--optimizers):

- ``adam``, ``lamb``: exact `optax.adam` / `optax.lamb`, given the exact mean of the gradients by `data_parallel`
  (one float32 all-reduce per step). Their rule is what the drop-in mode follows, so they run once per setting,
  recorded with mode "drop_in".
- ``onebit_adam``, ``zero_one_adam``, ``onebit_lamb``: the 1-bit optimizers in each --modes (``faithful``:
  DeepSpeed's rule; ``drop_in``: the exact counterpart's, SPEC.md section 6b), freezing at --freeze-fraction of the
  steps (freeze_step / var_freeze_step).
- ``lamb16_blockwise_1bit``: ``chain(compressed_mean, lamb16_blockwise)``: float8 LAMB fed by the 1-bit compressed
  gradient mean every step (mode-independent, recorded as "faithful").

every one at each of --lrs, --schedules (``cosine``: linear warm-up over --warmup of the steps, then cosine decay
to lr/10; ``constant``) and --seeds (model initialisation and batches). Each run records its final validation
bits/byte, the bytes each rank sent (from the exchange each step made, read off the optimizer's state for 0/1 Adam,
priced as `experiments/dp_common.exchange_bytes`) and the share of exact (float32 all-reduce) steps. Runs are merged
into OUT/<json-name> (a run with the same settings is replaced, others kept) as
``{"runs": [{"optimizer", "mode", "learning_rate", "schedule", "seed", "steps", "freeze_step",
"final_val_bits_per_byte", "bytes_sent_per_rank", "exact_share", ...}], ...}``, and OUT/<plot-name> is redrawn from
all runs in it.

The full experiment (issue 31; 4 host devices, global batch 32, 500 steps, about 0.9M parameters; hours on 2 CPU
cores, so run it in parts, e.g. one --optimizers at a time, which merge into the same file):

  python -m experiments.charlm_data_parallel --devices 4 --steps 500 --batch-size 32 \
      --optimizers adam,lamb,onebit_adam,zero_one_adam,onebit_lamb,lamb16_blockwise_1bit --modes faithful,drop_in \
      --lrs 3e-4,1e-3,3e-3 --schedules cosine,constant --seeds 0 --freeze-fraction 0.2 --warmup 0.1 \
      --out docs/results --json-name charlm_data_parallel.json --plot-name charlm_data_parallel.png

0/1 Adam's schedules: --var-update-scaler (DeepSpeed: 16), --local-step-scaler (DeepSpeed: 32678, i.e. a sync every
step in runs this short) and --local-step-clipper (16) are recorded with each run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import sys
import time

from experiments.optimizers import freeze_at

OPTIMIZERS = ("adam", "lamb", "onebit_adam", "zero_one_adam", "onebit_lamb", "lamb16_blockwise_1bit")
EXACT = ("adam", "lamb")  # their own rule: one run per setting, recorded as mode "drop_in"
MODELESS = {"lamb16_blockwise_1bit": "faithful"}
COLOURS = {
  "adam": "tab:orange",
  "lamb": "tab:green",
  "onebit_adam": "tab:red",
  "zero_one_adam": "tab:purple",
  "onebit_lamb": "tab:blue",
  "lamb16_blockwise_1bit": "tab:brown",
}
# What identifies a run in the merged file: a new run with the same values replaces the old one.
KEY = (
  "optimizer",
  "mode",
  "learning_rate",
  "schedule",
  "warmup_fraction",
  "seed",
  "steps",
  "freeze_step",
  "devices",
  "batch_size",
  "d_model",
  "layers",
  "zero_one_schedules",
  "mask_zero_variance",
  "weight_decay",
)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=4, help="data-parallel ranks (host devices on a CPU)")
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated: " + ",".join(OPTIMIZERS))
  parser.add_argument("--modes", default="faithful,drop_in", help="comma-separated: faithful, drop_in")
  parser.add_argument("--lrs", default="1e-3", help="comma-separated learning rates: every optimizer runs at each")
  parser.add_argument("--schedules", default="cosine", help="comma-separated: cosine (warm-up, then decay), constant")
  parser.add_argument("--warmup", type=float, default=0.1, help="with cosine: warm-up fraction of the steps")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds (model initialisation and batches)")
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--freeze-fraction", type=float, default=0.2, help="1-bit warm-up as a fraction of the steps")
  parser.add_argument("--var-update-scaler", type=int, default=16, help="0/1 Adam (DeepSpeed's default: 16)")
  parser.add_argument("--local-step-scaler", type=int, default=32678, help="0/1 Adam (DeepSpeed's default: 32678)")
  parser.add_argument("--local-step-clipper", type=int, default=16, help="0/1 Adam (DeepSpeed's default: 16)")
  parser.add_argument(
    "--no-mask-zero-variance",
    action="store_true",
    help="1-bit optimizers without mask_zero_variance (byte embeddings never seen keep v = 0)",
  )
  parser.add_argument("--weight-decay", type=float, default=0.0)
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--context", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32, help="global batch, split over the ranks")
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--val-windows", type=int, default=128)
  parser.add_argument("--eval-batch-size", type=int, default=64)
  parser.add_argument("--max-files", type=int, default=None, help="read only the first N stdlib files (tests)")
  parser.add_argument("--out", default="out/charlm_data_parallel")
  parser.add_argument("--json-name", default="charlm_data_parallel.json")
  parser.add_argument("--plot-name", default="charlm_data_parallel.png")
  args = parser.parse_args(argv)
  split = lambda text, kind: [kind(x) for x in text.split(",") if x]
  args.optimizers, args.modes = split(args.optimizers, str), split(args.modes, str)
  args.lrs, args.schedules, args.seeds = split(args.lrs, float), split(args.schedules, str), split(args.seeds, int)
  for name in args.optimizers:
    if name not in OPTIMIZERS:
      parser.error(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
  for mode in args.modes:
    if mode not in ("faithful", "drop_in"):
      parser.error(f"unknown mode {mode!r}; choose faithful or drop_in")
  return args


def freeze_step(args) -> int:
  return freeze_at(args.freeze_fraction, args.steps)


def make_optimizer(name: str, mode: str, lr, args):
  """The optimizer `name` in `mode` at learning rate (or schedule) `lr`, communicating over "data"."""
  from experiments import optimizers

  schedules = dict(
    var_update_scaler=args.var_update_scaler,
    local_step_scaler=args.local_step_scaler,
    local_step_clipper=args.local_step_clipper,
  )
  # eps 1e-8 for all: the 1-bit family's default, and so their exact counterparts' (optax.lamb's is 1e-6).
  return optimizers.make_optimizer(
    name,
    lr,
    args.weight_decay,
    comm="data",
    freeze_step=freeze_step(args),
    eps=1e-8,
    mask_zero_variance=not args.no_mask_zero_variance,
    mode=mode,
    zero_one_schedules=schedules,
  )


def step_kind(name: str, opt_state, t: int, args) -> str:
  """The exchange step t (DeepSpeed's count: the first update has t = 2) makes: "exact", "compressed" or "none".
  For 0/1 Adam from its state before the step (SPEC.md section 5), for the others from the freeze step."""
  if name in EXACT:
    return "exact"
  if name == "lamb16_blockwise_1bit":
    return "compressed"
  if name == "zero_one_adam":
    import jax

    frozen, var_interval, local_interval = jax.device_get(
      (opt_state.frozen, opt_state.var_interval, opt_state.local_step_interval)
    )
    if not frozen:
      return "exact" if t % int(var_interval) == 0 else "compressed"
    return "compressed" if t % int(local_interval) == 0 else "none"
  return "exact" if t <= freeze_step(args) else "compressed"


def train_one(name: str, mode: str, lr: float, schedule: str, seed: int, args, mesh, corpus) -> dict:
  """One run from a fresh model; returns its record."""
  import jax
  import numpy as np
  from flax import nnx

  import optax_lamb16
  from experiments import charlm, dp_common

  train, val_windows = corpus
  model = charlm.ByteTransformer(args.d_model, args.layers, args.heads, args.context, nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  num_params = charlm.count_params(params)
  tx = make_optimizer(name, mode, charlm.learning_rate_schedule(lr, args.steps, schedule, args.warmup), args)
  loss = charlm.make_loss(graphdef)
  dp = optax_lamb16.data_parallel(lambda p, batch: loss(p, *batch), tx, mesh)
  params, opt_state = dp.init(params)
  evaluate = charlm.make_evaluator(graphdef, *val_windows, args.eval_batch_size)
  costs = dp_common.exchange_bytes(num_params, dp.world_size)
  kinds, val_curve, train_bits = [], [[0, evaluate(dp.unstack_params(params))]], []
  started = time.perf_counter()
  for step, batch in enumerate(charlm.train_batches(train, args.context, args.batch_size, args.steps, seed), 1):
    kinds.append(step_kind(name, opt_state, step + 1, args))
    # One step at a time: collectives of back-to-back dispatches can deadlock on a few CPU cores.
    params, opt_state, loss_value = jax.block_until_ready(dp.step(params, opt_state, batch))
    train_bits.append(float(loss_value) / math.log(2))
    if step % args.eval_every == 0 or step == args.steps:
      bits = evaluate(dp.unstack_params(params))
      val_curve.append([step, charlm.finite_or_none(bits)])
      print(
        f"  {name} {mode} lr {lr:g} {schedule} seed {seed}: step {step}, validation {bits:.4f} bits/byte", flush=True
      )
      if not math.isfinite(bits):
        break
  final = val_curve[-1][1]
  windows = np.array_split(np.arange(len(train_bits)), max(1, min(50, len(train_bits))))
  return {
    "optimizer": name,
    "mode": mode,
    "learning_rate": lr,
    "schedule": schedule,
    "warmup_fraction": args.warmup if schedule != "constant" else None,
    "seed": seed,
    "steps": args.steps,
    "steps_done": len(kinds),
    "freeze_step": freeze_step(args) if name not in EXACT + tuple(MODELESS) else None,
    "final_val_bits_per_byte": final,
    "bytes_sent_per_rank": sum(costs.get(k, 0.0) for k in kinds),
    "exact_share": kinds.count("exact") / max(len(kinds), 1),
    "exact_steps": kinds.count("exact"),
    "compressed_steps": kinds.count("compressed"),
    "silent_steps": kinds.count("none"),
    "zero_one_schedules": (
      [args.var_update_scaler, args.local_step_scaler, args.local_step_clipper] if name == "zero_one_adam" else None
    ),
    "mask_zero_variance": (not args.no_mask_zero_variance) if name not in EXACT + tuple(MODELESS) else None,
    "weight_decay": args.weight_decay,
    "devices": dp.world_size,
    "batch_size": args.batch_size,
    "d_model": args.d_model,
    "layers": args.layers,
    "num_params": num_params,
    "val_curve": val_curve,
    "train_bits_per_byte_curve": [
      [int(w[-1]) + 1, charlm.finite_or_none(np.mean([train_bits[i] for i in w]))] for w in windows if len(w)
    ],
    "seconds": round(time.perf_counter() - started, 1),
  }


def planned_runs(args) -> list[tuple[str, str, float, str, int]]:
  runs = []
  for seed in args.seeds:
    for schedule in args.schedules:
      for lr in args.lrs:
        for name in args.optimizers:
          modes = ["drop_in"] if name in EXACT else [MODELESS[name]] if name in MODELESS else args.modes
          runs += [(name, mode, lr, schedule, seed) for mode in modes]
  return runs


def merge_runs(old: list[dict], new: list[dict]) -> list[dict]:
  """`old` with each run that has a new run of the same KEY replaced by it, then the other new runs."""
  key = lambda run: json.dumps([run.get(k) for k in KEY])
  fresh = {key(run): run for run in new}
  kept = [fresh.pop(key(run), run) for run in old]
  return kept + list(fresh.values())


def plot(runs: list[dict], path: pathlib.Path) -> None:
  """Validation bits/byte against step, one panel per (mode, schedule); exact optimizers in every panel."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = sorted({(r["mode"], r["schedule"]) for r in runs if r["optimizer"] not in EXACT}) or [("drop_in", "cosine")]
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
  lrs = sorted({r["learning_rate"] for r in runs})
  styles = ["-", "--", ":", "-."]
  for ax, (mode, schedule) in zip(axes[0], panels):
    for run in runs:
      if run["schedule"] != schedule or (run["mode"] != mode and run["optimizer"] not in EXACT):
        continue
      points = [(s, b) for s, b in run["val_curve"] if b is not None]
      if points:
        ax.plot(
          *zip(*points),
          color=COLOURS.get(run["optimizer"], "k"),
          ls=styles[lrs.index(run["learning_rate"]) % 4],
          label=f"{run['optimizer']}, lr {run['learning_rate']:g}, seed {run['seed']}",
        )
    ax.set(xlabel="step", ylabel="validation bits / byte", title=f"{mode}, {schedule} learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
  ).strip()
  import jax

  from experiments import charlm

  if jax.device_count() < args.devices:
    raise SystemExit(f"asked for {args.devices} devices, jax sees {jax.device_count()}")
  mesh = jax.make_mesh(
    (args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[: args.devices]
  )
  train, val, corpus_record = charlm.load_corpus(args.max_files)
  corpus = (train, charlm.validation_windows(val, args.context, args.val_windows))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / args.json_name
  results = json.loads(path.read_text()) if path.exists() else {"runs": [], "commands": []}
  results.setdefault("commands", []).append(
    shlex.join(["python", "-m", "experiments.charlm_data_parallel", *(sys.argv[1:] if argv is None else argv)])
  )
  results["corpus"] = {k: v for k, v in corpus_record.items() if k not in ("train_files", "val_files")}
  results["machine"] = {"jax": jax.__version__, "platform": jax.devices()[0].platform}
  for name, mode, lr, schedule, seed in planned_runs(args):
    run = train_one(name, mode, lr, schedule, seed, args, mesh, corpus)
    results["runs"] = merge_runs(results["runs"], [run])
    path.write_text(json.dumps(results, indent=1))  # every finished run survives an interruption
    print(
      f"{name:>14} {mode:>8} lr {lr:<7g} {schedule:>8} seed {seed}: {run['final_val_bits_per_byte']} bits/byte, "
      f"{run['bytes_sent_per_rank'] / 1e6:.2f} MB sent per rank, exact share {run['exact_share']:.2f}",
      flush=True,
    )
  plot(results["runs"], out / args.plot_name)
  print(f"wrote {path} and {out / args.plot_name}")
  return results


if __name__ == "__main__":
  main()
