"""AdamW vs LAMB vs LAMB16 on a byte-level language model of the Python standard library's own sources, in Flax NNX.

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]` (recursively, sorted, `site-packages`
skipped), split into train and validation BY FILE: a file is in validation when the CRC-32 of its path relative to
the stdlib directory is 0 modulo 20 (about 5 %). The model is a decoder-only transformer over bytes (vocabulary 256):
learned token and position embeddings, pre-LayerNorm blocks (causal multi-head attention, MLP 4x with GELU), a final
LayerNorm and an untied output head; float32 everywhere. Every optimizer sees the same batches (random train windows
drawn with a NumPy generator seeded by --seed) and is evaluated on the same fixed validation windows (evenly spaced
over the validation bytes); the validation loss is reported in bits per byte (mean cross-entropy in nats / ln 2).

One set of runs (every optimizer at every --lr):

  python -m experiments.charlm --optimizers adamw,lamb,lamb16,lamb16_blockwise --steps 300 --lr 1e-3,3e-3 \
      --out out/charlm

The committed learning-rate sweep (docs/results/charlm.json and charlm.png) is `experiments/charlm_sweep.sh`: 3 or 4
learning rates per optimizer for --sweep-steps, then one run per optimizer at its best sweep learning rate for
--steps, every run with a linear warm-up and a cosine decay (--schedule cosine):

  python -m experiments.charlm --sweep "adamw=4e-3,8e-3,1.6e-2;lamb16_blockwise=1e-3,2.5e-3,6e-3,1.5e-2" \
      --schedule cosine --sweep-steps 400 --steps 1200 --batch-size 16 --eval-every 100 --out out/charlm

`--merge a.json,b.json` combines the results of separate invocations (same corpus and model) into one file and plot.
The script writes OUT/<json-name> ({"runs": [...], "corpus": {...}, ...}) and OUT/<plot-name>, and prints a table.
For the LAMB16 optimizers it also logs `optax_lamb16.float8_health` of the optimizer state at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import sysconfig
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import optax_lamb16
from experiments.optimizers import check_names, make_optimizer

COLOURS = {
  "adamw": "tab:orange",
  "adamw16": "tab:olive",
  "lamb": "tab:green",
  "lamb16": "tab:blue",
  "lamb16_blockwise": "tab:purple",
  "lamb16_blockwise_sr": "tab:red",
  "lamb16_float32": "tab:gray",
  "lamb16_blockwise_adam": "tab:brown",
}
LABELS = {
  "adamw": "AdamW",
  "adamw16": "AdamW16",
  "lamb": "LAMB",
  "lamb16": "LAMB16",
  "lamb16_blockwise": "LAMB16 (block-wise)",
  "lamb16_blockwise_sr": "LAMB16 (block-wise, stochastic v)",
  "lamb16_float32": "LAMB16's step, float32 moments (ablation)",
  "lamb16_blockwise_adam": "LAMB16 (block-wise), trust_scale 0",
}
FLOAT8_OPTIMIZERS = ("adamw16", "lamb16", "lamb16_blockwise", "lamb16_blockwise_sr", "lamb16_blockwise_adam")
VALIDATION_MODULUS = 20  # a file is in validation when crc32(relative path) % 20 == 0: about 5 %


def learning_rate_schedule(lr: float, steps: int, schedule: str, warmup_fraction: float) -> optax.ScalarOrSchedule:
  """`lr` throughout ("constant"), or a linear warm-up from 0 over `warmup_fraction` of `steps` to `lr`, then a cosine
  decay to lr / 10 at the last step ("cosine", the usual transformer recipe; LAMB's paper also warms up)."""
  if schedule == "constant":
    return lr
  if schedule == "cosine":
    warmup = max(1, round(warmup_fraction * steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr / 10)
  raise ValueError(f"unknown --schedule {schedule!r}; choose constant or cosine")


# ----------------------------------------------------------------------------------------------------------------
# Corpus


def is_validation_file(relative_path: str) -> bool:
  """The deterministic split: the same on every machine and Python run (CRC-32, not Python's salted hash)."""
  return zlib.crc32(relative_path.encode("utf-8")) % VALIDATION_MODULUS == 0


def load_corpus(max_files: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """Reads the standard library's `.py` files; returns (train bytes, validation bytes, corpus record).

  Args:
    max_files: if given, only the first `max_files` files of the sorted list (for quick tests); at least one of them
      is a validation file (the first validation file of the full list replaces the last one otherwise).

  Returns:
    Two uint8 arrays (the files of each split concatenated in sorted order) and a JSON-ready description.
  """
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  paths = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts and p.is_file())
  relative = [p.relative_to(stdlib).as_posix() for p in paths]
  if max_files is not None:
    chosen = relative[:max_files]
    if not any(is_validation_file(r) for r in chosen):
      chosen = chosen[:-1] + [next(r for r in relative if is_validation_file(r))]
    relative = chosen
  train_files = [r for r in relative if not is_validation_file(r)]
  val_files = [r for r in relative if is_validation_file(r)]
  train = np.frombuffer(b"".join((stdlib / r).read_bytes() for r in train_files), np.uint8)
  val = np.frombuffer(b"".join((stdlib / r).read_bytes() for r in val_files), np.uint8)
  corpus = {
    "source": "the Python standard library's *.py files (recursive, sorted, site-packages skipped)",
    "stdlib_path": str(stdlib),
    "python_version": sys.version,
    "num_files": len(relative),
    "num_train_files": len(train_files),
    "num_val_files": len(val_files),
    "train_bytes": int(train.size),
    "val_bytes": int(val.size),
    "split": f"by file: validation when zlib.crc32(path relative to stdlib) % {VALIDATION_MODULUS} == 0",
    "max_files": max_files,
    "train_files": train_files,
    "val_files": val_files,
  }
  return train, val, corpus


def validation_windows(val: np.ndarray, context: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` fixed windows evenly spaced over the validation bytes: inputs and next-byte targets, (count, context)."""
  if val.size < context + 1:
    raise ValueError(f"validation split has {val.size} bytes, fewer than context + 1 = {context + 1}")
  starts = np.linspace(0, val.size - context - 1, count).astype(np.int64)
  index = starts[:, None] + np.arange(context + 1)[None, :]
  windows = val[index].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


def train_batches(train: np.ndarray, context: int, batch_size: int, steps: int, seed: int):
  """Yields `steps` batches of random train windows (inputs, targets), the same for every optimizer given `seed`."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(context + 1)[None, :]
  for _ in range(steps):
    starts = rng.integers(0, train.size - context - 1, size=batch_size, endpoint=True)
    windows = train[starts[:, None] + offsets].astype(np.int32)
    yield windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# Model


class Block(nnx.Module):
  """Pre-LayerNorm transformer block: x + attention(LN(x)), then x + MLP(LN(x)); causal attention."""

  def __init__(self, d_model: int, heads: int, rngs: nnx.Rngs):
    if d_model % heads:
      raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    self.proj = nnx.Linear(d_model, d_model, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d_model = x.shape
    head_dim = d_model // self.heads
    q, k, v = jnp.split(self.qkv(self.ln1(x)).reshape(batch, length, 3 * self.heads, head_dim), 3, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(head_dim))
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.float32(-1e30))
    attention = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(batch, length, d_model)
    x = x + self.proj(attention)
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ByteTransformer(nnx.Module):
  """Decoder-only transformer over bytes: token + learned position embeddings, blocks, final LN, untied head."""

  def __init__(self, d_model: int, layers: int, heads: int, context: int, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(256, d_model, embedding_init=init, rngs=rngs)
    self.position_embedding = nnx.Param(init(rngs.params(), (context, d_model), jnp.float32))
    self.blocks = nnx.List([Block(d_model, heads, rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, 256, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.token_embedding(tokens) + self.position_embedding[...][: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def make_loss(graphdef):
  """Mean next-byte cross-entropy in nats over every position of a batch."""

  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  return loss_fn


def make_evaluator(graphdef, inputs: np.ndarray, targets: np.ndarray, batch_size: int):
  """Validation bits per byte over the fixed windows (mean cross-entropy in nats / ln 2), in equal-size batches."""
  loss_fn = jax.jit(make_loss(graphdef))
  chunks = [(inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]

  def evaluate(params) -> float:
    total = sum(float(loss_fn(params, x, y)) * len(x) for x, y in chunks)
    return total / len(inputs) / math.log(2)

  return evaluate


# ----------------------------------------------------------------------------------------------------------------
# Training


def finite_or_none(value: float) -> float | None:
  """A float for JSON, None for inf and NaN (a diverged run)."""
  return float(value) if math.isfinite(value) else None


def train_one(name: str, lr: float, args, train: np.ndarray, val_windows, steps: int) -> dict:
  """Trains a fresh model (initialised from --seed) with one optimizer; returns the run's record for results.json."""
  model = ByteTransformer(args.d_model, args.layers, args.heads, args.context, nnx.Rngs(args.seed))
  graphdef, params = nnx.split(model, nnx.Param)
  num_params = count_params(params)
  tx = make_optimizer(name, learning_rate_schedule(lr, steps, args.schedule, args.warmup), args.weight_decay)
  opt_state = tx.init(params)
  state_bytes = int(sum(x.nbytes for x in jax.tree.leaves(opt_state)))
  evaluate = make_evaluator(graphdef, *val_windows, args.eval_batch_size)
  loss_fn = make_loss(graphdef)

  def train_step(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  train_step = jax.jit(train_step, donate_argnums=(0, 1))

  float8_health = jax.jit(optax_lamb16.float8_health)
  val_curve, health, train_losses = [], [], []
  diverged = False

  def log_eval(step: int) -> float:
    bits = evaluate(params)
    val_curve.append([step, finite_or_none(bits)])
    if name in FLOAT8_OPTIMIZERS:
      health.append([step, {key: float(value) for key, value in float8_health(opt_state).items()}])
    return bits

  started = time.perf_counter()
  log_eval(0)
  step = 0
  progress = tqdm(
    train_batches(train, args.context, args.batch_size, steps, args.seed),
    total=steps,
    desc=f"{name} lr {lr:g}",
    leave=False,
    unit="step",
  )
  for inputs, targets in progress:
    params, opt_state, loss = train_step(params, opt_state, inputs, targets)
    step += 1
    train_losses.append(loss)
    if step % args.eval_every == 0 or step == steps:
      bits = log_eval(step)
      progress.set_postfix(val_bpb=f"{bits:.3f}")
      if not math.isfinite(bits):
        diverged = True
        tqdm.write(f"{name:>16} lr {lr:g}: validation loss not finite at step {step}; run stopped")
        break
  seconds = time.perf_counter() - started
  train_losses = np.asarray(jax.device_get(train_losses), np.float64) / math.log(2)
  windows = np.array_split(np.arange(len(train_losses)), max(1, min(100, len(train_losses))))
  final = val_curve[-1][1]
  tqdm.write(f"{name:>16} lr {lr:g}: {step} steps, validation {final} bits/byte, {seconds:.1f} s")
  run = {
    "optimizer": name,
    "learning_rate": lr,
    "steps": steps,
    "steps_done": step,
    "weight_decay": args.weight_decay,
    "schedule": args.schedule,
    "warmup_fraction": args.warmup if args.schedule != "constant" else None,
    "seed": args.seed,
    "final_val_bits_per_byte": final if not diverged else None,
    "diverged": diverged,
    "state_bytes_per_param": state_bytes / num_params,
    "optimizer_state_bytes": state_bytes,
    "num_params": num_params,
    "val_curve": val_curve,
    "train_bits_per_byte_curve": [[int(w[-1]) + 1, finite_or_none(train_losses[w].mean())] for w in windows if len(w)],
    "seconds": round(seconds, 2),
    "seconds_per_step": round(seconds / max(step, 1), 4),
  }
  if name in FLOAT8_OPTIMIZERS:
    run["float8_health"] = health
  return run


# ----------------------------------------------------------------------------------------------------------------
# Results


def plot(results: dict, path: pathlib.Path) -> None:
  """Validation bits/byte against step per run; with a sweep, also final bits/byte against learning rate."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs, sweep = results["runs"], results.get("sweep", [])
  health_runs = [r for r in runs if r.get("float8_health")]
  panels = 1 + bool(sweep) + bool(health_runs)
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
  axes = list(axes[0])
  several_lrs = len({r["learning_rate"] for r in runs}) > 1 and not sweep
  linestyles = ["-", "--", ":", "-."]
  lr_index = {lr: i for i, lr in enumerate(sorted({r["learning_rate"] for r in runs}))}
  for run in runs:
    points = [(s, b) for s, b in run["val_curve"] if b is not None]
    label = f"{LABELS[run['optimizer']]}, lr {run['learning_rate']:g}"
    axes[0].plot(
      *zip(*points),
      color=COLOURS[run["optimizer"]],
      label=label,
      marker=".",
      ls=linestyles[lr_index[run["learning_rate"]] % 4] if several_lrs else "-",
    )
  axes[0].set(xlabel="step", ylabel="validation bits / byte", title="validation loss")
  finite = [b for r in runs for s, b in r["val_curve"] if b is not None and s > 0]
  if finite:
    axes[0].set_ylim(min(finite) - 0.1, min(max(finite), min(finite) + 3) + 0.1)
  column = 1
  if sweep:
    ax = axes[column]
    column += 1
    for name in dict.fromkeys(r["optimizer"] for r in sweep):
      rows = sorted((r for r in sweep if r["optimizer"] == name), key=lambda r: r["learning_rate"])
      ax.plot(
        [r["learning_rate"] for r in rows],
        [r["final_val_bits_per_byte"] if r["final_val_bits_per_byte"] is not None else np.nan for r in rows],
        color=COLOURS[name],
        label=LABELS[name],
        marker="o",
      )
    ax.set(
      xscale="log",
      xlabel="learning rate",
      ylabel="validation bits / byte",
      title=f"learning-rate sweep ({sweep[0]['steps']} steps)",
    )
  if health_runs:
    ax = axes[column]
    for run in health_runs:
      steps = [s for s, _ in run["float8_health"]]
      style = dict(color=COLOURS[run["optimizer"]])
      tag = f"{LABELS[run['optimizer']]}, lr {run['learning_rate']:g}"
      ax.plot(steps, [h["mu_saturated"] for _, h in run["float8_health"]], ls="-", label=f"{tag}: m saturated", **style)
      ax.plot(steps, [h["nu_zero"] for _, h in run["float8_health"]], ls="--", label=f"{tag}: v zero", **style)
      ax.plot(steps, [h["nu_inf"] for _, h in run["float8_health"]], ls=":", label=f"{tag}: v inf", **style)
    ax.set(xlabel="step", ylabel="fraction of state elements", title="float8 state health", ylim=(-0.02, 1.02))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  corpus = results["corpus"]
  model = results.get("model", {})
  fig.suptitle(
    f"byte-level LM on the Python {corpus['python_version'].split()[0]} stdlib "
    f"({corpus['num_files']} files, {corpus['train_bytes'] / 1e6:.1f} MB train); "
    f"{model.get('num_params', '?'):,} params, batch {model.get('batch_size')}, context "
    f"{model.get('context')}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def machine_info() -> dict:
  """Where the numbers were measured."""
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=pathlib.Path(__file__).parent
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    commit = ""
  cpu = platform.processor()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "cores_used": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    "platform": platform.platform(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "flax": __import__("flax").__version__,
    "device": jax.devices()[0].device_kind,
    "git_commit": commit,
  }


def print_table(results: dict) -> None:
  print(
    f"\n{'':>6} {'optimizer':>16} {'lr':>8} {'steps':>6} {'val bits/byte':>14} {'state B/param':>14} {'seconds':>8}"
  )
  for kind, rows in (("sweep", results.get("sweep", [])), ("final", results["runs"])):
    for run in rows:
      bits = run["final_val_bits_per_byte"]
      print(
        f"{kind:>6} {run['optimizer']:>16} {run['learning_rate']:>8g} {run['steps']:>6} "
        f"{bits if bits is None else round(bits, 4)!s:>14} {run['state_bytes_per_param']:>14.3f} "
        f"{run['seconds']:>8.1f}"
      )


def merge(paths: list[str]) -> dict:
  """Combines results files of one corpus and model (later files win for the same optimizer and learning rate).

  Sweep rows are keyed by (optimizer, learning rate), final runs by (optimizer, learning rate, seed). An optimizer's
  final run is the one at the learning rate and seed of its lowest merged sweep loss; its other final runs (from a
  file whose sweep lacked that rate, or repeats with other seeds) go to "other_runs".
  """
  files = [json.loads(pathlib.Path(p).read_text()) for p in paths]
  base = files[0]
  for other, path in zip(files[1:], paths[1:]):
    for key in ("corpus", "model"):
      if other.get(key) != base.get(key):
        raise ValueError(f"{path}: {key} differs from {paths[0]}'s")
  sweep, finals, commands, machines, settings = {}, {}, [], [], {}
  for data in files:
    for row in data.get("sweep", []):
      sweep.pop((row["optimizer"], row["learning_rate"]), None)
      sweep[row["optimizer"], row["learning_rate"]] = row
    for run in data["runs"] + data.get("other_runs", []):  # a merged file's repeats are merged again
      key = run["optimizer"], run["learning_rate"], run["seed"]
      finals.pop(key, None)
      finals[key] = run
    commands += data.get("commands", [])
    machine = data.get("machine")
    machines += machine if isinstance(machine, list) else [machine]
    for name, setting in data.get("sweep_settings", {}).items():
      merged_setting = settings.setdefault(name, dict(setting))
      merged_setting["learning_rates"] = sorted(set(merged_setting["learning_rates"]) | set(setting["learning_rates"]))
  runs, other_runs = [], []
  for name in dict.fromkeys(name for name, _, _ in finals):
    rows = [r for (n, _), r in sweep.items() if n == name and r["final_val_bits_per_byte"] is not None]
    best_row = min(rows, key=lambda r: r["final_val_bits_per_byte"]) if rows else None
    best = None if best_row is None else (best_row["learning_rate"], best_row["seed"])
    for (n, lr, seed), run in finals.items():
      if n == name:
        (runs if best is None or (lr, seed) == best else other_runs).append(run)
    if best is not None and (name, *best) not in finals:
      print(f"warning: no final run of {name} at its best sweep learning rate {best[0]:g} (seed {best[1]})")
  order = {name: i for i, name in enumerate(dict.fromkeys(name for name, _ in sweep))}
  rows = sorted(sweep.values(), key=lambda r: (order[r["optimizer"]], r["learning_rate"]))
  merged = {
    "runs": runs,
    "sweep": rows,
    "corpus": base["corpus"],
    "model": base.get("model"),
    "commands": commands,
    "machine": machines,
    "merged_from": paths,
  }
  if settings:
    merged["sweep_settings"] = settings
  if other_runs:
    merged["other_runs"] = other_runs
  if not merged["sweep"]:
    del merged["sweep"]
  return merged


def _split(text: str, kind):
  return [kind(item) for item in text.split(",") if item]


def parse_sweep(text: str) -> dict[str, list[float]]:
  """ "adamw=1e-3,3e-3;lamb16=1e-2" -> {"adamw": [0.001, 0.003], "lamb16": [0.01]}."""
  sweep = {}
  for item in text.split(";"):
    if item.strip():
      name, _, lrs = item.partition("=")
      sweep[name.strip()] = _split(lrs, float)
  return sweep


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizers", default="adamw,lamb,lamb16", help="comma-separated names: " + ",".join(COLOURS))
  parser.add_argument("--lr", default="3e-3", help="one or more, comma-separated: every optimizer runs at each")
  parser.add_argument("--steps", type=int, default=300, help="train steps per run (with --sweep: the final runs')")
  parser.add_argument(
    "--sweep",
    default=None,
    help='"name=lr,lr,...;name=...": run each optimizer at its learning '
    "rates for --sweep-steps, then once at the best for --steps (--optimizers and --lr ignored)",
  )
  parser.add_argument("--sweep-steps", type=int, default=100)
  parser.add_argument("--no-finals", action="store_true", help="with --sweep: only the sweep runs (to --merge later)")
  parser.add_argument("--weight-decay", type=float, default=0.01)
  parser.add_argument(
    "--schedule",
    default="constant",
    choices=("constant", "cosine"),
    help="learning rate over a run: constant, or linear warm-up then cosine decay to lr/10",
  )
  parser.add_argument("--warmup", type=float, default=0.05, help="with --schedule cosine: warm-up fraction of steps")
  parser.add_argument("--seed", type=int, default=0, help="model initialisation and train batches")
  parser.add_argument("--d-model", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--context", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--eval-every", type=int, default=50)
  parser.add_argument("--val-windows", type=int, default=128, help="fixed validation windows of --context bytes")
  parser.add_argument("--eval-batch-size", type=int, default=64)
  parser.add_argument("--max-files", type=int, default=None, help="read only the first N stdlib files (tests)")
  parser.add_argument("--merge", default=None, help="comma-separated results files to combine (no training)")
  parser.add_argument("--note", default=None, help='free text stored in the results under "note"')
  parser.add_argument("--out", default="out/charlm")
  parser.add_argument("--json-name", default="results.json")
  parser.add_argument("--plot-name", default="charlm.png")
  args = parser.parse_args(argv)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = shlex.join(["python", "-m", "experiments.charlm", *(sys.argv[1:] if argv is None else argv)])
  if args.merge:
    results = merge(_split(args.merge, str))
    results["commands"].append(command)
  else:
    sweep = parse_sweep(args.sweep) if args.sweep else None
    optimizers = list(sweep) if sweep else _split(args.optimizers, str)
    check_names(optimizers, tuple(COLOURS))  # unknown names fail before any training
    train, val, corpus = load_corpus(args.max_files)
    val_windows = validation_windows(val, args.context, args.val_windows)
    model_info = {
      "architecture": "decoder-only transformer, pre-LayerNorm, learned position embedding, untied head, "
      "GELU MLP 4x, causal attention, float32",
      "d_model": args.d_model,
      "layers": args.layers,
      "heads": args.heads,
      "context": args.context,
      "batch_size": args.batch_size,
      "vocabulary": 256,
      "val_windows": args.val_windows,
      "num_params": count_params(
        nnx.split(ByteTransformer(args.d_model, args.layers, args.heads, args.context, nnx.Rngs(0)), nnx.Param)[1]
      ),
    }
    print(
      f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {corpus['num_files']} files, "
      f"{corpus['train_bytes']:,} train / {corpus['val_bytes']:,} validation bytes; "
      f"{model_info['num_params']:,} parameters"
    )
    results = {"runs": [], "corpus": corpus, "model": model_info, "commands": [command], "machine": machine_info()}
    if sweep:
      results["sweep"] = []
      results["sweep_settings"] = {
        name: {"learning_rates": lrs, "sweep_steps": args.sweep_steps, "final_steps": args.steps}
        for name, lrs in sweep.items()
      }
      for name, lrs in sweep.items():
        rows = [train_one(name, lr, args, train, val_windows, args.sweep_steps) for lr in lrs]
        results["sweep"] += rows
        if args.no_finals:
          continue
        finished = [r for r in rows if r["final_val_bits_per_byte"] is not None]
        if not finished:
          tqdm.write(f"{name}: every sweep run diverged; no final run")
          continue
        best = min(finished, key=lambda r: r["final_val_bits_per_byte"])
        results["runs"].append(
          dict(train_one(name, best["learning_rate"], args, train, val_windows, args.steps), chosen_by_sweep=True)
        )
        (out / args.json_name).write_text(json.dumps(results, indent=1))  # partial results survive an interruption
    else:
      for lr in _split(args.lr, float):
        results["runs"] += [train_one(name, lr, args, train, val_windows, args.steps) for name in optimizers]
  if args.note:
    results["note"] = args.note
  (out / args.json_name).write_text(json.dumps(results, indent=1))
  plot(results, out / args.plot_name)
  print_table(results)
  print(f"\nwrote {out / args.json_name} and {out / args.plot_name}")
  return results


if __name__ == "__main__":
  main()
