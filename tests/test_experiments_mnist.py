"""The MNIST comparison (experiments/mnist.py), end to end on a few steps, and its data loader."""

import functools
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from experiments import mnist_common
from experiments.optimizers import make_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@functools.cache
def untrained_test_loss(seed: int, test_samples: int | None = None) -> float:
  """The loss on the first `test_samples` test images (all by default) of the experiments' convnet as `seed`
  initialises it, before any step."""
  from flax import nnx

  graphdef, params = nnx.split(mnist_common.ReferenceConvNet(nnx.Rngs(seed)), nnx.Param)
  data = mnist_common.load_mnist()
  x, y = data["x_test"][:test_samples], data["y_test"][:test_samples]
  return mnist_common.make_evaluator(graphdef)(params, x, y)[0]


TEST_SAMPLES = 1000  # evaluating on all 10,000 test images took most of the end-to-end run


@pytest.mark.slow
def test_mnist_end_to_end(tmp_path):
  command = [
    sys.executable,
    "-m",
    "experiments.mnist",
    "--optimizers",
    "adam,lamb16",
    "--batch-size",
    "64,32",
    "--lr",
    "0.003",
    "--weight-decay",
    "0.01",
    "--epochs",
    "2",
    "--max-steps",
    "8",
    "--train-samples",
    "320",
    "--test-samples",
    str(TEST_SAMPLES),
    "--seed",
    "1",
    "--out",
    str(tmp_path),
  ]
  completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "lamb16" in completed.stdout and "test acc" in completed.stdout  # the final table

  results = json.loads((tmp_path / "results.json").read_text())
  runs = results["runs"]
  assert [(r["optimizer"], r["batch_size"]) for r in runs] == [
    ("adam", 64),
    ("lamb16", 64),
    ("adam", 32),
    ("lamb16", 32),
  ]
  required = {
    "optimizer",
    "batch_size",
    "lr",
    "weight_decay",
    "epochs",
    "seed",
    "final_test_accuracy",
    "final_test_loss",
    "train_loss_curve",
    "test_curve",
    "seconds",
    "optimizer_state_bytes",
  }
  untrained = untrained_test_loss(seed=1, test_samples=TEST_SAMPLES)
  for run in runs:
    assert required <= set(run), required - set(run)
    assert run["steps"] == 8 and run["num_params"] == 431_080
    # 320 training images: batch 64 takes 5 steps in epoch 1 and 3 in epoch 2; batch 32 stops inside epoch 1.
    assert [p["samples"] for p in run["train_loss_curve"]] == [run["batch_size"] * k for k in range(1, 9)]
    assert [p["epoch"] for p in run["test_curve"]] == ([1, 2] if run["batch_size"] == 64 else [1])
    # 8 steps train every optimizer: test accuracy well above chance (0.1), test loss below the untrained model's.
    name = (run["optimizer"], run["batch_size"])
    assert run["final_test_accuracy"] > 0.3, (name, run["final_test_accuracy"])
    assert run["final_test_loss"] < untrained - 0.05, (name, run["final_test_loss"], untrained)
    assert run["test_curve"][-1]["test_loss"] == pytest.approx(run["final_test_loss"])
    assert 0.0 <= run["dead_fc1_units"] < 1.0
    if run["optimizer"] == "lamb16":  # where the float8 state loses elements, per leaf, at the end
      per_leaf = run["final_float8_health_per_leaf"]
      assert len(per_leaf) == 8 and any("fc1" in name and "kernel" in name for name in per_leaf)
      assert all(set(f) == {"mu_saturated", "mu_zero", "nu_inf", "nu_zero"} for f in per_leaf.values())
  state_bytes = {r["optimizer"]: r["optimizer_state_bytes"] for r in runs if r["batch_size"] == 64}
  assert state_bytes["adam"] >= 8 * 431_080
  assert state_bytes["lamb16"] <= 2 * 431_080 + 16 * 8 + 16

  for batch_size in (64, 32):
    png = (tmp_path / f"mnist_batch{batch_size}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_loads_idx_files_like_the_npz(tmp_path):
  with np.load(mnist_common.DEFAULT_DATA) as archive:
    raw = {key: archive[key][:50] for key in ("x_train", "y_train", "x_test", "y_test")}
  np.savez(tmp_path / "small.npz", **raw)
  idx_dir = tmp_path / "idx"
  idx_dir.mkdir()
  _write_idx(idx_dir / "train-images-idx3-ubyte", raw["x_train"])
  _write_idx(idx_dir / "train-labels-idx1-ubyte", raw["y_train"])
  _write_idx(idx_dir / "t10k-images-idx3-ubyte", raw["x_test"])
  _write_idx(idx_dir / "t10k-labels-idx1-ubyte", raw["y_test"])
  from_npz, from_idx = mnist_common.load_mnist(tmp_path / "small.npz"), mnist_common.load_mnist(idx_dir)
  for key in from_npz:
    np.testing.assert_array_equal(from_npz[key], from_idx[key])
  assert from_npz["x_train"].shape == (50, 28, 28, 1) and from_npz["x_train"].dtype == np.float32
  # Normalised with the reference's mean and std.
  np.testing.assert_allclose(from_npz["x_train"][0, 0, 0, 0], (0 - 0.1307) / 0.3081, rtol=1e-6)


def test_shipped_data_is_the_full_mnist():
  with np.load(mnist_common.DEFAULT_DATA) as archive:
    assert archive["x_train"].shape == (60000, 28, 28) and archive["x_test"].shape == (10000, 28, 28)
    assert sorted(np.unique(archive["y_test"]).tolist()) == list(range(10))


def test_reference_model_has_431080_parameters():
  from flax import nnx

  model = mnist_common.ReferenceConvNet(nnx.Rngs(0))
  assert mnist_common.count_params(nnx.state(model, nnx.Param)) == 431_080


def test_dead_hidden_units_counts_fc1_units_silent_on_every_image():
  from flax import nnx

  graphdef, params = nnx.split(mnist_common.ReferenceConvNet(nnx.Rngs(0)), nnx.Param)
  x = mnist_common.load_mnist()["x_test"][:50]
  # A bias of -1e6 silences a unit on every image; +1e6 keeps it on.
  params["fc1"]["bias"][...] = params["fc1"]["bias"][...].at[:100].set(-1e6).at[100:].set(1e6)
  assert mnist_common.dead_hidden_units(graphdef, params, x, batch_size=16) == pytest.approx(0.2)


def test_pytorch_lamb_matches_a_hand_worked_first_step():
  import jax.numpy as jnp

  tx = make_optimizer("pytorch_lamb", lr=0.01, weight_decay=0.01)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4), "big": jnp.full(4, 100.0)}
  grads = {"w": jnp.full((3, 4), 0.5), "b": jnp.ones(4), "big": jnp.ones(4)}
  updates, _ = tx.update(grads, tx.init(params), params)
  # No bias correction: m = 0.1 g, v = 0.001 g^2, so u = m / (sqrt(v) + eps) is about sqrt(10) per element.
  # w: the trust ratio |p| / |u| makes every element move by lr exactly (u is constant over the leaf).
  np.testing.assert_allclose(updates["w"], -0.01, rtol=1e-6)
  # b: |p| = 0 gives a trust ratio of 1, so the step is lr * u.
  np.testing.assert_allclose(updates["b"], -0.01 * np.sqrt(10.0) * (1 - 1e-6 / np.sqrt(1e-3)), rtol=1e-6)
  # big: |p| = 200 is clamped to 10, so the step is lr * 10 / |u| * u = lr * 10 / 2 per element.
  np.testing.assert_allclose(updates["big"], -0.01 * 10 / 2, rtol=1e-6)
