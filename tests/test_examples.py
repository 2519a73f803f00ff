"""The scripts of examples/, run as a user runs them (a fresh process each), on a few steps: they train, the
1-bit optimizers' ranks agree, and a resumed run ends bitwise where the uninterrupted one does."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.workers import launch

EXAMPLES = launch.ROOT / "examples"


def _env() -> dict:
  # Each example chooses its own number of host devices; not the 8 of this test process.
  env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
  return dict(env, JAX_PLATFORMS="cpu")


def run_example(name: str, *args: str, timeout: float = 300) -> str:
  completed = subprocess.run(
    [sys.executable, str(EXAMPLES / name), *args],
    cwd=launch.ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
  return completed.stdout


def train_losses(output: str) -> list[float]:
  return [float(loss) for loss in re.findall(r"step +\d+: train loss ([\d.]+)", output)]


def test_quickstart():
  output = run_example("quickstart.py", "--steps", "10")
  results = {
    name: (float(accuracy), int(state.replace(",", "")))
    for name, accuracy, state in re.findall(
      r"^(\w+): test accuracy ([\d.]+), optimizer state ([\d,]+) bytes", output, re.M
    )
  }
  assert sorted(results) == ["adam", "lamb16"], output
  num_params = int(re.search(r"ConvNet: ([\d,]+) parameters", output).group(1).replace(",", ""))
  for name, (accuracy, _) in results.items():
    assert accuracy > 0.5, (name, accuracy)  # chance: 0.1
  assert results["lamb16"][1] <= 2.01 * num_params  # float8 m and v, plus a few scales
  assert results["adam"][1] >= 8 * num_params  # float32 m and v


@pytest.mark.parametrize("optimizer", ["onebit_adam", "zero_one_adam", "onebit_lamb", "lamb16_1bit"])
def test_data_parallel(optimizer):
  output = run_example("data_parallel.py", "--devices", "2", "--steps", "20", "--optimizer", optimizer)
  losses = train_losses(output)
  assert len(losses) == 2 and losses[-1] < losses[0] - 0.5, output
  accuracy = float(re.search(rf"{optimizer} on 2 devices: test accuracy ([\d.]+)", output).group(1))
  assert accuracy > 0.5, accuracy


def test_checkpoint_resumes_bitwise(tmp_path):
  args = ["--checkpoint-dir", str(tmp_path), "--steps", "20", "--every", "5"]
  uninterrupted = run_example("checkpoint.py", *args)
  assert "resumed" not in uninterrupted
  # As if the job had died after the checkpoint of step 15 (steps 11-15 were 1-bit steps: it holds error feedback):
  # the same command resumes there and must end where the run that never stopped ended.
  shutil.rmtree(tmp_path / "20")
  resumed = run_example("checkpoint.py", *args)
  assert "resumed from the checkpoint of step 15" in resumed, resumed
  fingerprint = lambda output: re.search(r"done: step 20, params fingerprint (\w+)", output).group(1)
  assert fingerprint(resumed) == fingerprint(uninterrupted)


@pytest.mark.slow
@pytest.mark.serial
def test_multihost():
  port = launch.free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(EXAMPLES / "multihost.py"),
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(i),
        "--steps",
        "20",
      ],
      cwd=launch.ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  assert [proc.returncode for proc in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
  losses = train_losses(outputs[0])  # process 0 prints them
  assert len(losses) == 2 and losses[-1] < losses[0] - 0.5, outputs[0]
  results = [re.search(r"test accuracy ([\d.]+), params fingerprint (\w+)", output).groups() for output in outputs]
  assert results[0][1] == results[1][1]  # 1-bit Adam: the same params on both processes
  assert float(results[0][0]) > 0.5, results


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(launch.mpirun_executable() is None, reason="no mpirun (install the `mpi` extra)")
def test_mpi():
  output = launch.run_mpi(EXAMPLES / "mpi.py", ["--steps", "20"], num_ranks=2)
  losses = train_losses(output)
  assert len(losses) == 2 and losses[-1] < losses[0] - 0.5, output
  accuracy, identical = re.search(
    r"2 ranks: test accuracy ([\d.]+); params identical on every rank: (\w+)", output
  ).groups()
  assert identical == "True" and float(accuracy) > 0.5, output
