"""MNIST data and the reference convnet, shared by the experiments.

The model is the pytorch/examples MNIST network that the LAMB16 reference trains (SPEC.md section 1):
conv 1->20 5x5, max-pool 2, conv 20->50 5x5, max-pool 2, dense 800->500, dense 500->10; 431,080 parameters,
initialised as PyTorch initialises them (uniform in +-1/sqrt(fan_in) for kernels and biases).
"""

from __future__ import annotations

import gzip
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_DATA = (
  pathlib.Path(__file__).resolve().parents[1] / "examples" / "data" / "mnist.npz"
)  # the examples read it too
MEAN, STD = 0.1307, 0.3081  # the reference's input normalisation


def _read_idx(path: pathlib.Path) -> np.ndarray:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    _, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
    if dtype_code != 0x08:
      raise ValueError(f"{path}: expected an unsigned-byte IDX file, got type code {dtype_code:#x}")
    shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
    return np.frombuffer(f.read(), np.uint8).reshape(shape)


def _find_idx(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(f"{directory} has no {stem}[.gz]: pass a .npz file or a directory with the four IDX files")


def load_mnist(path: str | pathlib.Path = DEFAULT_DATA) -> dict[str, np.ndarray]:
  """Loads MNIST from a `.npz` (keys x_train, y_train, x_test, y_test) or a directory of the standard IDX files.

  Returns float32 images of shape (N, 28, 28, 1), normalised with the reference's mean and std, and int32 labels.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    raw = {
      "x_train": _read_idx(_find_idx(path, "train-images-idx3-ubyte")),
      "y_train": _read_idx(_find_idx(path, "train-labels-idx1-ubyte")),
      "x_test": _read_idx(_find_idx(path, "t10k-images-idx3-ubyte")),
      "y_test": _read_idx(_find_idx(path, "t10k-labels-idx1-ubyte")),
    }
  else:
    with np.load(path) as archive:
      raw = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
  data = {}
  for split in ("train", "test"):
    images = raw[f"x_{split}"].astype(np.float32) / 255.0
    data[f"x_{split}"] = ((images - MEAN) / STD).reshape(-1, 28, 28, 1)
    data[f"y_{split}"] = raw[f"y_{split}"].astype(np.int32)
  return data


def _torch_uniform(fan_in: int):
  """PyTorch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ReferenceConvNet(nnx.Module):
  """The pytorch/examples MNIST convnet used by the LAMB and LAMB16 references."""

  def __init__(self, rngs: nnx.Rngs):
    def conv(cin, cout):
      fan_in = cin * 25
      return nnx.Conv(
        cin,
        cout,
        (5, 5),
        padding="VALID",
        kernel_init=_torch_uniform(fan_in),
        bias_init=_torch_uniform(fan_in),
        rngs=rngs,
      )

    def dense(din, dout):
      return nnx.Linear(din, dout, kernel_init=_torch_uniform(din), bias_init=_torch_uniform(din), rngs=rngs)

    self.conv1, self.conv2 = conv(1, 20), conv(20, 50)
    self.fc1, self.fc2 = dense(4 * 4 * 50, 500), dense(500, 10)

  def hidden(self, x: jax.Array) -> jax.Array:
    """The 500 activations of fc1, after its ReLU."""
    pool = lambda y: nnx.max_pool(y, (2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    return nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.hidden(x))  # logits; the loss applies log-softmax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example negative log-likelihood of the labels (the reference's log_softmax + nll_loss)."""
  return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def dead_hidden_units(graphdef, params, x: np.ndarray, batch_size: int = 1000) -> float:
  """The fraction of fc1's units whose ReLU output is 0 on every image of `x` (dead units)."""
  hidden = jax.jit(lambda params, x: jnp.max(nnx.merge(graphdef, params).hidden(x), axis=0))
  peak = np.max(
    [np.asarray(hidden(params, x[start : start + batch_size])) for start in range(0, len(x), batch_size)], axis=0
  )
  return float(np.mean(peak == 0))


def make_evaluator(graphdef, batch_size: int = 1000):
  """Returns evaluate(params, x, y) -> (mean loss, accuracy) over the whole set, in fixed-size jitted batches."""

  @jax.jit
  def batch_stats(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return jnp.sum(cross_entropy(logits, y)), jnp.sum(jnp.argmax(logits, axis=1) == y)

  def evaluate(params, x, y):
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
      batch_loss, batch_correct = batch_stats(params, x[start : start + batch_size], y[start : start + batch_size])
      loss_sum += float(batch_loss)
      correct += int(batch_correct)
    return loss_sum / len(x), correct / len(x)

  return evaluate
