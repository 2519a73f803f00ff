"""Exact resume, checked in fresh processes: `--phase run` trains every optimizer uninterrupted for STEPS steps,
saving a checkpoint at each of its SAVE_STEPS and the final tree; `--phase resume` (a NEW process) restores each of
those checkpoints, trains on to STEPS and checks that params and state are bitwise the uninterrupted run's.

  one device:      python resume_worker.py --phase run --out D --single
  shard_map:       python resume_worker.py --phase run --out D            (all local devices)
  jax.distributed: python resume_worker.py --phase run --out D --coordinator 127.0.0.1:PORT --num-processes 2
                   --process-id K
"""

import pathlib
import sys

from tests.workers import launch
from tests.workers.optimizers import ALL_OPTIMIZERS, SAVE_STEPS, STEPS, make_optimizer


def main():
  parser = launch.worker_arguments(__doc__)
  parser.add_argument("--phase", choices=("run", "resume"), required=True)
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
  import optax_lamb16
  from tests import onebit_harness as h

  mesh = None if args.single else h.host_mesh()
  world = 1 if args.single else jax.device_count()
  problem_params, x, y, noise = h.make_problem(world, STEPS)
  failures = []
  for name in ALL_OPTIMIZERS:
    run = h.Stepper(
      lambda comm: make_optimizer(name, comm),
      problem_params,
      mesh,
      per_rank_params=name == "zero_one_adam" and not args.single,
    )
    xs, ys = run.put(x, h.P("data")), run.put(y, h.P("data"))
    directory = pathlib.Path(args.out) / name
    checkpoints = optax_lamb16.Checkpointer(directory / "steps", max_to_keep=None)
    final = optax_lamb16.Checkpointer(directory / "final")

    def train(params, state, start):
      for t in range(start, STEPS):
        if args.phase == "run" and t in SAVE_STEPS[name]:
          checkpoints.save(t, {"params": params, "opt_state": state}, world_size=world)
        params, state = jax.block_until_ready(run.step(params, state, xs, ys, run.noise(noise, t)))
      return {"params": params, "opt_state": state}

    if args.phase == "run":
      final.save(STEPS, train(run.params, run.state, 0), world_size=world)
    else:
      template = {"params": run.params, "opt_state": run.state}
      want = final.restore(template, world_size=world)
      for k in SAVE_STEPS[name]:
        resumed = checkpoints.restore(template, world_size=world, step=k)
        got = train(resumed["params"], resumed["opt_state"], k)
        paths = jax.tree_util.tree_flatten_with_path(got)[0]
        for (path, a), b in zip(paths, jax.tree.leaves(want)):
          if not h.same_bits(a, b):
            failures.append(f"{name} resumed at {k}: {jax.tree_util.keystr(path)} differs")
    checkpoints.close()
    final.close()
  if args.coordinator:
    jax.distributed.shutdown()
  if failures:
    sys.exit("NOT bitwise equal:\n" + "\n".join(failures))


if __name__ == "__main__":
  main()
