"""The data-parallel MNIST experiments end to end (shard_map, jax.distributed), and their communication bill.

The drivers report the bytes each rank sent as (exact steps) x (cost of an exact exchange) + (compressed steps) x
(cost of a compressed exchange), with the step kinds and costs from `experiments/dp_common.py`. Both halves are checked
against the library here, not against dp_common itself: the costs against the bytes of the collectives in the
compiled HLO (read as `benchmarks/comm_volume.py` reads them), the step kinds against the collectives each
optimizer really runs, step by step.
"""

import functools
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from benchmarks import comm_volume
from experiments import dp_common
from experiments.optimizers import freeze_at, make_optimizer
from tests import onebit_harness as h
from tests.test_bad_input import IdenticalRanks
from tests.test_experiments_mnist import untrained_test_loss

ROOT = pathlib.Path(__file__).resolve().parents[1]

MNIST_PARAMS = 431_080
# Enough steps to learn (and to cross the 1-bit warm-up at half of them), short enough for a test.
STEPS, FREEZE_FRACTION = 24, 0.5
TEST_SAMPLES = 1000
SMALL = [
  "--max-steps",
  str(STEPS),
  "--global-batch",
  "64",
  "--train-samples",
  "2048",
  "--freeze-fraction",
  str(FREEZE_FRACTION),
  "--eps",
  "1e-5",
  "--lr",
  "1e-3",
  "--test-samples",
  str(TEST_SAMPLES),
]


# ----------------------------------------------------------------------------------------------------------------------
# The cost of one exchange, from the compiled HLO.


@functools.cache
def hlo_exchange_bytes(world: int) -> dict[str, float]:
  """Bytes one rank sends for one exact (`uncompressed_mean`) and one compressed (`compressed_mean`) exchange of the
  MNIST convnet's gradients over `world` host devices, read off the compiled HLO."""
  params = comm_volume.mnist_params()
  mesh = h.host_mesh(world)
  grads = jax.tree.map(lambda p: jnp.zeros((world, *p.shape), p.dtype), params)  # one row per rank
  costs = {}
  for kind, tx in (
    ("exact", optax_lamb16.uncompressed_mean("data")),
    ("compressed", optax_lamb16.compressed_mean("data")),
  ):
    state = optax_lamb16.sharded_init(tx, params, mesh, "data")
    specs = optax_lamb16.state_partition_specs(state, "data")
    exchange = jax.jit(
      jax.shard_map(
        lambda g, s, tx=tx: tx.update(jax.tree.map(lambda x: x[0], g), s),
        mesh=mesh,
        in_specs=(P("data"), specs),
        out_specs=(P(), specs),
      )
    )
    collectives = comm_volume.collectives_of(exchange.lower(grads, state).compile().as_text(), world)
    assert collectives, kind
    costs[kind] = sum(op["sent_per_rank"] for op in collectives)
  return costs


@pytest.mark.parametrize("world", [2, 4])
def test_exchange_costs_are_what_the_compiled_hlo_sends(world):
  assert sum(x.size for x in jax.tree.leaves(comm_volume.mnist_params())) == MNIST_PARAMS
  measured = hlo_exchange_bytes(world)
  billed = dp_common.exchange_bytes(MNIST_PARAMS, world)
  assert billed["exact"] == pytest.approx(measured["exact"], rel=1e-9)
  assert billed["compressed"] == pytest.approx(measured["compressed"], rel=1e-9)
  assert 0.95 / 32 * measured["exact"] <= measured["compressed"] <= 1.05 / 32 * measured["exact"]


# ----------------------------------------------------------------------------------------------------------------------
# The kind of exchange of each step, from the collectives each optimizer runs.


class RecordingRanks(IdenticalRanks):
  """`size` ranks on one device, all holding this rank's values, that record each collective the running program
  makes (its kind and input bytes): a `jax.debug.callback` runs only in the branch taken."""

  def __init__(self, size):
    super().__init__(size)
    self.calls = []

  def _record(self, kind, x):
    nbytes = math.prod(x.shape) * x.dtype.itemsize
    jax.debug.callback(lambda: self.calls.append((kind, nbytes)))

  def mean(self, x):
    self._record("all-reduce", x)
    return super().mean(x)

  def all_to_all(self, x):
    self._record("all-to-all", x)
    return super().all_to_all(x)

  def all_gather(self, x):
    self._record("all-gather", x)
    return super().all_gather(x)

  def take_calls(self):
    jax.effects_barrier()
    calls, self.calls = sorted(self.calls), []
    return calls


