"""The byte-level language-model experiment (experiments/charlm.py), end to end on a tiny model and a few files."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from experiments import charlm
from experiments.optimizers import make_optimizer
from tests import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# AdamW and one float8 optimizer (the block-wise one with stochastic rounding: the most state); the float8 state of
# lamb16 is checked in test_experiments_mnist.py.
OPTIMIZERS = ("adamw", "lamb16_blockwise_sr")


@pytest.mark.slow
def test_charlm_end_to_end(tmp_path):
  command = [
    sys.executable,
    "-m",
    "experiments.charlm",
    "--optimizers",
    ",".join(OPTIMIZERS),
    "--steps",
    "6",
    "--eval-every",
    "3",
    "--lr",
    "3e-3",
    "--seed",
    "1",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--context",
    "32",
    "--batch-size",
    "4",
    "--max-files",
    "30",
    "--val-windows",
    "16",
    "--out",
    str(tmp_path),
  ]
  completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "val bits/byte" in completed.stdout  # the final table

  results = json.loads((tmp_path / "results.json").read_text())
  runs = results["runs"]
  assert [r["optimizer"] for r in runs] == list(OPTIMIZERS)
  required = {
    "optimizer",
    "learning_rate",
    "steps",
    "final_val_bits_per_byte",
    "state_bytes_per_param",
    "val_curve",
    "seconds",
  }
  for run in runs:
    assert required <= set(run), required - set(run)
    assert run["learning_rate"] == 3e-3 and run["steps"] == 6 and run["seconds"] > 0
    assert [step for step, _ in run["val_curve"]] == [0, 3, 6]
    bits = [b for _, b in run["val_curve"]]
    assert all(b is not None and math.isfinite(b) for b in bits), bits
    assert 4.0 < bits[0] < 12.0  # untrained: near log2(256) = 8 bits per byte
    assert bits[-1] < bits[0]  # six steps already lower the validation loss
    assert run["final_val_bits_per_byte"] == bits[-1]
  state = {r["optimizer"]: r["state_bytes_per_param"] for r in runs}
  assert state["adamw"] == pytest.approx(8.0, abs=0.01)
  assert state["lamb16_blockwise_sr"] <= 2.1
  for run in runs:
    if run["optimizer"] == "adamw":
      assert "float8_health" not in run
      continue
    assert [step for step, _ in run["float8_health"]] == [0, 3, 6]
    for _, fractions in run["float8_health"]:
      assert {"mu_saturated", "nu_inf", "nu_zero"} <= set(fractions)
      assert all(0.0 <= value <= 1.0 for value in fractions.values()), fractions

  corpus = results["corpus"]
  for key in ("num_files", "train_bytes", "val_bytes", "python_version", "stdlib_path"):
    assert key in corpus, key
  assert corpus["python_version"] == sys.version and corpus["num_files"] == 30
  assert corpus["train_bytes"] > 0 and corpus["val_bytes"] > 0
  train_files, val_files = set(corpus["train_files"]), set(corpus["val_files"])
  assert train_files and val_files and not train_files & val_files
  assert len(train_files) + len(val_files) == corpus["num_files"]
  assert not any("site-packages" in path for path in train_files | val_files)
  assert all(charlm.is_validation_file(path) for path in val_files)
  assert not any(charlm.is_validation_file(path) for path in train_files)

  png = (tmp_path / "charlm.png").read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_learning_rate_schedules():
  assert charlm.learning_rate_schedule(3e-3, 100, "constant", 0.05) == 3e-3
  schedule = charlm.learning_rate_schedule(3e-3, 100, "cosine", 0.05)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(3e-3)
  assert float(schedule(100)) == pytest.approx(3e-4) and float(schedule(50)) < 3e-3
  with pytest.raises(ValueError, match="schedule"):
    charlm.learning_rate_schedule(3e-3, 100, "linear", 0.05)


def test_merge_keeps_the_sweeps_best_and_files_the_rest(tmp_path):
  """`--merge`: the final run at the best merged sweep rate (and the sweep's seed) is kept; a repeat with another
  seed, and a final at a rate that lost the sweep, go to other_runs; files of another corpus are refused."""

  def row(lr, bits, seed=0, steps=400):
    return {"optimizer": "adamw", "learning_rate": lr, "seed": seed, "steps": steps, "final_val_bits_per_byte": bits}

  corpus, model = {"num_files": 3}, {"d_model": 8}
  files = {
    "a": {"runs": [row(1e-3, 2.0, steps=1200)], "sweep": [row(1e-3, 3.0), row(3e-3, 3.5)]},
    "b": {"runs": [row(1e-3, 2.1, seed=1, steps=1200), row(3e-3, 2.4, steps=1200)], "sweep": []},
  }
  paths = []
  for name, data in files.items():
    paths.append(str(tmp_path / f"{name}.json"))
    pathlib.Path(paths[-1]).write_text(json.dumps(dict(data, corpus=corpus, model=model, commands=[name])))
  merged = charlm.merge(paths)
  assert [(r["learning_rate"], r["seed"]) for r in merged["runs"]] == [(1e-3, 0)]
  assert sorted((r["learning_rate"], r["seed"]) for r in merged["other_runs"]) == [(1e-3, 1), (3e-3, 0)]
  assert merged["commands"] == ["a", "b"] and len(merged["sweep"]) == 2
  # A merged file merged again keeps its repeats.
  again = str(tmp_path / "merged.json")
  pathlib.Path(again).write_text(json.dumps(dict(merged, corpus=corpus, model=model)))
  remerged = charlm.merge([again])
  assert (remerged["runs"], sorted(map(str, remerged["other_runs"]))) == (
    merged["runs"],
    sorted(map(str, merged["other_runs"])),
  )
  pathlib.Path(paths[1]).write_text(json.dumps(dict(files["b"], corpus={"num_files": 4}, model=model)))
  with pytest.raises(ValueError, match="corpus"):
    charlm.merge(paths)


class Float32MomentsReference(reference.Lamb16Reference):
  """SPEC.md section 1's step with the moments stored as they are (float32) instead of float8."""

  def __init__(self, params, **kwargs):
    super().__init__(params, **kwargs)
    for p, s in zip(params, self.states):
      s.mq, s.vq = np.zeros(p.shape, np.float32), np.zeros(p.shape, np.float32)

  def dequantize(self, s):
    return s.mq, s.vq

  def requantize(self, s, m, v, leaf):
    s.mq, s.vq = m, v


def test_float32_moments_ablation_is_lamb16s_step_with_float32_moments():
  rng = np.random.default_rng(0)
  start = {"a": rng.standard_normal((10, 64)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
  lr, weight_decay = 0.02, 0.01
  tx = make_optimizer("lamb16_float32", lr, weight_decay)
  oracle = Float32MomentsReference(list(start.values()), weight_decay=weight_decay)
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  params, state, want = start, tx.init(start), list(start.values())
  for _ in range(20):
    grads = {k: (rng.standard_t(3, size=p.shape) + 0.5 * p).astype(np.float32) for k, p in zip(start, want)}
    params, state = step(params, state, grads)
    want = oracle.step(want, list(grads.values()), lr)
    for name, expected in zip(start, want):
      moved = np.linalg.norm(expected - start[name])
      assert np.linalg.norm(np.asarray(params[name]) - expected) <= 1e-5 * moved, name
  assert sum(x.nbytes for x in jax.tree.leaves(state)) >= 8 * sum(p.size for p in start.values())


def test_blockwise_adam_entry_turns_the_trust_ratio_off():
  # trust_scale 0: r = 1 whatever the norms, so the first step is -lr * m / (sqrt(v) + eps) with m = 0.1 g and
  # v = 0.001 g^2 (no bias correction), here for a leaf whose norm ratio alone would scale it by far less.
  tx = make_optimizer("lamb16_blockwise_adam", 1e-3, 0.0)
  params = {"w": np.full(300, 3.0, np.float32)}
  updates, _ = tx.update({"w": np.full(300, 2.0, np.float32)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-3 * 0.2 / (np.sqrt(0.004) + 1e-6), rtol=1e-6)
