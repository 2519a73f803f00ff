"""One process of a multi-process run of the 1-bit optimizers on the harness problem; saves its ranks' trajectories.

jax.distributed: python optimizer_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id K --out D
MPI:             mpirun -n 2 python optimizer_worker.py --mpi --out D
"""

import pathlib

import numpy as np

from tests.workers import launch
from tests.workers.optimizers import NAMES_OF_OPTIMIZERS, STEPS, make_optimizer


def main():
  parser = launch.worker_arguments(__doc__)
  args = parser.parse_args()

  import jax

  if not args.mpi:
    jax.distributed.initialize(
      args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      coordinator_bind_address=args.coordinator,  # the coordinator has no authentication: loopback only
    )
  from tests import onebit_harness as h

  out = pathlib.Path(args.out)
  if args.mpi:
    from mpi4py import MPI

    rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    problem = h.make_problem(world, STEPS)
    for name in NAMES_OF_OPTIMIZERS:
      trajectory = h.run_mpi_rank(make_optimizer(name, MPI.COMM_WORLD), rank, *problem)
      np.savez(out / f"{name}_rank{rank}.npz", **trajectory)
    return

  world = jax.device_count()
  mesh = h.host_mesh(world)
  problem = h.make_problem(world, STEPS)
  for name in NAMES_OF_OPTIMIZERS:
    f = h.trajectory_fn(lambda comm: make_optimizer(name, comm), mesh, per_rank_params=name == "zero_one_adam")
    trajectory = jax.block_until_ready(f(*h.global_inputs(mesh, *problem)))
    for shard_index in range(len(trajectory["w"].addressable_shards)):
      rank = trajectory["w"].addressable_shards[shard_index].index[0].start
      np.savez(
        out / f"{name}_rank{rank}.npz",
        **{n: np.asarray(trajectory[n].addressable_shards[shard_index].data)[0] for n in h.NAMES},
      )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
