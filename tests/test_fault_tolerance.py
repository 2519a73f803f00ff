"""A 2-process jax.distributed training run killed with SIGKILL mid-way, restarted by the same command, ends with
bitwise the parameters of a run that was never interrupted."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVERY, KILL_AFTER = 8, 24  # checkpoint every 8 steps; kill once the checkpoint of step 24 is complete (of 64)


def command(directory: pathlib.Path) -> list[str]:
  return [sys.executable, str(ROOT / "examples" / "multihost.py"), "--processes", "2", "--devices-per-process", "1",
          "--optimizers", "zero_one_adam", "--train-samples", "4096", "--global-batch", "64", "--epochs", "1",
          "--freeze-fraction", "0.3", "--eps", "1e-5", "--checkpoint-every", str(EVERY), "--save-params",
          "--checkpoint-dir", str(directory / "checkpoints"), "--out", str(directory / "out")]


def run(directory: pathlib.Path) -> str:
  done = subprocess.run(command(directory), capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return done.stdout


@pytest.mark.slow
def test_a_killed_run_restarts_from_its_last_checkpoint_and_ends_as_if_never_killed(tmp_path):
  run(tmp_path / "uninterrupted")

  killed = tmp_path / "killed"
  proc = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                          start_new_session=True)  # its own process group: the launcher and both workers
  complete = killed / "checkpoints" / "zero_one_adam" / str(KILL_AFTER)  # Orbax renames it when complete
  deadline = time.monotonic() + 300
  while not complete.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert complete.exists() and not (killed / "out" / "results.json").exists(), "not killed mid-way"

  output = run(killed)  # the same command again
  assert "resumed from the checkpoint of step" in output
  want = np.load(tmp_path / "uninterrupted" / "out" / "zero_one_adam_params.npz")
  got = np.load(killed / "out" / "zero_one_adam_params.npz")
  assert sorted(want) == sorted(got)
  for key in want:
    assert want[key].tobytes() == got[key].tobytes(), key
