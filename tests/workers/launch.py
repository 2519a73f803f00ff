"""Starting the multi-process runs of the tests: N `jax.distributed` processes on 127.0.0.1, or `mpirun -n N`."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def worker_arguments(description: str):
  """The command line every multi-process worker takes (see `run_distributed` and `run_mpi`)."""
  import argparse

  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--coordinator")
  parser.add_argument("--num-processes", type=int)
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--mpi", action="store_true")
  parser.add_argument("--out", required=True)
  return parser


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


def run_process(script: pathlib.Path, args: list[str], devices: int = 4, timeout: float = 300) -> None:
  """Runs `script` in one fresh process with `devices` host devices; raises with its output if it fails."""
  completed = subprocess.run(
    [sys.executable, str(script), *args], env=_env(devices), capture_output=True, text=True, timeout=timeout
  )
  if completed.returncode != 0:
    raise AssertionError(
      f"{script.name} failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )


def run_distributed(
  script: pathlib.Path, args: list[str], num_processes: int = 2, devices_per_process: int = 2, timeout: float = 300
) -> None:
  """Runs `script` as `num_processes` jax.distributed processes; raises with their output if any fails."""
  port = free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(script),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        str(num_processes),
        "--process-id",
        str(pid),
        *args,
      ],
      env=_env(devices_per_process),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(num_processes)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      proc.kill()
  if any(proc.returncode != 0 for proc in procs):
    raise AssertionError("a jax.distributed process failed:\n" + "\n----\n".join(o[-3000:] for o in outputs))


def mpirun_executable() -> str | None:
  venv_bin = pathlib.Path(sys.executable).parent
  candidate = venv_bin / "mpirun"
  return str(candidate) if candidate.exists() else shutil.which("mpirun")


def run_mpi(script: pathlib.Path, args: list[str], num_ranks: int = 2, timeout: float = 300) -> str:
  """Runs `mpirun -n num_ranks python script args` with one CPU device per rank; returns its output."""
  mpirun = mpirun_executable()
  env = _env(1)
  env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
  env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
  completed = subprocess.run(
    [mpirun, "-n", str(num_ranks), "--oversubscribe", sys.executable, str(script), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if completed.returncode != 0:
    raise AssertionError(
      f"mpirun failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    )
  return completed.stdout
