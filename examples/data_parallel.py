"""Data-parallel training with 1-bit communication: `optax_lamb16.data_parallel` and 1-bit Adam on N devices.

Each device (a rank) differentiates its own slice of the global batch; the optimizer averages over the ranks itself,
with exact float32 all-reduces during a short warm-up and then a compressed exchange of 1 bit per element.
`optax_lamb16.data_parallel(loss_fn, tx, mesh)` builds that step: `jax.shard_map` over the mesh's "data" axis, each
rank's own gradients, the optimizer's communication and the layout of its per-rank state. The model is a Flax NNX
MLP, split into its graph and its params (`nnx.split`) and merged back inside the loss (`nnx.merge`).

On a CPU the devices are host devices: the script asks XLA for `--devices` of them before importing jax (unless
XLA_FLAGS is set already). Run it from the repository root (MNIST is read from examples/data/mnist.npz):

  python examples/data_parallel.py                             # 1-bit Adam on 4 devices
  python examples/data_parallel.py --optimizer zero_one_adam   # or onebit_lamb, or lamb16_1bit
  python examples/data_parallel.py --devices 8 --steps 600

`lamb16_1bit` puts the compressed gradient mean (`optax_lamb16.compressed_mean`) in front of an optimizer that does
not communicate itself, here LAMB16: float8 optimizer state and 1-bit communication together.
"""

import argparse
import os
import pathlib

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument(
  "--optimizer", default="onebit_adam", choices=["onebit_adam", "zero_one_adam", "onebit_lamb", "lamb16_1bit"]
)
parser.add_argument("--steps", type=int, default=300)
args = parser.parse_args()
# XLA reads the number of host devices when jax starts: ask for them before importing it.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import optax_lamb16  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "mnist.npz"


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(784, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def make_optimizer(name: str) -> optax.GradientTransformation:
  freeze_step = max(10, args.steps // 5)  # the warm-up (exact all-reduces): a fifth of the steps, at least 10
  # mask_zero_variance: a ReLU unit that never fires has v = 0 exactly, and the 1-bit momentum divided by it would
  # throw its weights away. mode="drop_in": Adam's (LAMB's) own rule and learning rate; the default is DeepSpeed's.
  onebit = dict(comm="data", mode="drop_in", mask_zero_variance=True)
  if name == "onebit_adam":
    return optax_lamb16.onebit_adam(1e-3, freeze_step=freeze_step, **onebit)
  if name == "zero_one_adam":  # after its warm-up, also skips whole exchanges: local steps between syncs
    return optax_lamb16.zero_one_adam(1e-3, var_freeze_step=freeze_step, **onebit)
  if name == "onebit_lamb":
    return optax_lamb16.onebit_lamb(1e-2, freeze_step=freeze_step, **onebit)
  return optax.chain(optax_lamb16.compressed_mean("data"), optax_lamb16.lamb16(1e-2))  # lamb16_1bit


with np.load(DATA) as data:
  x_train, y_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255, data["y_train"].astype(np.int32)
  x_test, y_test = data["x_test"].reshape(-1, 784).astype(np.float32) / 255, data["y_test"].astype(np.int32)

graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)


def loss_fn(params, batch):  # the loss of one rank's slice of the global batch
  logits = nnx.merge(graphdef, params)(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


if jax.device_count() < args.devices:
  raise SystemExit(
    f"asked for {args.devices} devices, jax sees {jax.device_count()} (XLA_FLAGS={os.environ['XLA_FLAGS']!r})"
  )
mesh = jax.make_mesh(
  (args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[: args.devices]
)
dp = optax_lamb16.data_parallel(loss_fn, make_optimizer(args.optimizer), mesh, "data")
params, opt_state = dp.init(params)  # 0/1 Adam keeps one copy of the params per rank: init lays them out

rng = np.random.default_rng(0)
for step in range(args.steps):
  index = rng.integers(0, len(x_train), 32 * args.devices)  # the global batch: 32 examples per rank
  params, opt_state, loss = dp.step(params, opt_state, {"x": x_train[index], "y": y_train[index]})
  jax.block_until_ready(loss)  # one step at a time: CPU collectives dispatched back to back can deadlock
  if step % 50 == 0 or step == args.steps - 1:
    print(f"step {step:4d}: train loss {float(loss):.4f}", flush=True)

model = nnx.merge(graphdef, dp.unstack_params(params))  # rank 0's params (0/1 Adam's ranks agree at each sync)
accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
print(f"{args.optimizer} on {args.devices} devices: test accuracy {accuracy:.4f}")
