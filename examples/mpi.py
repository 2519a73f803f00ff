"""The data-parallel MNIST example over MPI (mpi4jax): one process and one device per rank.

  mpirun -n 2 python examples/mpi.py --optimizers onebit_adam,zero_one_adam,onebit_lamb --epochs 1

(As root, Open MPI also wants OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1, and --oversubscribe for
more ranks than cores.) Every optimizer gets `comm=MPI.COMM_WORLD`; each rank differentiates on its slice of the
global batch and the optimizer does the communication inside `jax.jit`. No `shard_map` here: each process holds its
own copy of the params (identical on all ranks for all but 0/1 Adam between syncs). Other flags are those of
examples/data_parallel.py (except --devices).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).parent))


def train(name: str, args, comm, data, log) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx

  import dp_common
  import mnist_common

  rank, world = comm.Get_rank(), comm.Get_size()
  if args.global_batch % world:
    raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the {world} ranks")
  local_batch = args.global_batch // world
  total_steps = dp_common.steps_per_epoch(len(data["x_train"]), args.global_batch) * args.epochs
  if args.max_steps is not None:
    total_steps = min(total_steps, args.max_steps)
  tx = dp_common.make_optimizer(name, comm, args.lr, total_steps, args.freeze_fraction, args.weight_decay,
                                mask_zero_variance=not args.faithful, eps=args.eps)
  graphdef, params = nnx.split(mnist_common.ReferenceConvNet(nnx.Rngs(args.seed)), nnx.Param)
  num_params = mnist_common.count_params(params)
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: jnp.mean(mnist_common.cross_entropy(nnx.merge(graphdef, p)(x), y))
    loss, grads = jax.value_and_grad(loss_fn)(params)  # this rank's local gradients
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, started, count = [], time.perf_counter(), 0
  for index in dp_common.batches(len(data["x_train"]), args.global_batch, args.epochs, args.seed):
    if count >= total_steps:
      break
    mine = index[rank * local_batch:(rank + 1) * local_batch]
    params, opt_state, loss = step(params, opt_state, data["x_train"][mine], data["y_train"][mine])
    losses.append(float(loss))
    count += 1
  test_loss, test_accuracy = mnist_common.make_evaluator(graphdef)(params, data["x_test"], data["y_test"])
  # Are the ranks' params identical? (bitwise for all but 0/1 Adam, which agrees at syncs to rounding)
  flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])
  spread = float(np.max(np.abs(np.stack(comm.allgather(flat)) - flat)))
  log(f"{name:>20}: test accuracy {test_accuracy:.4f}, loss {test_loss:.4f}, max param difference across ranks "
      f"{spread:.3g}")
  return {"optimizer": name, "ranks": world, "global_batch": args.global_batch, "steps": count,
          "final_test_accuracy": test_accuracy, "final_test_loss": test_loss, "max_param_spread": spread,
          "seconds": round(time.perf_counter() - started, 1),
          **dp_common.bytes_sent(name, num_params, world, count, args.freeze_fraction)}


def main(argv=None):
  from mpi4py import MPI

  import data_parallel
  import dp_common

  args = data_parallel.parse_args(argv)
  comm = MPI.COMM_WORLD
  log = print if comm.Get_rank() == 0 else (lambda *a, **k: None)
  data = dp_common.load_data(args.train_samples)
  runs = [train(name, args, comm, data, log) for name in args.optimizers.split(",") if name]
  if comm.Get_rank() == 0:
    dp_common.report(runs, args.out, ranks=comm.Get_size())


if __name__ == "__main__":
  main()
