"""The 1-bit optimizers give the same trajectory from `shard_map` in one process, from 2 `jax.distributed`
processes x 2 devices (gloo on 127.0.0.1), and from `mpirun -n 2` with the MPI backend (to float32 rounding: the
exact all-reduces of different backends may sum in different orders)."""

import pathlib

import numpy as np
import pytest

from tests import onebit_harness as h
from tests.workers import launch
from tests.workers.optimizers import NAMES_OF_OPTIMIZERS, STEPS, make_optimizer

WORKER = pathlib.Path(__file__).parent / "workers" / "optimizer_worker.py"


def single_process(world):
  problem = h.make_problem(world, STEPS)
  return {
    name: h.run_jax(lambda comm: make_optimizer(name, comm), world, *problem, per_rank_params=name == "zero_one_adam")
    for name in NAMES_OF_OPTIMIZERS
  }


def assert_same(directory, world, want):
  for name in NAMES_OF_OPTIMIZERS:
    for rank in range(world):
      got = np.load(directory / f"{name}_rank{rank}.npz")
      for leaf in h.NAMES:
        np.testing.assert_allclose(
          got[leaf], want[name][leaf][rank], rtol=1e-5, atol=1e-6, err_msg=f"{name}, rank {rank}, leaf {leaf}"
        )


@pytest.mark.slow
@pytest.mark.serial
def test_two_jax_distributed_processes_match_one_process(tmp_path):
  launch.run_distributed(WORKER, ["--out", str(tmp_path)], num_processes=2, devices_per_process=2)
  assert_same(tmp_path, 4, single_process(4))


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(launch.mpirun_executable() is None, reason="no mpirun (install the `mpi` extra)")
def test_mpirun_two_ranks_match_shard_map(tmp_path):
  launch.run_mpi(WORKER, ["--mpi", "--out", str(tmp_path)], num_ranks=2)
  assert_same(tmp_path, 2, single_process(2))
