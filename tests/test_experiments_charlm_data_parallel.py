"""The data-parallel byte-level LM driver (experiments/charlm_data_parallel.py), end to end on a tiny model."""

import json
import math

import jax
import pytest

from experiments import charlm_data_parallel, dp_common

STEPS = 6
TINY = [
  "--devices",
  "4",
  "--steps",
  str(STEPS),
  "--eval-every",
  "3",
  "--d-model",
  "16",
  "--layers",
  "1",
  "--heads",
  "2",
  "--context",
  "16",
  "--batch-size",
  "8",
  "--max-files",
  "20",
  "--val-windows",
  "8",
  "--lrs",
  "1e-3",
  "--freeze-fraction",
  "0.5",
  "--schedules",
  "constant",
]


pytestmark = pytest.mark.filterwarnings("ignore::optax_lamb16._onebit.LargeFirstStepsWarning")


def _run(tmp_path, *extra):
  with jax.numpy_dtype_promotion("standard"):  # optax's own optimizers mix weakly typed scalars
    return charlm_data_parallel.main([*TINY, "--out", str(tmp_path), *extra])


def test_runs_record_the_interface_fields_and_merge(tmp_path):
  _run(tmp_path, "--optimizers", "adam,zero_one_adam", "--modes", "drop_in")
  results = _run(tmp_path, "--optimizers", "onebit_adam", "--modes", "faithful", "--freeze-fraction", "0.9")
  on_disk = json.loads((tmp_path / "charlm_data_parallel.json").read_text())
  assert on_disk["runs"] == results["runs"] and len(on_disk["commands"]) == 2
  runs = {(r["optimizer"], r["mode"]): r for r in on_disk["runs"]}
  # The exact optimizer runs once; the second invocation adds its run without losing the first's.
  assert sorted(runs) == [("adam", "drop_in"), ("onebit_adam", "faithful"), ("zero_one_adam", "drop_in")]
  exchange = dp_common.exchange_bytes(on_disk["runs"][0]["num_params"], 4)
  for run in on_disk["runs"]:
    assert {
      "optimizer",
      "mode",
      "learning_rate",
      "schedule",
      "seed",
      "steps",
      "freeze_step",
      "final_val_bits_per_byte",
      "bytes_sent_per_rank",
    } <= set(run)
    assert run["learning_rate"] == 1e-3 and run["schedule"] == "constant" and run["seed"] == 0
    assert run["steps"] == run["steps_done"] == STEPS
    assert math.isfinite(run["final_val_bits_per_byte"]) and run["final_val_bits_per_byte"] < 9.0
    assert run["exact_steps"] + run["compressed_steps"] + run["silent_steps"] == STEPS
    assert run["bytes_sent_per_rank"] == pytest.approx(
      run["exact_steps"] * exchange["exact"] + run["compressed_steps"] * exchange["compressed"]
    )
    assert run["exact_share"] == run["exact_steps"] / STEPS
  assert runs[("adam", "drop_in")]["exact_steps"] == STEPS and runs[("adam", "drop_in")]["freeze_step"] is None
  # 1-bit Adam's freeze_step 5: warm-up updates t = 2..5, then compression; 0/1 Adam's var_freeze_step 3: variance
  # steps t = 2, 3, 4 (frozen at the end of t = 4), then a sync every step.
  onebit = runs[("onebit_adam", "faithful")]
  assert onebit["freeze_step"] == 5 and (onebit["exact_steps"], onebit["compressed_steps"]) == (4, 2)
  zero_one = runs[("zero_one_adam", "drop_in")]
  assert (zero_one["exact_steps"], zero_one["compressed_steps"]) == (3, 3)
  assert zero_one["zero_one_schedules"] == [16, 32678, 16]
  assert (tmp_path / "charlm_data_parallel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_names_fail_before_training(tmp_path):
  with pytest.raises(SystemExit):
    charlm_data_parallel.main([*TINY, "--out", str(tmp_path), "--optimizers", "adamw"])
  with pytest.raises(SystemExit):
    charlm_data_parallel.main([*TINY, "--out", str(tmp_path), "--modes", "exact"])
