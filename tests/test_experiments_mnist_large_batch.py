"""The MNIST large-batch sweep (experiments/mnist_large_batch.py) on a tiny subset: JSON schema, the lr rule,
merging runs, the plot."""

import json
import math

import jax
import pytest

from experiments import mnist_large_batch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_lr_scales_with_the_square_root_of_the_batch_from_the_reference():
  assert mnist_large_batch.lr_for_batch(128) == 0.01 and mnist_large_batch.lr_for_batch(1024) == 0.02
  assert mnist_large_batch.lr_for_batch(4096) == 0.04 and mnist_large_batch.lr_for_batch(8192) == 0.0566
  for batch_size in (64, 256, 2048, 4096, 8192, 16384):
    assert mnist_large_batch.lr_for_batch(batch_size) == pytest.approx(0.02 * math.sqrt(batch_size / 1024), abs=5e-5)


def _stale_row(optimizer: str, batch_size: int) -> dict:
  return {
    "optimizer": optimizer,
    "batch_size": batch_size,
    "lr": 0.5,
    "weight_decay": 0.01,
    "epochs": 9,
    "seed": 7,
    "steps": 1,
    "final_test_accuracy": 0.5,
    "final_test_loss": 1.5,
    "seconds": 1.0,
  }


@pytest.mark.slow
def test_sweep_merges_into_existing_results_and_replots(tmp_path):
  # An earlier sweep's results: one row the new runs replace (adam, 64) and one they leave alone (lamb, 8192).
  earlier = {
    "runs": [_stale_row("lamb", 8192), _stale_row("adam", 64)],
    "commands": ["python earlier"],
    "machine": "earlier machine",
  }
  results_path, png = tmp_path / "mnist_large_batch.json", tmp_path / "mnist_large_batch.png"
  results_path.write_text(json.dumps(earlier))
  argv = [
    "--optimizers",
    "adam,lamb16",
    "--batch-sizes",
    "64,4096",
    "--train-samples",
    "256",
    "--test-samples",
    "500",
    "--max-steps",
    "2",
    "--epochs",
    "2",
    "--out",
    str(tmp_path),
  ]
  with jax.numpy_dtype_promotion("standard"):  # the drivers rely on optax's implicit promotion (tests run strict)
    returned = mnist_large_batch.main(argv)

  results = json.loads(results_path.read_text())
  assert results == returned and set(results) == {"runs", "commands", "machine"}
  assert results["commands"][0] == "python earlier" and len(results["commands"]) == 2
  assert results["commands"][1].startswith(
    "python -m experiments.mnist_large_batch --optimizers adam,lamb16 --batch-sizes 64,4096 --epochs 2 "
  )
  assert results["machine"].startswith("earlier machine; ") and "jax" in results["machine"]
  runs = results["runs"]
  assert [(r["optimizer"], r["batch_size"]) for r in runs] == [
    ("adam", 64),
    ("adam", 4096),
    ("lamb", 8192),
    ("lamb16", 64),
    ("lamb16", 4096),
  ]
  assert runs[2] == earlier["runs"][0]  # kept as it was
  required = {
    "optimizer",
    "batch_size",
    "lr",
    "weight_decay",
    "epochs",
    "seed",
    "steps",
    "final_test_accuracy",
    "final_test_loss",
    "seconds",
    "test_curve",
  }
  for run in runs[:2] + runs[3:]:
    assert required <= set(run), required - set(run)
    assert run["lr"] == mnist_large_batch.lr_for_batch(run["batch_size"]) and run["weight_decay"] == 0.01
    assert run["epochs"] == 2 and run["steps"] == 2 and run["seed"] == 0  # adam 64 is the new run, not the stale one
    assert 0.0 <= run["final_test_accuracy"] <= 1.0 and math.isfinite(run["final_test_loss"])
    # 256 images: batch 64 stops inside epoch 1; batch 4096 takes all 256 as one step in each of the two epochs.
    assert [p["epoch"] for p in run["test_curve"]] == ([1] if run["batch_size"] == 64 else [1, 2])
  assert [r["lr"] for r in runs[:2]] == [0.005, 0.04]
  if hasattr(mnist_large_batch.mnist.optax_lamb16, "float8_health"):
    for run in runs[3:]:
      assert [h["epoch"] for h in run["float8_health"]] == [p["epoch"] for p in run["test_curve"]]
      assert all(0.0 <= h[k] <= 1.0 for h in run["float8_health"] for k in ("mu_saturated", "nu_inf", "nu_zero"))
  assert png.read_bytes().startswith(PNG_MAGIC)

  # Re-plot from the JSON alone: the plot comes back, the JSON is untouched.
  png.unlink()
  mnist_large_batch.main(["--plot-only", "--out", str(tmp_path)])
  assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 20_000
  assert json.loads(results_path.read_text()) == results

  # Merge another sweep's JSON (e.g. a part run in parallel) without training: its rows win, the rest are kept.
  other_row = dict(_stale_row("lamb", 8192), final_test_accuracy=0.25)
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"runs": [other_row], "commands": ["python other"], "machine": "other machine"}))
  merged = mnist_large_batch.main(["--merge-from", str(other), "--out", str(tmp_path)])
  assert json.loads(results_path.read_text()) == merged
  assert merged["runs"] == runs[:2] + [other_row] + runs[3:]
  assert merged["commands"] == results["commands"] + ["python other"]
  assert merged["machine"] == results["machine"] + "; other machine"
