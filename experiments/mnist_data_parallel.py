"""Data-parallel MNIST on N devices with `jax.shard_map`: Adam/LAMB/LAMB16 baselines and the 1-bit optimizers.

  python -m experiments.mnist_data_parallel --devices 8 --optimizers onebit_adam,onebit_adam_exact --epochs 3

On a CPU the N devices are host devices (XLA_FLAGS is set before jax is imported). Each rank computes gradients on
its slice of the global batch; the optimizer does the data-parallel communication (an exact all-reduce for the
baselines and `*_exact` counterparts, the 1-bit compressed exchange for the others). Prints test accuracy and the
bytes each rank sent; writes OUT/results.json. `lamb16_1bit` is LAMB16 fed by the compressed gradient mean: float8
optimizer state and 1-bit communication together.

With `--checkpoint-dir DIR` it saves params and the whole optimizer state every `--checkpoint-every` steps and, when
DIR holds a checkpoint, resumes from it exactly: after a crash, rerun the same command.

`optax_lamb16.data_parallel(loss_fn, tx, mesh)` builds the step (shard_map over "data", each rank's own gradients,
the optimizer's communication, the per-rank state's layout, donation); its `init` lays out the params and state
(0/1 Adam's params are kept one copy per rank: they drift apart between syncs). examples/data_parallel.py is the
short version to copy from.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--optimizers", default="adam,onebit_adam,zero_one_adam,onebit_lamb,lamb16_1bit")
  parser.add_argument("--global-batch", type=int, default=256)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument(
    "--weight-decay",
    type=float,
    default=0.0,
    help="adam's is an L2 term in the gradient (torch.optim.Adam), the others' decoupled",
  )
  parser.add_argument("--eps", type=float, default=1e-8, help="eps of adam, lamb and the 1-bit optimizers")
  parser.add_argument("--freeze-fraction", type=float, default=0.2, help="1-bit warm-up, as a fraction of steps")
  parser.add_argument(
    "--faithful",
    action="store_true",
    help="1-bit optimizers exactly as DeepSpeed (no mask_zero_variance: diverges on this ReLU net)",
  )
  parser.add_argument("--max-steps", type=int, default=None)
  parser.add_argument("--train-samples", type=int, default=None, help="train on the first N images")
  parser.add_argument("--test-samples", type=int, default=None, help="evaluate on the first N images (for tests)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--checkpoint-dir",
    default=None,
    help="save params and optimizer state here every --checkpoint-every steps, and resume from "
    "the latest checkpoint when it exists (rerun the same command after a crash)",
  )
  parser.add_argument("--checkpoint-every", type=int, default=50)
  parser.add_argument("--save-params", action="store_true", help="also write OUT/<optimizer>_params.npz")
  parser.add_argument("--out", default="out/data_parallel")
  return parser.parse_args(argv)


def train(name: str, args, mesh, data, log=print) -> dict:
  """Trains the reference convnet with optimizer `name` over `mesh`'s "data" axis; returns the run's record."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import optax_lamb16
  from experiments import dp_common, mnist_common
  from experiments.optimizers import freeze_at, make_optimizer

  world = mesh.shape["data"]
  if args.global_batch % world:
    raise ValueError(f"--global-batch {args.global_batch} must be a multiple of the {world} devices")
  num_train = len(data["x_train"])
  total_steps = dp_common.steps_per_epoch(num_train, args.global_batch) * args.epochs
  if args.max_steps is not None:
    total_steps = min(total_steps, args.max_steps)
  tx = make_optimizer(
    name,
    args.lr,
    args.weight_decay,
    comm="data",
    freeze_step=freeze_at(args.freeze_fraction, total_steps),
    eps=args.eps,
    mask_zero_variance=not args.faithful,
  )
  graphdef, params = nnx.split(mnist_common.ReferenceConvNet(nnx.Rngs(args.seed)), nnx.Param)
  num_params = mnist_common.count_params(params)

  def loss_fn(params, batch):  # one rank's slice of the batch
    return jnp.mean(mnist_common.cross_entropy(nnx.merge(graphdef, params)(batch["x"]), batch["y"]))

  # The step: shard_map over "data", gradients of each rank's own slice, the optimizer's communication, donation.
  dp = optax_lamb16.data_parallel(loss_fn, tx, mesh, "data")
  params, opt_state = dp.init(params)  # 0/1 Adam: one copy of the params per rank

  def put(array):  # each process's part of the global batch (the whole of it in a one-process job)
    return jax.make_array_from_callback(array.shape, dp.batch_sharding, lambda index: array[index])

  evaluate = mnist_common.make_evaluator(graphdef)
  checkpoints, step_count = None, 0
  if args.checkpoint_dir:  # the whole training state, per-rank error feedback included: resuming is exact
    checkpoints = optax_lamb16.Checkpointer(pathlib.Path(args.checkpoint_dir) / name, max_to_keep=2)
    if checkpoints.latest_step() is not None:
      # fallback: a damaged newest checkpoint (cut short by a copy, flipped bytes) resumes from the newest intact one.
      restored = checkpoints.restore({"params": params, "opt_state": opt_state}, world_size=world, fallback=True)
      params, opt_state, step_count = restored["params"], restored["opt_state"], checkpoints.restored_step
      log(f"{name:>20} resumed from the checkpoint of step {step_count}")
  losses, started = [], time.perf_counter()
  for seen, index in enumerate(dp_common.batches(num_train, args.global_batch, args.epochs, args.seed)):
    if seen < step_count:  # replay the data order up to the resumed step
      continue
    if step_count >= total_steps:
      break
    batch = {"x": put(data["x_train"][index]), "y": put(data["y_train"][index])}
    params, opt_state, loss = dp.step(params, opt_state, batch)
    losses.append(float(jax.block_until_ready(loss)))  # one step at a time: CPU collectives must not overlap
    step_count += 1
    if checkpoints and step_count % args.checkpoint_every == 0:
      checkpoints.save(step_count, {"params": params, "opt_state": opt_state}, world_size=world)
    if step_count % 50 == 0:
      log(f"{name:>20} step {step_count}/{total_steps}: train loss {np.mean(losses[-50:]):.4f}")
  seconds = time.perf_counter() - started
  if checkpoints:
    checkpoints.close()
  # Evaluate rank 0's params (0/1 Adam's ranks agree at sync steps and are close in between).
  if jax.process_count() > 1:  # gather what other processes hold
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  eval_params = jax.tree.map(np.asarray, dp.unstack_params(params))
  test_loss, test_accuracy = evaluate(eval_params, data["x_test"], data["y_test"])
  if args.save_params and jax.process_index() == 0:
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(eval_params)[0]
    np.savez(pathlib.Path(args.out) / f"{name}_params.npz", **{jax.tree_util.keystr(p): leaf for p, leaf in flat})
  record = {
    "optimizer": name,
    "devices": world,
    "global_batch": args.global_batch,
    "steps": step_count,
    "epochs": args.epochs,
    "lr": args.lr,
    "eps": args.eps,
    "weight_decay": args.weight_decay,
    "freeze_fraction": args.freeze_fraction,
    "mask_zero_variance": not args.faithful,
    "num_params": num_params,
    "final_test_accuracy": test_accuracy,
    "final_test_loss": test_loss,
    "final_train_loss": float(np.mean(losses[-20:])) if losses else None,
    "seconds": round(seconds, 1),
    **dp_common.bytes_sent(name, num_params, world, step_count, args.freeze_fraction),
  }
  log(
    f"{name:>20}: test accuracy {test_accuracy:.4f}, loss {test_loss:.4f}, "
    f"{record['bytes_sent_per_rank'] / step_count / 1e3:,.1f} kB sent per rank per step"
  )
  return record


def main(argv=None):
  args = parse_args(argv)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  import jax

  from experiments import dp_common

  if jax.device_count() < args.devices:
    raise SystemExit(f"asked for {args.devices} devices, jax sees {jax.device_count()}")
  mesh = jax.make_mesh(
    (args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[: args.devices]
  )
  data = dp_common.load_data(args.train_samples, args.test_samples)
  runs = [train(name, args, mesh, data) for name in args.optimizers.split(",") if name]
  dp_common.report(runs, args.out, jax=jax.__version__, platform=jax.devices()[0].platform, devices=args.devices)
  return runs


if __name__ == "__main__":
  main()
