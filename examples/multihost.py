"""The data-parallel example across `jax.distributed` processes, launched as N local processes by one command.

  python examples/multihost.py --processes 2 --devices-per-process 2 --optimizers onebit_adam --epochs 1

Each process owns `--devices-per-process` CPU devices; the mesh's "data" axis spans all of them, so the 1-bit
exchange runs over XLA's cross-process CPU collectives (gloo). On a real cluster, start one process per host with
the coordinator address of process 0 instead of the local launcher (the worker half of this script is unchanged).
Other flags are those of examples/data_parallel.py.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys


def launch(args, rest: list[str]) -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, __file__, "--coordinator", f"127.0.0.1:{port}", "--processes",
                             str(args.processes), "--process-id", str(i), *rest], env=env)
           for i in range(args.processes)]
  codes = [proc.wait() for proc in procs]
  return max(codes, key=abs)


def work(args, rest: list[str]) -> None:
  import jax
  jax.distributed.initialize(args.coordinator, num_processes=args.processes, process_id=args.process_id)
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  import data_parallel
  import dp_common

  dp_args = data_parallel.parse_args(rest)
  world = jax.device_count()
  mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = dp_common.load_data(dp_args.train_samples)
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  runs = [data_parallel.train(name, dp_args, mesh, data, log=log) for name in dp_args.optimizers.split(",") if name]
  if jax.process_index() == 0:
    dp_common.report(runs, dp_args.out, processes=jax.process_count(), devices=world)
  jax.distributed.shutdown()


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  args, rest = parser.parse_known_args()
  if args.process_id is None:
    sys.exit(launch(args, rest))
  work(args, rest)


if __name__ == "__main__":
  main()
