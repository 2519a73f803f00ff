"""MNIST large-batch sweep: Adam, LAMB, LAMB16 and block-wise LAMB16 at batch 128 to 8192 (the reference convnet).

The learning rate follows the square root of the batch from the reference's settings (SPEC.md section 1): batch 128
-> 0.01 and batch 1024 -> 0.02 are the reference's own; any other batch B gets 0.02 * sqrt(B / 1024), rounded to 4
decimals (4096 -> 0.04, 8192 -> 0.0566). Weight decay 0.01 and no schedule throughout, as in the reference; the same
number of epochs at every batch size, so the large batches take fewer steps (8192: 8 steps an epoch).

Reproduce the committed results (docs/results/mnist_large_batch.json and .png), pinned to one CPU core:

  taskset -c 0 python -m experiments.mnist_large_batch --optimizers adam,lamb,lamb16,lamb16_blockwise \
      --batch-sizes 128,1024,4096,8192 --epochs 3 --out docs/results

3 epochs, because the 16 runs had to fit in about 90 minutes on two CPU cores: one optimizer's four batch sizes
take 12-16 minutes of one core at 3 epochs (the committed runs: 140-290 s each, two processes side by side beside
other jobs). 3 epochs is still far from the reference's 10 (batch 8192 gets 24 steps, 4096 gets 45), so the numbers
compare the optimizers at a fixed, short budget of samples, not at convergence.

The committed JSON was produced by that command's parts, one process per optimizer, two at a time on cores 0 and 1,
into separate OUTs, then merged with `--merge-from`; its "commands" lists each part and its "note" the code each
ran. Its "earlier_one_epoch_runs" are an earlier sweep at 1 epoch.

Every run is merged into OUT/mnist_large_batch.json as it finishes (a row replaces the row with the same optimizer
and batch size; the others are kept), so a subset can be run now and others added later, e.g.

  python -m experiments.mnist_large_batch --optimizers lamb16_blockwise --out docs/results

`--merge-from A.json,B.json` merges other sweeps' results (e.g. parts run in parallel into other OUTs) into OUT's
JSON without training, and `--plot-only` redraws OUT/mnist_large_batch.png (final test accuracy and loss against
batch size, log2 axis, one line per optimizer) from the JSON without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib

import jax

from experiments import mnist, mnist_common
from experiments.optimizers import check_names

OPTIMIZERS = ("adam", "lamb", "lamb16", "lamb16_blockwise")
BATCH_SIZES = (128, 1024, 4096, 8192)
REFERENCE_LR = {128: 0.01, 1024: 0.02}  # the reference's two settings; others scale from batch 1024
RESULTS_NAME, PLOT_NAME = "mnist_large_batch.json", "mnist_large_batch.png"


def lr_for_batch(batch_size: int) -> float:
  """The learning rate of a batch size: the reference's own at 128 and 1024, else 0.02 * sqrt(B / 1024).

  Args:
    batch_size: the training batch size.

  Returns:
    The learning rate, rounded to 4 decimals.
  """
  if batch_size in REFERENCE_LR:
    return REFERENCE_LR[batch_size]
  return round(0.02 * math.sqrt(batch_size / 1024), 4)


def _key(run: dict) -> tuple[str, int]:
  return run["optimizer"], run["batch_size"]


def _order(run: dict) -> tuple[int, str, int]:
  name = run["optimizer"]
  return (OPTIMIZERS.index(name) if name in OPTIMIZERS else len(OPTIMIZERS), name, run["batch_size"])


def merge(results: dict, other: dict) -> dict:
  """Merges one set of results into another: a row of `other` replaces the one with the same optimizer and batch size.

  Args:
    results: the existing results ({"runs", "commands", "machine"}), or {} for none.
    other: the results to merge in, same form; its commands and machines are appended unless already there.

  Returns:
    The merged results, runs sorted by optimizer (in OPTIMIZERS order) then batch size.
  """
  new_runs = list(other.get("runs", []))
  new_keys = {_key(run) for run in new_runs}
  runs = [run for run in results.get("runs", []) if _key(run) not in new_keys] + new_runs
  commands = list(results.get("commands", []))
  commands += [command for command in other.get("commands", []) if command not in commands]
  machines = [m for m in results.get("machine", "").split("; ") if m]
  machines += [m for m in other.get("machine", "").split("; ") if m and m not in machines]
  return {"runs": sorted(runs, key=_order), "commands": commands, "machine": "; ".join(machines)}


def plot(results: dict, path: pathlib.Path) -> None:
  """Final test accuracy and test loss against batch size (log2 axis), one line per optimizer."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = results["runs"]
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in sorted({run["optimizer"] for run in runs}, key=lambda n: _order({"optimizer": n, "batch_size": 0})):
    rows = sorted((run for run in runs if run["optimizer"] == name), key=lambda run: run["batch_size"])
    style = dict(color=mnist.COLOURS.get(name), label=mnist.LABELS.get(name, name), marker="o")
    batches = [run["batch_size"] for run in rows]
    axes[0].plot(batches, [run["final_test_accuracy"] for run in rows], **style)
    axes[1].plot(batches, [run["final_test_loss"] for run in rows], **style)
  batch_sizes = sorted({run["batch_size"] for run in runs})
  lrs = {run["batch_size"]: run["lr"] for run in runs}
  for ax, ylabel in zip(axes, ("final test accuracy", "final test loss")):
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [f"{b}\nlr {lrs[b]:g}" for b in batch_sizes])
    ax.set(xlabel="batch size", ylabel=ylabel, yscale="log" if "loss" in ylabel else "linear")
    ax.grid(alpha=0.3)
    ax.legend()
  epochs = sorted({run["epochs"] for run in runs})
  wds = sorted({run["weight_decay"] for run in runs})
  fig.suptitle(
    f"MNIST, reference convnet, {'/'.join(map(str, epochs))} epoch(s) at every batch size, "
    f"lr ~ sqrt(batch), weight decay {'/'.join(f'{w:g}' for w in wds)}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _command(args: argparse.Namespace) -> str:
  parts = [
    "python -m experiments.mnist_large_batch",
    f"--optimizers {args.optimizers}",
    f"--batch-sizes {args.batch_sizes}",
    f"--epochs {args.epochs}",
    f"--weight-decay {args.weight_decay:g}",
    f"--seed {args.seed}",
  ]
  for flag, value in (
    ("--train-samples", args.train_samples),
    ("--test-samples", args.test_samples),
    ("--max-steps", args.max_steps),
  ):
    if value is not None:
      parts.append(f"{flag} {value}")
  return " ".join(parts + ["--out OUT"])


def _machine() -> str:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return f"{cores} of {os.cpu_count()} CPU cores (shared), jax {jax.__version__} on {jax.devices()[0].device_kind}"


def _print_table(runs: list[dict]) -> None:
  print(
    f"\n{'optimizer':>16} {'batch':>6} {'lr':>7} {'epochs':>6} {'steps':>6} {'test acc':>9} {'test loss':>10} "
    f"{'seconds':>8}"
  )
  for run in runs:
    print(
      f"{run['optimizer']:>16} {run['batch_size']:>6} {run['lr']:>7g} {run['epochs']:>6} {run['steps']:>6} "
      f"{run['final_test_accuracy']:>9.4f} {run['final_test_loss']:>10.4f} {run['seconds']:>8.1f}"
    )


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated names from experiments/mnist.py"
  )
  parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated")
  parser.add_argument("--epochs", type=int, default=3, help="the same at every batch size")
  parser.add_argument("--weight-decay", type=float, default=0.01)
  parser.add_argument("--train-samples", type=int, default=None, help="train on the first N images (for tests)")
  parser.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N images (for tests)")
  parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data", default=str(mnist_common.DEFAULT_DATA), help=".npz file or directory of IDX files")
  parser.add_argument("--out", default="out/mnist_large_batch")
  parser.add_argument("--merge-from", default=None, help="comma-separated JSON files to merge into OUT's; no training")
  parser.add_argument("--plot-only", action="store_true", help="redraw the plot from OUT's JSON; train nothing")
  args = parser.parse_args(argv)

  out = pathlib.Path(args.out)
  results_path, plot_path = out / RESULTS_NAME, out / PLOT_NAME
  results = json.loads(results_path.read_text()) if results_path.exists() else {}
  if args.merge_from:
    for other in args.merge_from.split(","):
      results = merge(results, json.loads(pathlib.Path(other).read_text()))
    out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
  if args.plot_only or args.merge_from:
    if not results.get("runs"):
      parser.error(f"{results_path} has no runs to plot")
    plot(results, plot_path)
    _print_table(results["runs"])
    print(f"\nwrote {plot_path}")
    return results

  optimizers = [name for name in args.optimizers.split(",") if name]
  batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  check_names(optimizers, tuple(mnist.COLOURS))  # unknown names fail before any training
  out.mkdir(parents=True, exist_ok=True)
  data = mnist_common.load_mnist(args.data)
  for split, limit in (("train", args.train_samples), ("test", args.test_samples)):
    if limit is not None:
      data[f"x_{split}"], data[f"y_{split}"] = data[f"x_{split}"][:limit], data[f"y_{split}"][:limit]
  command, machine = _command(args), _machine()
  print(f"{machine}; {len(data['x_train'])} train / {len(data['x_test'])} test images")
  for batch_size in batch_sizes:
    lr = lr_for_batch(batch_size)
    for name in optimizers:
      run = mnist.train_one(name, data, batch_size, lr, args.weight_decay, args.epochs, args.seed, args.max_steps)
      print(
        f"{name} batch {batch_size} lr {lr:g}: test accuracy {run['final_test_accuracy']:.4f} "
        f"in {run['seconds']:.0f} s",
        flush=True,
      )
      # Written after every run, so a sweep cut short keeps the rows it finished.
      results = merge(results, {"runs": [run], "commands": [command], "machine": machine})
      results_path.write_text(json.dumps(results, indent=1))
      plot(results, plot_path)
  _print_table(results["runs"])
  print(f"\nwrote {results_path} and {plot_path}")
  return results


if __name__ == "__main__":
  main()
