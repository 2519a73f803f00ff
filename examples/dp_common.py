"""What the data-parallel examples share: the optimizers by name, their communication bill, batches and evaluation.

Every optimizer here takes each rank's LOCAL gradients: the baselines average them with an exact float32 all-reduce
(`optax_lamb16.uncompressed_mean`), the 1-bit ones do their own communication.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import optax

import optax_lamb16
from optax_lamb16 import compression

NEVER = 2**30  # a freeze step that is never reached: the "uncompressed counterpart" of a 1-bit optimizer

OPTIMIZERS = ("adam", "lamb", "lamb16", "lamb16_1bit", "onebit_adam", "onebit_adam_exact", "zero_one_adam",
              "zero_one_adam_exact", "onebit_lamb", "onebit_lamb_exact")


def make_optimizer(name: str, comm: Any, lr: float, total_steps: int, freeze_fraction: float,
                   weight_decay: float = 0.0, mask_zero_variance: bool = True,
                   eps: float = 1e-8) -> optax.GradientTransformation:
  """The optimizers of the data-parallel examples, by name; 1-bit ones freeze at `freeze_fraction` of the steps.

  `mask_zero_variance` (on by default here, off in the library): this ReLU net has units that never fire, whose
  exactly-zero v turns the 1-bit exchange's sign noise into exploding parameters (DeepSpeed's behaviour).
  """
  freeze = max(2, int(freeze_fraction * total_steps))
  onebit = dict(comm=comm, eps=eps, weight_decay=weight_decay, mask_zero_variance=mask_zero_variance)
  if name == "adam":
    return optax.chain(optax_lamb16.uncompressed_mean(comm), optax.adamw(lr, eps=eps, weight_decay=weight_decay))
  if name == "lamb":
    return optax.chain(optax_lamb16.uncompressed_mean(comm), optax.lamb(lr, weight_decay=weight_decay))
  if name == "lamb16":
    return optax.chain(optax_lamb16.uncompressed_mean(comm), optax_lamb16.lamb16(lr, weight_decay=weight_decay))
  if name == "lamb16_1bit":  # float8 optimizer state AND 1-bit gradient communication
    return optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(lr, weight_decay=weight_decay))
  if name in ("onebit_adam", "onebit_adam_exact"):
    return optax_lamb16.onebit_adam(lr, freeze_step=NEVER if name.endswith("exact") else freeze, **onebit)
  if name in ("zero_one_adam", "zero_one_adam_exact"):
    if name.endswith("exact"):  # a variance update (exact all-reduce) every step, never frozen
      return optax_lamb16.zero_one_adam(lr, var_freeze_step=NEVER, var_update_scaler=NEVER, **onebit)
    return optax_lamb16.zero_one_adam(lr, var_freeze_step=freeze, **onebit)
  if name in ("onebit_lamb", "onebit_lamb_exact"):
    return optax_lamb16.onebit_lamb(lr, freeze_step=NEVER if name.endswith("exact") else freeze, **onebit)
  raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def exchange_bytes(num_params: int, world: int) -> dict[str, float]:
  """Bytes one rank sends for one exchange (bandwidth-optimal algorithms; `benchmarks/comm_volume.py` reads the same
  numbers off the compiled HLO)."""
  if world == 1:
    return {"exact": 0.0, "compressed": 0.0}
  share = (world - 1) / world
  n_pad = compression.padded_length(num_params, world)
  return {"exact": 2 * share * 4 * num_params,
          "compressed": 2 * share * n_pad / 8 + 2 * share * 4 * world}  # sign bytes + worker/server scales


def exchanges_per_step(name: str, total_steps: int, freeze_fraction: float) -> list[str]:
  """Which exchange each step makes ("exact", "compressed" or "none"), following SPEC.md sections 2 and 4-6."""
  freeze = max(2, int(freeze_fraction * total_steps))
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
  return {"bytes_sent_per_rank": sum(costs.get(k, 0.0) for k in kinds),
          "exact_steps": kinds.count("exact"), "compressed_steps": kinds.count("compressed"),
          "silent_steps": kinds.count("none")}


def batches(num_examples: int, global_batch: int, epochs: int, seed: int):
  """Shuffled index batches of exactly `global_batch` (the remainder of each epoch is dropped)."""
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - global_batch + 1, global_batch):
      yield order[start:start + global_batch]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  return num_examples // global_batch


def load_data(train_samples: int | None) -> dict:
  """MNIST, optionally cut to the first `train_samples` training images."""
  import mnist_common
  data = mnist_common.load_mnist()
  if train_samples:
    data["x_train"], data["y_train"] = data["x_train"][:train_samples], data["y_train"][:train_samples]
  return data


def report(runs: list[dict], out: str, **metadata) -> None:
  """Prints the runs as a table and writes OUT/results.json."""
  print(f"\n{'optimizer':>20} {'test acc':>9} {'test loss':>10} {'exact':>6} {'1-bit':>6} {'silent':>6} "
        f"{'MB sent/rank':>13} {'kB/step':>9}")
  for r in runs:
    print(f"{r['optimizer']:>20} {r['final_test_accuracy']:>9.4f} {r['final_test_loss']:>10.4f} "
          f"{r['exact_steps']:>6} {r['compressed_steps']:>6} {r['silent_steps']:>6} "
          f"{r['bytes_sent_per_rank'] / 1e6:>13.2f} {r['bytes_sent_per_rank'] / r['steps'] / 1e3:>9.1f}")
  directory = pathlib.Path(out)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "results.json").write_text(json.dumps({**metadata, "runs": runs}, indent=1))
  print(f"\nwrote {directory / 'results.json'}")
