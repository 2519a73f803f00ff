"""The random-kill soak's training run: 2 `jax.distributed` processes (1 device each) train 1-bit Adam and 0/1 Adam
side by side on the harness problem for --steps steps, checkpoint both every --every steps and, when a checkpoint
exists, resume from it; so after a kill at any moment the same command continues. At the end each process writes
the final params and optimizer states (its shards) to OUT/final/process<K>.npz.

  python -m tests.workers.soak_worker --out D --steps 200 --every 5     (launches its 2 processes and supervises
                                                                         them with experiments/mnist_multihost.py's
                                                                         launcher)

Process 0 prints "step N" after each step and "saving N" before each save, for the test to time its kills.
"""

import argparse
import pathlib
import sys

from experiments import mnist_multihost as multihost  # the launcher and jax.distributed's timeouts

NAMES = ("onebit_adam", "zero_one_adam")  # 0/1 Adam: per-rank params and momenta between syncs


def parse_args(argv=None):
  parser = multihost.distributed_arguments(argparse.ArgumentParser(description=__doc__))
  parser.add_argument("--out", required=True)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--every", type=int, default=5)
  return parser.parse_args(argv)


def make_runs(mesh, steps: int):
  """The two optimizers' `Stepper`s on the harness problem, their data, the noise of every step, and the tree a
  checkpoint holds: {name: {"params", "opt_state"}}."""
  from tests import onebit_harness as h
  from tests.workers.optimizers import make_optimizer

  params, x, y, noise = h.make_problem(mesh.shape["data"], steps)
  runs = {
    name: h.Stepper(
      lambda comm, name=name: make_optimizer(name, comm), params, mesh, per_rank_params=name == "zero_one_adam"
    )
    for name in NAMES
  }
  data = {name: (run.put(x, h.P("data")), run.put(y, h.P("data"))) for name, run in runs.items()}
  tree = {name: {"params": run.params, "opt_state": run.state} for name, run in runs.items()}
  return runs, data, noise, tree


def step_all(runs, data, noise, tree, t: int):
  """Step t of both optimizers, one program at a time (CPU collectives must not overlap)."""
  import jax

  new = {}
  for name, run in runs.items():
    params, state = run.step(tree[name]["params"], tree[name]["opt_state"], *data[name], run.noise(noise, t))
    new[name] = jax.block_until_ready({"params": params, "opt_state": state})
  return new


def shards(tree) -> dict:
  """{"<leaf path> <shard index>": the shard} for the shards of `tree` this process holds."""
  import jax
  import numpy as np

  return {
    f"{jax.tree_util.keystr(path)} {shard.index}": np.asarray(shard.data)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    for shard in leaf.addressable_shards
  }


def train(args) -> None:
  multihost.initialize(args)
  import jax
  import numpy as np

  import optax_lamb16
  from tests import onebit_harness as h

  out = pathlib.Path(args.out)
  mesh = h.host_mesh()
  world = mesh.shape["data"]
  runs, data, noise, tree = make_runs(mesh, args.steps)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  checkpoints = optax_lamb16.Checkpointer(out / "checkpoints", max_to_keep=2)
  start = 0
  if checkpoints.latest_step() is not None:
    tree = checkpoints.restore(tree, world_size=world, fallback=True)
    start = checkpoints.restored_step
    say(f"resumed from step {start}", flush=True)
  for t in range(start, args.steps):
    tree = step_all(runs, data, noise, tree, t)
    say(f"step {t + 1}", flush=True)
    if (t + 1) % args.every == 0:
      say(f"saving {t + 1}", flush=True)
      checkpoints.save(t + 1, tree, world_size=world)
  checkpoints.close()
  (out / "final").mkdir(parents=True, exist_ok=True)
  np.savez(out / "final" / f"process{jax.process_index()}.npz", **shards(tree))
  say("done", flush=True)
  jax.distributed.shutdown()


def main():
  args = parse_args()
  if args.process_id is None:
    sys.exit(
      multihost.launch(
        "tests.workers.soak_worker",
        sys.argv[1:],
        args.processes,
        args.devices_per_process,
        {"onebit_adam, zero_one_adam": pathlib.Path(args.out) / "checkpoints"},
      )
    )
  train(args)


if __name__ == "__main__":
  main()
