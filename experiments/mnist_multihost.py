"""experiments/mnist_data_parallel.py across `jax.distributed` processes, launched as N local processes by one command.

  python -m experiments.mnist_multihost --processes 2 --devices-per-process 2 --optimizers onebit_adam --epochs 1

Each process owns `--devices-per-process` CPU devices; the mesh's "data" axis spans all of them, so the 1-bit
exchange runs over XLA's cross-process CPU collectives (gloo). On a real cluster, start one process per host with
the coordinator address of process 0 instead of the local launcher (the worker half of this script is unchanged).
Other flags are those of experiments/mnist_data_parallel.py.

Failures. The launcher watches its processes: when one dies (a crash, the OOM killer, SIGKILL), it kills the others
at once and exits non-zero with a message naming the dead process and the checkpoint step that the same command
resumes from (with `--checkpoint-dir`). Without a launcher (a real cluster), `jax.distributed`'s own failure
detection does it: a process whose peer died gets an error from the collective it is in (gloo and NCCL notice a
closed connection) or, for a peer that hangs or whose host vanished, is terminated by the coordination service once
the peer has sent no heartbeat for `--heartbeat-timeout` seconds. `--shutdown-timeout` bounds how long a process
that finished (or failed) waits at exit for the others, `--initialization-timeout` how long they wait for each
other at start-up.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

POLL_S = 0.1  # how often the launcher looks at its processes


def distributed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The flags of the launcher and its workers (`launch` passes them on, plus each worker's place)."""
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=2)
  parser.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=10,
    help="seconds without a heartbeat after which jax.distributed declares a process dead and "
    "terminates the others (jax's default: 100)",
  )
  parser.add_argument(
    "--shutdown-timeout",
    type=int,
    default=60,
    help="seconds a finished process waits at exit for the others (jax's default: 300)",
  )
  parser.add_argument(
    "--initialization-timeout",
    type=int,
    default=120,
    help="seconds the processes wait for each other at start-up (jax's default: 300)",
  )
  parser.add_argument("--coordinator", help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  return parser


def initialize(args) -> None:
  """`jax.distributed.initialize` with the failure-detection timeouts of `args` (call it before anything else)."""
  import jax

  # Process 0's coordinator listens on the address given (it has no authentication), not on every interface.
  jax.distributed.initialize(
    args.coordinator,
    num_processes=args.processes,
    process_id=args.process_id,
    coordinator_bind_address=args.coordinator,
    heartbeat_timeout_seconds=args.heartbeat_timeout,
    shutdown_timeout_seconds=args.shutdown_timeout,
    initialization_timeout=args.initialization_timeout,
  )


def _die_with_launcher() -> None:  # in each child, before exec: SIGKILL it if the launcher itself dies
  if sys.platform.startswith("linux"):
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _how(code: int) -> str:
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with code {code}"


def _stop(procs: list[subprocess.Popen]) -> None:
  # SIGKILL, not SIGTERM: jax.distributed catches SIGTERM (as a preemption notice) and the process goes on waiting
  # in its collective. Nothing is lost: checkpoints are atomic, and a half-written one is never used.
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
  for proc in procs:
    proc.wait()


def resume_report(checkpoint_dirs: dict[str, pathlib.Path]) -> str:
  """Where the same command resumes: the newest checkpoint of each directory, and whether it is intact."""
  if not checkpoint_dirs:
    return "There is no --checkpoint-dir: the same command starts over from step 0."
  from optax_lamb16._checkpointing import newest_intact_step, step_directories

  lines = []
  for name, directory in checkpoint_dirs.items():
    steps = sorted(step_directories(directory))
    intact, damaged = newest_intact_step(directory)
    if not steps:
      lines.append(f"  {name}: no checkpoint in {directory} yet: it starts from step 0")
    elif not damaged:
      lines.append(f"  {name}: from the checkpoint of step {steps[-1]} ({directory / str(steps[-1])})")
    else:
      lines.append(
        f"  {name}: its newest checkpoint is DAMAGED ({damaged[0]}); the newest intact one is step "
        f"{intact}, where it resumes"
      )
  return "The same command resumes\n" + "\n".join(lines)


def launch(
  module: str,
  argv: list[str],
  processes: int,
  devices_per_process: int,
  checkpoint_dirs: dict[str, pathlib.Path] | None = None,
) -> int:
  """Runs `processes` local `jax.distributed` processes of `python -m module` (each gets `argv` plus its place)
  until all succeed (returns 0) or one fails: then kills the others at once, prints which process failed and where
  the same command resumes (from `checkpoint_dirs`, {name: directory}), and returns non-zero."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", module, *argv, "--coordinator", f"127.0.0.1:{port}", "--process-id", str(i)],
      env=env,
      preexec_fn=_die_with_launcher,
    )
    for i in range(processes)
  ]
  print(
    "[launcher] started processes " + ", ".join(f"{i} (pid {p.pid})" for i, p in enumerate(procs)),
    file=sys.stderr,
    flush=True,
  )
  stop = lambda signum, frame: sys.exit(128 + signum)
  previous = signal.signal(signal.SIGTERM, stop)
  failed, running = [], []
  try:
    while True:
      codes = [proc.poll() for proc in procs]
      failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
      running = [i for i, code in enumerate(codes) if code is None]
      if failed or not running:
        break
      time.sleep(POLL_S)
  finally:  # also on SIGTERM / Ctrl-C of the launcher: no process outlives it
    _stop(procs)
    signal.signal(signal.SIGTERM, previous)
  if not failed:
    return 0
  dead = "; ".join(f"process {i} of {processes} (pid {procs[i].pid}) {_how(procs[i].returncode)}" for i in failed)
  stopped = f". Killed the others: {', '.join(map(str, running))}." if running else "."
  print(f"\n[launcher] {dead}{stopped}\n{resume_report(checkpoint_dirs or {})}", file=sys.stderr, flush=True)
  first = procs[failed[0]].returncode
  return 128 - first if first < 0 else first


def work(args, rest: list[str]) -> None:
  initialize(args)
  import jax

  from experiments import dp_common
  from experiments import mnist_data_parallel as data_parallel

  dp_args = data_parallel.parse_args(rest)
  world = jax.device_count()
  mesh = jax.make_mesh((world,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  data = dp_common.load_data(dp_args.train_samples, dp_args.test_samples)
  log = print if jax.process_index() == 0 else (lambda *a, **k: None)
  runs = [data_parallel.train(name, dp_args, mesh, data, log=log) for name in dp_args.optimizers.split(",") if name]
  if jax.process_index() == 0:
    dp_common.report(runs, dp_args.out, processes=jax.process_count(), devices=world)
  jax.distributed.shutdown()


def main():
  parser = distributed_arguments(
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  )
  args, rest = parser.parse_known_args()
  if args.process_id is None:
    from experiments import mnist_data_parallel as data_parallel

    dp_args = data_parallel.parse_args(rest)
    dirs = (
      {name: pathlib.Path(dp_args.checkpoint_dir) / name for name in dp_args.optimizers.split(",") if name}
      if dp_args.checkpoint_dir
      else {}
    )
    sys.exit(launch("experiments.mnist_multihost", sys.argv[1:], args.processes, args.devices_per_process, dirs))
  work(args, rest)


if __name__ == "__main__":
  main()
