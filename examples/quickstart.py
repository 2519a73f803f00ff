"""LAMB16 in a Flax NNX training loop: Adam's accuracy on MNIST with a quarter of Adam's optimizer state.

`optax_lamb16.lamb16` is LAMB with both moments stored in float8: 2 bytes of optimizer state per parameter, where
Adam keeps 8. It is an `optax.GradientTransformation`, so it goes wherever `optax.adam` goes, here into
`nnx.Optimizer`. The script trains the same convnet from the same initial weights on the same batches, once with
LAMB16 and once with Adam, and prints the test accuracy and the optimizer-state bytes of each.

Run it from the repository root (about a minute on 2 CPU cores; MNIST is read from examples/data/mnist.npz):

  python examples/quickstart.py
  python examples/quickstart.py --steps 1000
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_lamb16

DATA = pathlib.Path(__file__).parent / "data" / "mnist.npz"


class ConvNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.fc1 = nnx.Linear(7 * 7 * 32, 128, rngs=rngs)
    self.fc2 = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    pool = lambda y: nnx.max_pool(y, (2, 2), strides=(2, 2))
    x = pool(nnx.relu(self.conv1(x)))
    x = pool(nnx.relu(self.conv2(x)))
    return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def load_mnist():
  """Train and test images, (N, 28, 28, 1) float32 in [0, 1], and their int32 labels."""
  with np.load(DATA) as data:
    images = {split: (data[f"x_{split}"].astype(np.float32) / 255)[..., None] for split in ("train", "test")}
    labels = {split: data[f"y_{split}"].astype(np.int32) for split in ("train", "test")}
  return images["train"], labels["train"], images["test"], labels["test"]


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)  # the optimizer's step, applied to the model's nnx.Param variables
  return loss


@nnx.jit
def count_correct(model, x, y):
  return jnp.sum(jnp.argmax(model(x), axis=-1) == y)


def train(tx, steps, data):
  """Trains a fresh ConvNet with `tx`; returns (test accuracy, bytes of the optimizer state)."""
  x_train, y_train, x_test, y_test = data
  model = ConvNet(nnx.Rngs(0))  # the same initial weights for every optimizer ...
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(0)  # ... and the same batches
  for step in range(steps):
    index = rng.integers(0, len(x_train), 128)
    loss = train_step(model, optimizer, x_train[index], y_train[index])
    if step % 100 == 0 or step == steps - 1:
      print(f"  step {step:4d}: train loss {float(loss):.4f}", flush=True)
  correct = sum(
    int(count_correct(model, x_test[i : i + 1000], y_test[i : i + 1000])) for i in range(0, len(x_test), 1000)
  )
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)))
  return correct / len(x_test), state_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=400, help="train steps (batch 128) per optimizer")
  args = parser.parse_args()

  data = load_mnist()
  num_params = sum(p.size for p in jax.tree.leaves(nnx.state(ConvNet(nnx.Rngs(0)), nnx.Param)))
  print(f"ConvNet: {num_params:,} parameters, {args.steps} steps per optimizer")
  optimizers = {
    "lamb16": optax_lamb16.lamb16(1e-2, weight_decay=1e-2),  # the learning rate of the LAMB16 reference's MNIST run
    "adam": optax.adam(1e-3),
  }
  for name, tx in optimizers.items():
    print(f"{name}:", flush=True)
    accuracy, state_bytes = train(tx, args.steps, data)
    print(
      f"{name}: test accuracy {accuracy:.4f}, optimizer state {state_bytes:,} bytes "
      f"({state_bytes / num_params:.2f} per parameter)",
      flush=True,
    )


if __name__ == "__main__":
  main()
