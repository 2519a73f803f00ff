"""Non-finite gradients on ONE rank: with `optax_lamb16.apply_if_finite` every rank skips the step together.

For every optimizer, run A puts a NaN into rank 1's gradient at step SKIPPED (an inf at step SKIPPED + 3), run B
simply never sees those two batches. A must keep params and state unchanged at the bad steps and end bitwise equal
to B (params and the wrapped optimizer's state), on every rank.

  one device:      python nonfinite_worker.py --out D --single        (the bad values are then on the only rank)
  shard_map:       python nonfinite_worker.py --out D                 (all local devices)
  jax.distributed: python nonfinite_worker.py --out D --coordinator 127.0.0.1:PORT --num-processes 2 --process-id K
  MPI:             mpirun -n 2 python nonfinite_worker.py --out D --mpi
"""

import sys

import numpy as np

from tests.workers import launch
from tests.workers.optimizers import ALL_OPTIMIZERS, STEPS, make_optimizer

SKIPPED = 6  # a step of the compressed phase of 1-bit Adam and 1-bit LAMB, and of 0/1 Adam's variance phase


def check_skips_together(name: str, world: int, mesh=None, comm=None, rank: int = 0) -> list[str]:
  """Runs A and B (see the module docstring) for optimizer `name`; returns what went wrong."""
  import jax

  import optax_lamb16
  from tests import onebit_harness as h

  params, x, y, noise = h.make_problem(world, STEPS)
  bad_rank = min(1, world - 1)
  bad = {n: a.copy() for n, a in noise.items()}
  bad["w"][SKIPPED, bad_rank, 0, 0] = np.nan
  bad["b"][SKIPPED + 3, bad_rank, 0] = np.inf
  good = {n: np.delete(a, [SKIPPED, SKIPPED + 3], axis=0) for n, a in noise.items()}
  if comm is not None:  # MPI: this process is one rank and holds only its own data
    x, y = x[rank : rank + 1], y[rank : rank + 1]
    bad, good = ({n: a[:, rank : rank + 1] for n, a in tree.items()} for tree in (bad, good))

  def make_tx(c):
    return optax_lamb16.apply_if_finite(make_optimizer(name, c), max_consecutive_errors=3, comm=c)

  problems = []
  final = {}
  for label, noise_run in (("A", bad), ("B", good)):
    run = h.Stepper(make_tx, params, mesh, per_rank_params=name == "zero_one_adam" and mesh is not None, comm=comm)
    xs, ys = run.put(x, h.P("data")), run.put(y, h.P("data"))
    p, s = run.params, run.state
    for t in range(noise_run["b"].shape[0]):
      new_p, new_s = jax.block_until_ready(run.step(p, s, xs, ys, run.noise(noise_run, t)))
      if label == "A" and t in (SKIPPED, SKIPPED + 3):
        if not (h.same_bits(new_p, p) and h.same_bits(new_s.inner_state, s.inner_state)):
          problems.append(f"{name}: step {t} with a non-finite gradient on rank {bad_rank} changed params/state")
        if bool(new_s.last_finite):
          problems.append(f"{name}: step {t} was not flagged as non-finite")
      p, s = new_p, new_s
    final[label] = (p, s.inner_state)
  if not h.same_bits(final["A"], final["B"]):
    problems.append(f"{name}: the run with skipped steps differs from the run without those batches")
  return problems


def main():
  parser = launch.worker_arguments(__doc__)
  parser.add_argument("--single", action="store_true", help="one device, no shard_map, comm=None")
  args = parser.parse_args()

  import jax

  if args.coordinator:
    jax.distributed.initialize(
      args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      coordinator_bind_address=args.coordinator,  # the coordinator has no authentication: loopback only
    )
  from tests import onebit_harness as h

  problems = []
  if args.mpi:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    for name in ALL_OPTIMIZERS:
      problems += check_skips_together(name, comm.Get_size(), comm=comm, rank=comm.Get_rank())
  else:
    mesh = None if args.single else h.host_mesh()
    for name in ALL_OPTIMIZERS:
      problems += check_skips_together(name, 1 if args.single else jax.device_count(), mesh)
  if args.coordinator:
    jax.distributed.shutdown()
  if problems:
    sys.exit("\n".join(problems))


if __name__ == "__main__":
  main()
