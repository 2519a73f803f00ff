"""The README's Python examples run as written and do what their comments say."""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_lamb16

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def moved_and_finite(params, start: float) -> None:
  leaves = jax.tree.leaves(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
  assert any(bool(jnp.any(x != start)) for x in leaves), "the example's step did not move the params"


def lamb16_states(state):
  return [
    s
    for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax_lamb16.ScaleByLamb16State))
    if isinstance(s, optax_lamb16.ScaleByLamb16State)
  ]


def check_quickstart(ns):
  """One jitted LAMB16 step: the weights moved from 1 and stayed finite; the moments are float8."""
  moved_and_finite(ns["params"]["w"], 1.0)
  (state,) = lamb16_states(ns["opt_state"])
  assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.float8_e4m3fn)}
  assert {x.dtype for x in jax.tree.leaves(state.nu)} == {jnp.dtype(jnp.float8_e5m2)}


def check_data_parallel(ns):
  """Four data-parallel steps of 1-bit Adam (warm-up, then compressed): the params moved and stay replicated; the
  error feedback is sharded over "data" and was used."""
  moved_and_finite(ns["params"], 0.0)
  world = ns["world"]
  state = ns["state"][0]
  assert isinstance(state, optax_lamb16.ScaleByOnebitAdamState)
  for buffer in jax.tree.leaves(state.exchange):
    assert buffer.sharding.spec == jax.sharding.PartitionSpec("data") and buffer.shape[0] % world == 0
  if world > 1:
    assert sum(float(jnp.abs(w).sum()) for w in state.exchange.worker_error) > 0  # the compressed exchange ran
  for leaf in jax.tree.leaves(ns["params"]):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert all(np.array_equal(s, shards[0]) for s in shards)


# Each README block, recognised by a phrase it contains, and what it must have done.
CHECKS = {"clip_by_global_norm": check_quickstart, "optax_lamb16.data_parallel(": check_data_parallel}


def test_readme_has_python_examples():
  assert BLOCKS, "the README has no Python example"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs_and_does_what_it_says(block):
  checks = [check for phrase, check in CHECKS.items() if phrase in block]
  assert len(checks) == 1, f"no (or more than one) check in tests/test_readme.py for this README block:\n{block}"
  namespace = {}
  with jax.numpy_dtype_promotion("standard"):  # as a user runs it
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
  checks[0](namespace)


def test_readme_tables_are_rendered_from_the_committed_results():
  """Benchmark tables are generated from docs/results/*.json (`python -m benchmarks.tables --readme`), never
  copied by hand: each marked table is what the script renders now."""
  spec = importlib.util.spec_from_file_location("tables", README.parent / "benchmarks" / "tables.py")
  tables = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tables)
  text = README.read_text()
  assert re.findall(r"<!-- table:(\w+) -->", text), "the README marks no generated table"
  assert tables.readme_with_tables(text) == text, "run `python -m benchmarks.tables --readme`"
