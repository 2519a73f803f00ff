"""What the data-parallel MNIST experiments share: their optimizers' names, communication bill, batches and data.

The optimizers are `experiments.optimizers.make_optimizer`'s, given each rank's LOCAL gradients and `comm`: the
baselines average them with an exact float32 all-reduce (`optax_lamb16.uncompressed_mean`), the 1-bit ones do their
own communication.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from experiments.optimizers import freeze_at
from optax_lamb16 import _compression as compression

OPTIMIZERS = (
  "adam",
  "lamb",
  "lamb16",
  "lamb16_1bit",
  "onebit_adam",
  "onebit_adam_exact",
  "zero_one_adam",
  "zero_one_adam_exact",
  "onebit_lamb",
  "onebit_lamb_exact",
)


def exchange_bytes(num_params: int, world: int) -> dict[str, float]:
  """Bytes one rank sends for one exchange (bandwidth-optimal algorithms; `benchmarks/comm_volume.py` reads the same
  numbers off the compiled HLO)."""
  if world == 1:
    return {"exact": 0.0, "compressed": 0.0}
  share = (world - 1) / world
  n_pad = compression.padded_length(num_params, world)
  return {
    "exact": 2 * share * 4 * num_params,
    "compressed": 2 * share * n_pad / 8 + 2 * share * 4 * world,
  }  # sign bytes + worker/server scales


def exchanges_per_step(name: str, total_steps: int, freeze_fraction: float) -> list[str]:
  """Which exchange each step makes ("exact", "compressed" or "none"), following SPEC.md sections 2 and 4-6."""
  freeze = freeze_at(freeze_fraction, total_steps)
  if name in ("adam", "lamb", "lamb16") or name.endswith("exact"):
    return ["exact"] * total_steps
  if name == "lamb16_1bit":
    return ["compressed"] * total_steps
  if name in ("onebit_adam", "onebit_lamb"):
    return ["exact" if t <= freeze else "compressed" for t in range(2, total_steps + 2)]
  # 0/1 Adam with DeepSpeed's default schedules (var_update_scaler 16, local_step_scaler 32678, clipper 16).
  kinds, var_interval, var_counter, local_interval, local_counter, frozen = [], 1, 0, 1, 0, False
  for t in range(2, total_steps + 2):
    if not frozen:
      due = t % var_interval == 0
      kinds.append("exact" if due else "compressed")
      if due:
        var_counter += 1
        if var_counter == 16:
          var_counter, var_interval = 0, var_interval * 2
    else:
      kinds.append("compressed" if t % local_interval == 0 else "none")
      local_counter += 1
      if local_counter == 32678:
        local_counter, local_interval = 0, min(16, local_interval * 2)
    frozen = frozen or t > freeze
  return kinds


def bytes_sent(name: str, num_params: int, world: int, total_steps: int, freeze_fraction: float) -> dict:
  """Total bytes one rank sends over the run, and the mix of exchanges."""
  costs = exchange_bytes(num_params, world)
  kinds = exchanges_per_step(name, total_steps, freeze_fraction)
  return {
    "bytes_sent_per_rank": sum(costs.get(k, 0.0) for k in kinds),
    "exact_steps": kinds.count("exact"),
    "compressed_steps": kinds.count("compressed"),
    "silent_steps": kinds.count("none"),
  }


def batches(num_examples: int, global_batch: int, epochs: int, seed: int):
  """Shuffled index batches of exactly `global_batch` (the remainder of each epoch is dropped)."""
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - global_batch + 1, global_batch):
      yield order[start : start + global_batch]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  return num_examples // global_batch


def load_data(train_samples: int | None, test_samples: int | None = None) -> dict:
  """MNIST, optionally cut to the first `train_samples` training and `test_samples` test images."""
  from experiments import mnist_common

  data = mnist_common.load_mnist()
  for split, limit in (("train", train_samples), ("test", test_samples)):
    if limit:
      data[f"x_{split}"], data[f"y_{split}"] = data[f"x_{split}"][:limit], data[f"y_{split}"][:limit]
  return data


def report(runs: list[dict], out: str, **metadata) -> None:
  """Prints the runs as a table and writes OUT/results.json."""
  print(
    f"\n{'optimizer':>20} {'test acc':>9} {'test loss':>10} {'exact':>6} {'1-bit':>6} {'silent':>6} "
    f"{'MB sent/rank':>13} {'kB/step':>9}"
  )
  for r in runs:
    print(
      f"{r['optimizer']:>20} {r['final_test_accuracy']:>9.4f} {r['final_test_loss']:>10.4f} "
      f"{r['exact_steps']:>6} {r['compressed_steps']:>6} {r['silent_steps']:>6} "
      f"{r['bytes_sent_per_rank'] / 1e6:>13.2f} {r['bytes_sent_per_rank'] / r['steps'] / 1e3:>9.1f}"
    )
  directory = pathlib.Path(out)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "results.json").write_text(json.dumps({**metadata, "runs": runs}, indent=1))
  print(f"\nwrote {directory / 'results.json'}")
