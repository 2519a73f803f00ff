"""Faults as they happen in multi-host jobs: one dead worker, a hung worker, kills at any moment.

- A SIGKILLed worker of `experiments/mnist_multihost.py`: the launcher kills the others and exits non-zero within the
  bound, naming the dead process and the checkpoint the same command resumes from; that command then resumes there.
- A hung worker (SIGSTOP: no crash, no closed connection): `jax.distributed`'s heartbeat terminates the others.
- A 2-process run (1-bit Adam and 0/1 Adam side by side) SIGKILLed at 5 seeded random moments, one inside a save,
  restarted by the same command each time, ends bitwise equal to an uninterrupted run.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from optax_lamb16._checkpointing import step_directories
from tests.workers import soak_worker

# They time how fast a fault is noticed: run alone (`make test` runs the serial tests after the others).
pytestmark = pytest.mark.serial

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOAK = ROOT / "tests" / "workers" / "soak_worker.py"
DEAD_WORKER_BOUND_S = 60  # the launcher must exit this soon after a worker dies


def _env(devices: int | None = None) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _cached_env(directory: pathlib.Path) -> dict:
  # Restarts share compiled programs (JAX's persistent cache): each restart pays start-up, not compilation.
  return dict(
    _env(),
    JAX_COMPILATION_CACHE_DIR=str(directory / "jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )


class Job:
  """A command in its own process group, its merged output collected line by line as it comes."""

  def __init__(self, command: list[str], env: dict | None = None, timeout: float = 300):
    self.proc = subprocess.Popen(
      command,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      cwd=ROOT,
      env=env or _env(),
      start_new_session=True,
    )
    self.lines: list[str] = []
    self._new = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    self._watchdog = threading.Timer(timeout, self.kill)
    self._watchdog.daemon = True
    self._watchdog.start()

  def _read(self):
    for line in self.proc.stdout:
      with self._new:
        self.lines.append(line.rstrip("\n"))
        self._new.notify_all()
    with self._new:
      self._new.notify_all()

  def wait_for(self, predicate, timeout: float = 120) -> str | None:
    """The first line (old or new) for which `predicate` holds; None if the job ends or `timeout` passes first."""
    deadline, seen = time.monotonic() + timeout, 0
    with self._new:
      while True:
        for line in self.lines[seen:]:
          if predicate(line):
            return line
        seen = len(self.lines)
        if not self._reader.is_alive() or time.monotonic() > deadline:
          return None
        self._new.wait(0.05)

  def kill(self):
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  def finish(self, timeout: float = 300) -> tuple[int, str]:
    code = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    self._watchdog.cancel()
    return code, "\n".join(self.lines)


# -- one dead worker of experiments/mnist_multihost.py ------------------------------------------------------------

EVERY, KILL_AFTER = 4, 4  # checkpoint every 4 steps (of 16); kill process 1 once the checkpoint of step 4 is complete


def multihost_command(directory: pathlib.Path) -> list[str]:
  return [
    sys.executable,
    "-m",
    "experiments.mnist_multihost",
    "--processes",
    "2",
    "--devices-per-process",
    "1",
    "--optimizers",
    "zero_one_adam",
    "--train-samples",
    "1024",
    "--global-batch",
    "64",
    "--epochs",
    "1",
    "--freeze-fraction",
    "0.3",
    "--eps",
    "1e-5",
    "--checkpoint-every",
    str(EVERY),
    "--checkpoint-dir",
    str(directory / "checkpoints"),
    "--out",
    str(directory / "out"),
  ]


@pytest.mark.slow
def test_a_dead_worker_stops_the_job_with_a_message_naming_it_and_where_the_same_command_resumes(tmp_path):
  # (That resuming is exact, whatever the moment of the kill, is the soak test's below.)
  killed = Job(multihost_command(tmp_path), env=_cached_env(tmp_path))
  started = killed.wait_for(lambda line: line.startswith("[launcher] started processes"))
  assert started, killed.finish()[1][-3000:]
  worker_1 = int(re.search(r"1 \(pid (\d+)\)", started).group(1))
  checkpoints = tmp_path / "checkpoints" / "zero_one_adam"
  deadline = time.monotonic() + 240
  while KILL_AFTER not in step_directories(checkpoints) and killed.proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  os.kill(worker_1, signal.SIGKILL)  # mid-step: process 0 is left inside a collective with a dead peer
  died = time.monotonic()
  code, output = killed.finish(timeout=DEAD_WORKER_BOUND_S + 30)
  took = time.monotonic() - died
  assert code != 0 and took <= DEAD_WORKER_BOUND_S, (code, took, output[-3000:])
  assert f"process 1 of 2 (pid {worker_1}) was killed by SIGKILL" in output, output[-3000:]
  assert "Killed the others: 0." in output, output[-3000:]
  resume = max(step_directories(checkpoints))
  assert resume >= KILL_AFTER and not (tmp_path / "out" / "results.json").exists(), "not killed mid-way"
  assert f"zero_one_adam: from the checkpoint of step {resume} ({checkpoints / str(resume)})" in output, output

  code, output = Job(multihost_command(tmp_path), env=_cached_env(tmp_path)).finish()  # the same command again
  assert code == 0 and f"resumed from the checkpoint of step {resume}" in output, output[-3000:]


# -- a hung worker: jax.distributed's heartbeat ---------------------------------------------------------------------

HEARTBEAT_S = 4


@pytest.mark.slow
@pytest.mark.parametrize("hung", [1, 0])  # 0 is the coordinator
def test_a_hung_worker_is_detected_by_the_heartbeat_and_the_others_terminate(hung, tmp_path):
  # No launcher here, as on a cluster: the workers alone must not wait for ever inside a collective.
  from tests.workers import launch

  port = launch.free_port()
  workers = [
    Job(
      [
        sys.executable,
        str(SOAK),
        "--out",
        str(tmp_path),
        "--steps",
        "2000",
        "--every",
        "100000",
        "--processes",
        "2",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--process-id",
        str(i),
        "--heartbeat-timeout",
        str(HEARTBEAT_S),
      ],
      env=_env(devices=1),
      timeout=120,
    )
    for i in range(2)
  ]
  try:
    watch = workers[0]  # process 0 prints the steps
    assert watch.wait_for(lambda line: line == "step 20"), watch.finish()[1][-3000:]
    os.kill(workers[hung].proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    survivor = workers[1 - hung]
    code, output = survivor.finish(timeout=HEARTBEAT_S + 40)
    took = time.monotonic() - stopped
  finally:
    for job in workers:
      job.kill()
  assert code != 0 and took <= HEARTBEAT_S + 30, (code, took, output[-3000:])
  assert "heartbeat" in output.lower() or "distributed service detected fatal errors" in output, output[-3000:]


# -- kills at any moment ----------------------------------------------------------------------------------------------

SOAK_SEED, SOAK_STEPS, SOAK_EVERY, KILLS = 15, 200, 10, 5


def soak_command(directory: pathlib.Path) -> list[str]:
  return [
    sys.executable,
    str(SOAK),
    "--out",
    str(directory),
    "--steps",
    str(SOAK_STEPS),
    "--every",
    str(SOAK_EVERY),
    "--devices-per-process",
    "1",
  ]


def _step_line(line: str, word: str) -> int | None:
  match = re.fullmatch(rf"{word} (\d+)", line)
  return int(match.group(1)) if match else None


@pytest.mark.slow
def test_a_run_killed_at_5_random_moments_ends_bitwise_as_the_uninterrupted_run(tmp_path):
  from tests import onebit_harness as h

  rng = np.random.default_rng(SOAK_SEED)
  in_save = int(rng.integers(KILLS))  # which kill lands inside a save
  checkpoints = tmp_path / "checkpoints"
  segment = (SOAK_STEPS - SOAK_EVERY) // KILLS  # kill k lands in the k-th part of the run, after a random step
  latest = 0
  for k in range(KILLS):
    target = k * segment + int(rng.integers(1, segment + 1))
    jitter = float(rng.uniform(0.0, 0.03))
    job = Job(soak_command(tmp_path), env=_cached_env(tmp_path))
    if k == in_save:
      save = -(-max(target, latest + 1) // SOAK_EVERY) * SOAK_EVERY
      print(f"kill {k}: inside the save of step {save}", flush=True)
      assert job.wait_for(lambda line: _step_line(line, "saving") == save), job.finish()[1][-3000:]
      temporary = lambda: [p for p in checkpoints.glob(f"{save}.orbax-checkpoint-tmp*")]
      while not temporary() and job.proc.poll() is None:
        time.sleep(0.001)
      job.kill()
      code, output = job.finish()
      assert temporary() and save not in step_directories(checkpoints), f"kill {k} missed the save of step {save}"
    else:
      print(f"kill {k}: {jitter * 1e3:.1f} ms after step {target}", flush=True)
      assert job.wait_for(lambda line: (_step_line(line, "step") or 0) >= target), job.finish()[1][-3000:]
      time.sleep(jitter)
      job.kill()
      code, output = job.finish()
    assert code == -signal.SIGKILL and "done" not in output.splitlines(), output[-3000:]
    resumed = [_step_line(line, "resumed from step") for line in output.splitlines() if "resumed" in line]
    assert resumed == ([latest] if latest else []), (k, resumed, latest)  # where the previous kill left it
    latest = max(step_directories(checkpoints), default=0)
  code, output = Job(soak_command(tmp_path), env=_cached_env(tmp_path)).finish()  # the same command, to the end
  assert code == 0 and f"resumed from step {latest}" in output, output[-3000:]

  # The uninterrupted run: the same steps in this process, over 2 of its devices (bitwise the 2-process run).
  mesh = h.host_mesh(2)
  runs, data, noise, tree = soak_worker.make_runs(mesh, SOAK_STEPS)
  for t in range(SOAK_STEPS):
    tree = soak_worker.step_all(runs, data, noise, tree, t)
  want = soak_worker.shards(tree)
  got = {**np.load(tmp_path / "final" / "process0.npz"), **np.load(tmp_path / "final" / "process1.npz")}
  assert sorted(got) == sorted(want)
  assert all(np.isfinite(a).all() for a in want.values() if a.dtype.kind == "f")
  different = [key for key in want if want[key].tobytes() != got[key].tobytes()]
  assert not different, different
