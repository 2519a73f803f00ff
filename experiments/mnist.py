"""Adam vs LAMB vs LAMB16 on MNIST: the LAMB16 reference's experiment (SPEC.md section 1), in Flax NNX.

Reproduce the reference's two settings (10 epochs each, all three optimizers):

  python -m experiments.mnist --batch-size 1024,128 --lr 0.02,0.01 --weight-decay 0.01 --epochs 10 --out docs/results

A short run (about a minute on 2 CPU cores):

  python -m experiments.mnist --train-samples 8192 --batch-size 512 --lr 0.01 --epochs 3 --out out/demo

`--batch-size`, `--lr` and `--weight-decay` take comma-separated lists, zipped into settings (a single value is
reused). The script writes OUT/results.json and one PNG per setting (train loss against samples seen, test accuracy
and test loss per epoch; Adam red, LAMB green, LAMB16 blue), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_lamb16
from experiments import mnist_common
from experiments.optimizers import check_names, make_optimizer

COLOURS = {
  "adam": "tab:red",
  "lamb": "tab:green",
  "lamb16": "tab:blue",
  "adamw": "tab:orange",
  "pytorch_lamb": "tab:olive",
  "lamb16_blockwise": "tab:purple",
  "lamb16_float32": "tab:gray",
}
LABELS = {
  "adam": "Adam",
  "lamb": "LAMB",
  "lamb16": "LAMB16",
  "adamw": "AdamW",
  "pytorch_lamb": "LAMB (pytorch-lamb)",
  "lamb16_blockwise": "LAMB16 (block-wise)",
  "lamb16_float32": "LAMB16's step, float32 moments (ablation)",
}
FLOAT8_OPTIMIZERS = ("lamb16", "lamb16_blockwise")  # their runs log optax_lamb16.float8_health once an epoch
TRAIN_CURVE_POINTS = 200  # train-loss points kept per run (window means)


def train_one(
  name: str, data, batch_size: int, lr: float, weight_decay: float, epochs: int, seed: int, max_steps: int | None
) -> dict:
  """Trains the reference convnet with one optimizer; returns the run's record for results.json."""
  model = mnist_common.ReferenceConvNet(nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = make_optimizer(name, lr, weight_decay)
  opt_state = tx.init(params)
  evaluate = mnist_common.make_evaluator(graphdef)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      return jnp.mean(mnist_common.cross_entropy(nnx.merge(graphdef, p)(x), y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x_train, y_train = data["x_train"], data["y_train"]
  rng = np.random.default_rng(seed)
  losses, test_curve, step, started = [], [], 0, time.perf_counter()
  health_fn = getattr(optax_lamb16, "float8_health", None) if name in FLOAT8_OPTIMIZERS else None
  health = []
  for epoch in range(1, epochs + 1):
    order = rng.permutation(len(x_train))  # shuffled every epoch; the last partial batch is kept, as in PyTorch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if max_steps is not None:
      batches = batches[: max(0, max_steps - step)]
    epoch_losses = []
    for index in tqdm(batches, desc=f"{name} epoch {epoch}/{epochs}", leave=False, unit="batch"):
      params, opt_state, loss = train_step(params, opt_state, x_train[index], y_train[index])
      epoch_losses.append((len(index), loss))
      step += 1
    losses += [(n, float(loss)) for n, loss in epoch_losses]
    test_loss, test_accuracy = evaluate(params, data["x_test"], data["y_test"])
    test_curve.append(
      {
        "epoch": epoch,
        "samples": int(sum(n for n, _ in losses)),
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
      }
    )
    if health_fn is not None:  # fractions of the float8 state: m saturated, v at inf, v at zero
      health.append({"epoch": epoch, **{key: float(value) for key, value in health_fn(opt_state).items()}})
    tqdm.write(f"{name:>8} epoch {epoch}: test loss {test_loss:.4f}, accuracy {test_accuracy:.4f}")
    if max_steps is not None and step >= max_steps:
      break
  seconds = time.perf_counter() - started
  record = {
    "optimizer": name,
    "batch_size": batch_size,
    "lr": lr,
    "weight_decay": weight_decay,
    "epochs": epochs,
    "seed": seed,
    "steps": step,
    "num_params": mnist_common.count_params(params),
    "final_test_accuracy": test_curve[-1]["test_accuracy"],
    "final_test_loss": test_curve[-1]["test_loss"],
    "train_loss_curve": _downsample(losses),
    "test_curve": test_curve,
    "seconds": round(seconds, 2),
    "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(opt_state))),
  }
  # Where the state and the model lose elements at the end: per leaf for the float8 moments; dead fc1 units.
  record["dead_fc1_units"] = mnist_common.dead_hidden_units(graphdef, params, data["x_test"])
  if health_fn is not None:
    record["float8_health"] = health
    per_leaf = health_fn(opt_state, per_leaf=True)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    record["final_float8_health_per_leaf"] = {
      name: {key: float(values[i]) for key, values in per_leaf.items()} for i, name in enumerate(names)
    }
  return record


def _downsample(losses: list[tuple[int, float]]) -> list[dict]:
  """[(batch size, loss), ...] -> at most TRAIN_CURVE_POINTS {samples seen, mean loss of the window} points."""
  samples = np.cumsum([n for n, _ in losses])
  values = np.array([loss for _, loss in losses])
  windows = np.array_split(np.arange(len(values)), min(TRAIN_CURVE_POINTS, len(values)))
  return [{"samples": int(samples[w[-1]]), "train_loss": float(values[w].mean())} for w in windows if len(w)]


def plot(runs: list[dict], path: pathlib.Path) -> None:
  """One figure per setting, in the reference's style: train loss vs samples, test accuracy and loss per epoch."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for run in runs:
    style = dict(color=COLOURS[run["optimizer"]], label=LABELS[run["optimizer"]])
    curve = run["train_loss_curve"]
    axes[0].plot([p["samples"] for p in curve], [p["train_loss"] for p in curve], lw=1, **style)
    epochs = [p["epoch"] for p in run["test_curve"]]
    axes[1].plot(epochs, [p["test_accuracy"] for p in run["test_curve"]], marker="o", **style)
    axes[2].plot(epochs, [p["test_loss"] for p in run["test_curve"]], marker="o", **style)
  first = runs[0]
  axes[0].set(xlabel="training samples seen", ylabel="train loss", yscale="log", title="train loss")
  axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
  axes[2].set(xlabel="epoch", ylabel="test loss", title="test loss")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(f"MNIST, batch {first['batch_size']}, lr {first['lr']}, weight decay {first['weight_decay']}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _split(text: str, kind):
  return [kind(item) for item in text.split(",") if item]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizers", default="adam,lamb,lamb16", help="comma-separated names: " + ",".join(COLOURS))
  parser.add_argument("--batch-size", default="1024", help="one or more, comma-separated")
  parser.add_argument("--train-samples", type=int, default=None, help="train on the first N images (for demos)")
  parser.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N images (for tests)")
  parser.add_argument("--lr", default="0.02", help="one or more, comma-separated")
  parser.add_argument("--weight-decay", default="0.01", help="one or more, comma-separated")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data", default=str(mnist_common.DEFAULT_DATA), help=".npz file or directory of IDX files")
  parser.add_argument("--out", default="out/mnist")
  args = parser.parse_args(argv)

  optimizers = _split(args.optimizers, str)
  check_names(optimizers, tuple(COLOURS))  # unknown names fail before any training
  lists = [_split(args.batch_size, int), _split(args.lr, float), _split(args.weight_decay, float)]
  count = max(len(values) for values in lists)
  if any(len(values) not in (1, count) for values in lists):
    parser.error("--batch-size, --lr and --weight-decay take one value or the same number of values")
  settings = list(zip(*[values * count if len(values) == 1 else values for values in lists]))

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  data = mnist_common.load_mnist(args.data)
  for split, limit in (("train", args.train_samples), ("test", args.test_samples)):
    if limit is not None:
      data[f"x_{split}"], data[f"y_{split}"] = data[f"x_{split}"][:limit], data[f"y_{split}"][:limit]
  print(
    f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {len(data['x_train'])} train / "
    f"{len(data['x_test'])} test images"
  )
  runs = []
  for batch_size, lr, weight_decay in settings:
    setting_runs = [
      train_one(name, data, batch_size, lr, weight_decay, args.epochs, args.seed, args.max_steps) for name in optimizers
    ]
    plot(setting_runs, out / f"mnist_batch{batch_size}.png")
    runs += setting_runs
  results = {"runs": runs}
  (out / "results.json").write_text(json.dumps(results, indent=1))

  print(
    f"\n{'optimizer':>10} {'batch':>6} {'lr':>6} {'wd':>6} {'steps':>6} {'test acc':>9} {'test loss':>10} "
    f"{'state MB':>9} {'seconds':>8}"
  )
  for run in runs:
    print(
      f"{run['optimizer']:>10} {run['batch_size']:>6} {run['lr']:>6} {run['weight_decay']:>6} {run['steps']:>6} "
      f"{run['final_test_accuracy']:>9.4f} {run['final_test_loss']:>10.4f} "
      f"{run['optimizer_state_bytes'] / 1e6:>9.3f} {run['seconds']:>8.1f}"
    )
  print(f"\nwrote {out / 'results.json'} and {len(settings)} plot(s) in {out}")
  return results


if __name__ == "__main__":
  main()
