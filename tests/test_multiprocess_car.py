"""The compressed all-reduce gives the same numbers across processes: 2 jax.distributed processes x 2 devices (gloo on
127.0.0.1) and `mpirun -n 2` with the MPI backend, against the single-process `shard_map` run on the same inputs."""

import pathlib

import numpy as np
import pytest

from tests.test_compressed_allreduce import run_calls
from tests.workers import launch
from tests.workers.inputs import random_inputs

WORKER = pathlib.Path(__file__).parent / "workers" / "car_worker.py"
CALLS, N = 12, 1000


def collect(directory: pathlib.Path, world: int) -> np.ndarray:
  return np.stack([np.load(directory / f"rank{r}.npy") for r in range(world)])


@pytest.mark.slow
@pytest.mark.serial
def test_two_jax_distributed_processes_match_one_process(tmp_path):
  launch.run_distributed(
    WORKER, ["--out", str(tmp_path), "--calls", str(CALLS), "--n", str(N)], num_processes=2, devices_per_process=2
  )
  got = collect(tmp_path, 4)
  want, _ = run_calls(random_inputs(4, CALLS, N))
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(launch.mpirun_executable() is None, reason="no mpirun (install the `mpi` extra)")
def test_mpirun_two_ranks_match_shard_map(tmp_path):
  launch.run_mpi(WORKER, ["--mpi", "--out", str(tmp_path), "--calls", str(CALLS), "--n", str(N)], num_ranks=2)
  got = collect(tmp_path, 2)
  want, _ = run_calls(random_inputs(2, CALLS, N))
  np.testing.assert_array_equal(got[0], got[1])
  np.testing.assert_array_equal(got, want)
  assert (tmp_path / "dtypes_ok0").exists() and (tmp_path / "dtypes_ok1").exists()  # bf16/f16/float8 bitcast path
