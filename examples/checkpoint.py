"""Checkpoint and resume with `optax_lamb16.Checkpointer`: rerun the same command and it continues, exactly.

Trains an MLP on MNIST with data-parallel 1-bit Adam on 2 host devices and saves params and the whole optimizer state
every `--every` steps. That state includes each rank's own error-feedback buffer, which the 1-bit exchange needs to
continue where it stopped; `Checkpointer` saves each rank's part and checks on restore that the job has as many
ranks. When the checkpoint directory holds a checkpoint, the script restores the newest one and continues from
there; the batch of each step depends only on the step number, so a resumed run ends bitwise where a run that never
stopped ends (the script prints a fingerprint of the final params to compare). Needs the `checkpoint` extra
(orbax-checkpoint). From the repository root:

  python examples/checkpoint.py --checkpoint-dir /tmp/ckpt --steps 100   # interrupt it (Ctrl-C) after step 40 ...
  python examples/checkpoint.py --checkpoint-dir /tmp/ckpt --steps 100   # ... and it resumes from step 40
"""

import argparse
import hashlib
import os
import pathlib

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--checkpoint-dir", required=True)
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--every", type=int, default=20, help="save a checkpoint every this many steps")
args = parser.parse_args()
DEVICES = 2
# XLA reads the number of host devices when jax starts: ask for them before importing it.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import optax_lamb16  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "mnist.npz"


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden, self.out = nnx.Linear(784, 256, rngs=rngs), nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


with np.load(DATA) as data:
  x_train, y_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255, data["y_train"].astype(np.int32)

graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)


def loss_fn(params, batch):
  logits = nnx.merge(graphdef, params)(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:DEVICES])
# A warm-up of a fifth of the steps (at least 10); mode and mask_zero_variance: see examples/data_parallel.py.
freeze_step = max(10, args.steps // 5)
tx = optax_lamb16.onebit_adam(1e-3, comm="data", freeze_step=freeze_step, mode="drop_in", mask_zero_variance=True)
dp = optax_lamb16.data_parallel(loss_fn, tx, mesh, "data")
params, opt_state = dp.init(params)  # fresh, and the target a checkpoint is restored into (structure and layout)

checkpoints = optax_lamb16.Checkpointer(args.checkpoint_dir, max_to_keep=2)
start = 0
if checkpoints.latest_step() is not None:
  restored = checkpoints.restore({"params": params, "opt_state": opt_state}, world_size=dp.world_size)
  params, opt_state, start = restored["params"], restored["opt_state"], checkpoints.restored_step
  print(f"resumed from the checkpoint of step {start}", flush=True)

for step in range(start, args.steps):
  index = np.random.default_rng(step).integers(0, len(x_train), 64)  # step t's batch, whenever step t runs
  params, opt_state, loss = dp.step(params, opt_state, {"x": x_train[index], "y": y_train[index]})
  jax.block_until_ready(loss)  # one step at a time: CPU collectives dispatched back to back can deadlock
  if (step + 1) % args.every == 0 or step + 1 == args.steps:
    checkpoints.save(step + 1, {"params": params, "opt_state": opt_state}, world_size=dp.world_size)
    print(f"step {step + 1}: train loss {float(loss):.4f}, saved", flush=True)
checkpoints.close()

# To compare with another run: a resumed run ends with the fingerprint of the run that never stopped.
fingerprint = hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params))).hexdigest()
print(f"done: step {args.steps}, params fingerprint {fingerprint[:16]}")
