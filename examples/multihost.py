"""One process of a multi-host job: `jax.distributed` first, then data-parallel 1-bit Adam over every process's devices.

Start one such process per host (or several on one machine), all with the same coordinator address (host:port of
process 0) and process count, each with its own process id. `jax.distributed.initialize` must run before anything
else uses jax: it joins the processes into one job, after which `jax.devices()` lists the devices of all of them and
`optax_lamb16.data_parallel` trains over all of them as in examples/data_parallel.py; the 1-bit exchange then crosses
the network (on CPUs, XLA's cross-process collectives; on GPUs, NCCL).

Two processes on this machine (one CPU device each), from the repository root:

  python examples/multihost.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
  python examples/multihost.py --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1

Every process prints a fingerprint of its copy of the params: 1-bit Adam keeps them identical on all ranks.

Security: the coordinator (a gRPC service that process 0 opens on the given port) has no authentication; anyone who
can reach the port can join or disrupt the job. Bind it to a private interface (127.0.0.1, or the cluster's private
network), never to a public one.
"""

import argparse
import hashlib
import pathlib

import jax

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--coordinator", required=True, help="host:port of process 0, the same for every process")
parser.add_argument("--num-processes", type=int, required=True)
parser.add_argument("--process-id", type=int, required=True)
parser.add_argument("--steps", type=int, default=200)
args = parser.parse_args()
# First: every later use of jax (devices, arrays, compilation) must see the whole job. Process 0's coordinator
# listens on the given address only (the default would be every interface).
jax.distributed.initialize(
  args.coordinator,
  num_processes=args.num_processes,
  process_id=args.process_id,
  coordinator_bind_address=args.coordinator,
)

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


with np.load(DATA) as data:  # every process reads the data set; each feeds its own part of each batch
  x_train, y_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255, data["y_train"].astype(np.int32)
  x_test, y_test = data["x_test"].reshape(-1, 784).astype(np.float32) / 255, data["y_test"].astype(np.int32)

graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)  # the same seed: the same initial params everywhere


def loss_fn(params, batch):  # one rank's slice of the global batch
  logits = nnx.merge(graphdef, params)(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


world = jax.device_count()  # the devices of all processes
mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
# A warm-up of a fifth of the steps (at least 10); mode and mask_zero_variance: see examples/data_parallel.py.
freeze_step = max(10, args.steps // 5)
tx = optax_lamb16.onebit_adam(1e-3, comm="data", freeze_step=freeze_step, mode="drop_in", mask_zero_variance=True)
dp = optax_lamb16.data_parallel(loss_fn, tx, mesh, "data")
params, opt_state = dp.init(params)

rng = np.random.default_rng(0)  # the same seed everywhere: every process draws the same global batches
for step in range(args.steps):
  index = rng.integers(0, len(x_train), 32 * world)
  mine = np.array_split(index, jax.process_count())[jax.process_index()]  # this process's part of the batch
  params, opt_state, loss = dp.step(params, opt_state, {"x": x_train[mine], "y": y_train[mine]})
  jax.block_until_ready(loss)  # one step at a time: CPU collectives dispatched back to back can deadlock
  if jax.process_index() == 0 and (step % 50 == 0 or step == args.steps - 1):
    print(f"step {step:4d}: train loss {float(loss):.4f}", flush=True)

# The params are replicated: each process holds a whole copy on each of its devices.
local = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), params)
fingerprint = hashlib.sha256(b"".join(leaf.tobytes() for leaf in jax.tree.leaves(local))).hexdigest()[:16]
logits = nnx.merge(graphdef, local)(x_test)
accuracy = float(np.mean(np.argmax(logits, axis=-1) == y_test))
print(
  f"process {jax.process_index()} of {jax.process_count()} ({world} devices in all): test accuracy "
  f"{accuracy:.4f}, params fingerprint {fingerprint}",
  flush=True,
)
jax.distributed.shutdown()
