"""The slow-link benchmark's driver on a tiny model: namespace made and deleted, every configuration timed on each
link, bytes counted from the interface, the JSON and markdown written. Timings are not checked (never in tests)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import exchange_compute, link_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]

WHY_NOT = link_bench.namespaces_available()


def namespaces():
  return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(WHY_NOT is not None, reason=f"link_bench.py {WHY_NOT}")
def test_driver_on_a_tiny_model(tmp_path):
  before = namespaces()
  out = tmp_path / "link.json"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.link_bench",
      "--size",
      "tiny",
      "--links",
      "unthrottled,100mbit",
      "--steps",
      "2",
      "--compute-repeats",
      "2",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    check=True,
    timeout=600,
    capture_output=True,
  )
  assert namespaces() == before  # always deleted
  result = json.loads(out.read_text())
  timed = [name for name in exchange_compute.STEPS if name != "optax.adam"]
  assert [row["step"] for row in result["rows"]] == timed
  assert set(result["compute_only"]["seconds"]) == set(exchange_compute.STEPS)
  assert result["malloc"] == "reuse" and result["cores_per_process"] == len(os.sched_getaffinity(0)) // 2
  rows = {row["step"]: row for row in result["rows"]}
  for link in ("unthrottled", "100mbit"):
    for row in rows.values():
      assert row["seconds"][link] > 0 and row["page_faults_per_step"][link] >= 0
    # The interface saw the exchange: a compressed step moves bytes, a 0/1 Adam local step moves (almost) none.
    assert rows["compressed_mean"]["wire_bytes_per_step"][link] > 0
    assert (
      rows["zero_one_adam, local step"]["wire_bytes_per_step"][link]
      < rows["zero_one_adam, sync step"]["wire_bytes_per_step"][link]
    )
  assert "| step | unthrottled | 100mbit | compute only |" in out.with_suffix(".md").read_text()


def test_links_are_parsed_and_bad_ones_rejected():
  assert link_bench.parse_link("unthrottled") == (None, None)
  assert link_bench.parse_link("1gbit+1ms") == ("1gbit", "1ms")
  with pytest.raises(SystemExit, match="unknown rate"):
    link_bench.parse_link("3gbit")


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.skipif(WHY_NOT is not None, reason=f"link_train.py {WHY_NOT}")
def test_training_driver_on_a_few_steps(tmp_path):
  """benchmarks/link_train.py: MNIST training in the throttled namespace, the namespace deleted, JSON and table."""
  before = namespaces()
  out = tmp_path / "train.json"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.link_train",
      "--train-samples",
      "1024",
      "--optimizers",
      "adam,zero_one_adam",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    check=True,
    timeout=600,
    capture_output=True,
  )
  assert namespaces() == before  # always deleted
  result = json.loads(out.read_text())
  assert [r["optimizer"] for r in result["runs"]] == ["adam", "zero_one_adam"] and result["rate"] == "100mbit"
  assert all(r["steps"] == 4 and r["seconds"] > 0 for r in result["runs"])
  assert "| zero_one_adam |" in out.with_suffix(".md").read_text()


def test_each_process_runs_on_cores_of_its_own():
  cores = sorted(os.sched_getaffinity(0))
  assert link_bench.process_cores(0, 0) == []  # 0: no pinning
  assert link_bench.process_cores(0, 1) == cores[:1]
  assert link_bench.process_cores(len(cores) - 1, 1) == cores[-1:]
  with pytest.raises(SystemExit, match="--cores-per-process 1: process .* needs cores"):
    link_bench.process_cores(len(cores), 1)


def test_malloc_modes():
  assert exchange_compute.set_malloc("system")
  with pytest.raises(ValueError, match="malloc mode must be one of"):
    exchange_compute.set_malloc("jemalloc")
  # "reuse" changes the allocator for the rest of the process: try it in a fresh one.
  took = subprocess.run(
    [sys.executable, "-c", "from benchmarks import exchange_compute as e; print(e.set_malloc('reuse'))"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  assert took.stdout.split()[-1] == "True"


# Serial, so that it runs outside pytest-xdist: a warning raised in the revision's package (imported under another
# module name) cannot be sent from a worker to the controller, which imports the warning's module by name.
@pytest.mark.serial
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="exchange_compute --against needs the git history")
def test_a_step_is_timed_against_another_revision_of_the_package():
  """`exchange_compute.library_at` imports the package of a git revision beside the working tree's, and a `Runner`
  times a step built from it; where the package did not change, its updates (warm-up, then a compressed exchange)
  are bitwise the working tree's."""
  import jax

  import optax_lamb16

  base = exchange_compute.library_at("HEAD")
  assert base.__name__.startswith("optax_lamb16_at_") and base is not optax_lamb16
  assert base.comm.__name__ == f"{base.__name__}.comm"  # its own modules, not the working tree's
  params = exchange_compute.make_tree(exchange_compute.SIZES["tiny"], jax.random.key(0))
  grads = exchange_compute.make_tree(exchange_compute.SIZES["tiny"], jax.random.key(1), scale=0.01)
  step = exchange_compute.STEPS["onebit_adam, compression"]
  runner = exchange_compute.Runner("at HEAD", step, base.comm.SimulatedRanks(2), params, grads, base)
  runner.run(1)
  assert len(runner.times) == 1
  changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "optax_lamb16"], cwd=ROOT).returncode
  if not changed:

    def two_updates(lib):  # t = 2: warm-up (freeze_step 2), t = 3: compression
      tx = step.make(lib, lib.comm.SimulatedRanks(2))
      first, state = tx.update(grads, tx.init(params), params)
      return first, tx.update(grads, state, params)[0]

    for mine, theirs in zip(jax.tree.leaves(two_updates(optax_lamb16)), jax.tree.leaves(two_updates(base))):
      assert (mine == theirs).all()