def exchange_signatures(params, comm: RecordingRanks) -> dict:
  """The collectives of one exact and of one compressed exchange of `params`, as the library makes them."""
  signatures = {"none": []}
  for kind, tx in (("exact", optax_lamb16.uncompressed_mean(comm)), ("compressed", optax_lamb16.compressed_mean(comm))):
    jax.block_until_ready(jax.jit(tx.update)(params, tx.init(params)))
    signatures[kind] = comm.take_calls()
  assert signatures["exact"] and signatures["compressed"]
  return signatures


def exchanges_run(name: str, steps: int, world: int = 2) -> list[str]:
  """Runs the optimizer `name` as the MNIST drivers build it for `steps` steps on a small problem; which exchange
  each step made."""
  comm = RecordingRanks(world)
  params, x, y, noise = h.make_problem(1, steps, seed=3)
  params = jax.tree.map(jnp.asarray, params)
  signatures = exchange_signatures(params, comm)
  tx = make_optimizer(name, 1e-3, 0.0, comm=comm, freeze_step=freeze_at(FREEZE_FRACTION, steps), eps=1e-5)
  step = jax.jit(lambda p, s, noise_t: h.noisy_step(tx, p, s, x, y, noise_t, 0))
  state, kinds = tx.init(params), []
  comm.take_calls()
  for t in range(steps):
    params, state = jax.block_until_ready(step(params, state, {n: jnp.asarray(noise[n][t]) for n in h.NAMES}))
    calls = comm.take_calls()
    kinds.append(next((kind for kind, signature in signatures.items() if signature == calls), f"other: {calls}"))
  return kinds


@pytest.mark.parametrize("name", dp_common.OPTIMIZERS)
def test_step_kinds_are_the_exchanges_the_optimizer_makes(name):
  with jax.numpy_dtype_promotion("standard"):  # as the drivers run (optax.adam and optax.lamb need it)
    kinds = exchanges_run(name, STEPS)
  assert kinds == dp_common.exchanges_per_step(name, STEPS, FREEZE_FRACTION)


def test_zero_one_adam_step_kinds_follow_its_interval_doubling():
  """300 steps with DeepSpeed's schedules: the variance interval doubles after 16 variance steps (compressed steps
  in between), then every frozen step syncs (local_step_scaler 32678 keeps the sync interval at 1)."""
  kinds = exchanges_run("zero_one_adam", 300)
  assert kinds == dp_common.exchanges_per_step("zero_one_adam", 300, FREEZE_FRACTION)
  assert kinds[:17] == ["exact"] * 17 and kinds[17:21] == ["compressed", "exact"] * 2  # t = 2..18, then t = 19..22
  assert set(kinds[150:]) == {"compressed"}


# ----------------------------------------------------------------------------------------------------------------------
# The drivers end to end.


def check_results(path, names, world):
  """The runs trained (test accuracy well above chance, test loss below the untrained model's) and billed the
  bytes the compiled HLO sends for the exchanges they made."""
  runs = {r["optimizer"]: r for r in json.loads(path.read_text())["runs"]}
  assert sorted(runs) == sorted(names)
  costs = hlo_exchange_bytes(world)
  untrained = untrained_test_loss(seed=0, test_samples=TEST_SAMPLES)  # the drivers' default seed
  for name, run in runs.items():
    assert run["steps"] == STEPS and run["num_params"] == MNIST_PARAMS
    assert run["exact_steps"] + run["compressed_steps"] + run["silent_steps"] == STEPS
    assert run["bytes_sent_per_rank"] == pytest.approx(
      run["exact_steps"] * costs["exact"] + run["compressed_steps"] * costs["compressed"], rel=1e-9
    ), name
    assert run["final_test_accuracy"] > 0.35, (name, run["final_test_accuracy"])  # chance: 0.1
    assert run["final_test_loss"] < untrained - 0.05, (name, run["final_test_loss"], untrained)
  return runs


@pytest.mark.slow
def test_mnist_data_parallel(tmp_path):
  # 1-bit Adam (a warm-up, then compressed steps) and 0/1 Adam (params per rank); every optimizer's step kinds are
  # checked above.
  names = ["onebit_adam", "zero_one_adam"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.mnist_data_parallel",
      "--devices",
      "4",
      "--optimizers",
      ",".join(names),
      "--out",
      str(tmp_path),
      *SMALL,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
    cwd=ROOT,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  runs = check_results(tmp_path / "results.json", names, 4)
  assert runs["onebit_adam"]["exact_steps"] == 11


@pytest.mark.slow
@pytest.mark.serial
def test_mnist_multihost(tmp_path):
  completed = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.mnist_multihost",
      "--processes",
      "2",
      "--devices-per-process",
      "2",
      "--optimizers",
      "onebit_lamb",
      "--out",
      str(tmp_path),
      *SMALL,
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-3000:]
  check_results(tmp_path / "results.json", ["onebit_lamb"], 4)
