"""`optax_lamb16.Checkpointer`: bitwise continuation in a new process, world-size changes, 0-d per-rank leaves,
damaged checkpoints (checksums, fallback), errors."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import optax_lamb16
from optax_lamb16 import _sharding as sharding
from optax_lamb16._checkpointing import MANIFEST, CheckpointFallbackWarning, DamagedCheckpointError, newest_intact_step
from tests import onebit_harness as h
from tests.workers import launch
from tests.workers.optimizers import make_optimizer

WORKER = launch.ROOT / "tests" / "workers" / "resume_worker.py"


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.parametrize("backend", ["single_device", "shard_map", "jax_distributed"])
def test_resume_in_a_new_process_is_bitwise_the_uninterrupted_run(backend, tmp_path):
  # Every optimizer, a save in each of its phases (0/1 Adam's between syncs too); params AND state compared.
  for phase in ("run", "resume"):
    args = ["--phase", phase, "--out", str(tmp_path)]
    if backend == "jax_distributed":
      launch.run_distributed(WORKER, args, num_processes=2, devices_per_process=2)
    else:
      launch.run_process(WORKER, args + (["--single"] if backend == "single_device" else []), devices=4)


def _mesh(world):
  return h.host_mesh(world)


def _trained(name, world, steps, per_rank_params=False):
  """A Stepper for `name` on `world` devices after `steps` steps of the harness problem."""
  params, x, y, noise = h.make_problem(world, steps)
  run = h.Stepper(lambda comm: make_optimizer(name, comm), params, _mesh(world), per_rank_params)
  xs, ys = run.put(x, P("data")), run.put(y, P("data"))
  for t in range(steps):
    run.params, run.state = jax.block_until_ready(run.step(run.params, run.state, xs, ys, run.noise(noise, t)))
  return run


def _exchange(state) -> optax_lamb16.CompressedAllReduceState:
  """The error-feedback state inside an optimizer state (1-bit Adam's is inside its chain)."""
  is_exchange = lambda node: isinstance(node, optax_lamb16.CompressedAllReduceState)
  return next(node for node in jax.tree.leaves(state, is_leaf=is_exchange) if is_exchange(node))


def _bits(tree):
  return [np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", ["onebit_adam", "onebit_lamb"])
def test_a_world_size_change_is_an_error_unless_error_feedback_is_reset(name, tmp_path):
  saved = _trained(name, 4, 9)  # in the compression phase: error buffers are non-zero
  assert np.abs(h.flat_errors(_exchange(saved.state)).worker_error).max() > 0
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(9, {"opt_state": saved.state}, world_size=4)
    fresh = h.Stepper(lambda comm: make_optimizer(name, comm), h.make_problem(2, 1)[0], _mesh(2))
    with pytest.raises(ValueError, match=r"4 data-parallel ranks, this job has 2 \(`world_size`\).*reset_error"):
      checkpoints.restore({"opt_state": fresh.state}, world_size=2)
    restored = checkpoints.restore(
      {"opt_state": fresh.state}, world_size=2, on_world_size_change="reset_error_feedback"
    )["opt_state"]
  # Error feedback (and 1-bit LAMB's padding tail) from zero, laid out for 2 ranks; everything else as saved.
  roles = jax.tree.leaves(sharding.leaf_roles(restored))
  assert sharding.ERROR_FEEDBACK in roles
  for role, got, was, want in zip(roles, *(jax.tree.leaves(s) for s in (restored, saved.state, fresh.state))):
    if role == sharding.REPLICATED:
      assert np.asarray(got).tobytes() == np.asarray(was).tobytes()
    else:
      assert got.shape == want.shape and got.sharding == want.sharding and not np.asarray(got).any()
  x, y, noise = h.make_problem(2, 1)[1:]
  params, _ = fresh.step(
    fresh.params, restored, fresh.put(x, P("data")), fresh.put(y, P("data")), fresh.noise(noise, 0)
  )  # and training goes on
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_error_buffers_of_another_layout_restart_from_zero_only_when_asked(tmp_path):
  """A checkpoint whose error buffers are laid out otherwise, everything else the same (as written by the version
  that kept each rank's worker error as one flat buffer): an error naming the fix, and with it the error feedback
  from zero and every other leaf as saved."""
  saved = _trained("onebit_adam", 4, 9)  # in the compression phase: error buffers are non-zero
  exchange = _exchange(saved.state)
  flat = jnp.concatenate(exchange.worker_error)  # rank blocks differ in the flat layout, but one array all the same
  old_layout = jax.tree.map(
    lambda node: node._replace(worker_error=flat) if isinstance(node, optax_lamb16.CompressedAllReduceState) else node,
    saved.state,
    is_leaf=lambda node: isinstance(node, optax_lamb16.CompressedAllReduceState),
  )
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(9, {"opt_state": old_layout}, world_size=4)
    with pytest.raises(ValueError, match=r"error-feedback buffers in another layout.*reset_error_feedback"):
      checkpoints.restore({"opt_state": saved.state}, world_size=4)
    # Another model: its leaves are named first, whatever the error buffers' layout.
    params = h.make_problem(4, 1)[0]
    wider = dict(params, w=np.zeros((params["w"].shape[0] + 1, params["w"].shape[1]), np.float32))
    other = h.Stepper(lambda comm: make_optimizer("onebit_adam", comm), wider, _mesh(4)).state
    for option in ("error", "reset_error_feedback"):
      with pytest.raises(ValueError, match=r"\['w'\] is float32\[\d+, \d+\].*`target` has.*differs"):
        checkpoints.restore({"opt_state": other}, world_size=4, on_world_size_change=option)
    restored = checkpoints.restore(
      {"opt_state": saved.state}, world_size=4, on_world_size_change="reset_error_feedback"
    )["opt_state"]
  roles = jax.tree.leaves(sharding.leaf_roles(restored))
  for role, got, was in zip(roles, jax.tree.leaves(restored), jax.tree.leaves(saved.state)):
    assert got.shape == was.shape and got.sharding == was.sharding
    if role == sharding.ERROR_FEEDBACK:
      assert not np.asarray(got).any()
    else:
      assert np.asarray(got).tobytes() == np.asarray(was).tobytes()


def test_a_world_size_change_takes_other_per_rank_state_from_rank_0(tmp_path):
  saved = _trained("zero_one_adam", 4, 14, per_rank_params=True)  # between syncs: momenta differ per rank
  mu = np.asarray(saved.state.mu["w"]).reshape(4, -1, 12)
  assert not np.array_equal(mu[0], mu[1])
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(14, saved.state, world_size=4)
    fresh = h.Stepper(lambda comm: make_optimizer("zero_one_adam", comm), h.make_problem(2, 1)[0], _mesh(2), True)
    restored = checkpoints.restore(fresh.state, world_size=2, on_world_size_change="reset_error_feedback")
  np.testing.assert_array_equal(np.asarray(restored.mu["w"]).reshape(2, -1, 12), np.stack([mu[0], mu[0]]))
  assert int(restored.count) == int(saved.state.count)


def test_dropping_the_error_feedback_on_resume_changes_the_run(tmp_path):
  # What DeepSpeed does on every load; it is why the exact-resume comparison above can fail.
  params, x, y, noise = h.make_problem(4, 12)
  runs = []
  for drop in (False, True):
    run = h.Stepper(lambda comm: make_optimizer("onebit_adam", comm), params, _mesh(4))
    xs, ys = run.put(x, P("data")), run.put(y, P("data"))
    p, s = run.params, run.state
    for t in range(12):
      if drop and t == 9:
        s = (s[0]._replace(exchange=jax.tree.map(jnp.zeros_like, s[0].exchange)), *s[1:])  # 1-bit Adam's chain
      p, s = jax.block_until_ready(run.step(p, s, xs, ys, run.noise(noise, t)))
    runs.append(np.asarray(p["w"]))
  assert not np.array_equal(runs[0], runs[1])


def test_restore_checks_structure_shapes_and_arguments(tmp_path):
  params = {"w": jnp.ones((3, 2)), "empty": jnp.zeros((0,)), "half": jnp.ones(4, jnp.bfloat16)}
  tx = optax_lamb16.lamb16(1e-2)
  state = tx.init(params)
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      checkpoints.restore(state, world_size=1)
    checkpoints.save(1, {"params": params, "opt_state": state}, world_size=1)
    restored = checkpoints.restore({"params": params, "opt_state": state}, world_size=1)
    assert _bits(restored) == _bits({"params": params, "opt_state": state})  # empty and bfloat16 leaves too
    with pytest.raises(ValueError, match="leaves only in one of them"):
      checkpoints.restore({"params": params}, world_size=1)
    # A target with the saved leaves first and fewer or more after them.
    with pytest.raises(ValueError, match="leaves only in one of them"):
      checkpoints.restore({"opt_state": state}, world_size=1)
    with pytest.raises(ValueError, match="leaves only in one of them"):
      checkpoints.restore({"params": params, "opt_state": state, "z": jnp.ones(2)}, world_size=1)
    wider = {"w": jnp.ones((3, 3)), "empty": params["empty"], "half": params["half"]}
    with pytest.raises(ValueError, match=r"\['opt_state'\].mu\['w'\] is float8_e4m3fn\[3, 2\]"):
      checkpoints.restore({"params": wider, "opt_state": tx.init(wider)}, world_size=1)
    with pytest.raises(ValueError, match="on_world_size_change"):
      checkpoints.restore(state, world_size=1, on_world_size_change="ignore")


def test_a_world_size_change_checks_per_rank_leaves_against_the_new_world_size(tmp_path):
  # A target laid out for 4 ranks restored as if the job had 2: before, the per-rank leaves came back with 2 ranks'
  # blocks but the target's shardings, silently; now the first such leaf is named.
  saved = _trained("zero_one_adam", 4, 14, per_rank_params=True)
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(14, saved.state, world_size=4)
    with pytest.raises(
      ValueError,
      match=r"\.mu\['b'\] is float32\[48\] \(per_rank, saved by 4 ranks\), `target` "
      r"has float32\[48\].*does not hold 2 blocks of the saved per-rank shape \[12\]",
    ):
      checkpoints.restore(saved.state, world_size=2, on_world_size_change="reset_error_feedback")
  onebit = h.Stepper(lambda comm: make_optimizer("onebit_adam", comm), h.make_problem(4, 1)[0], _mesh(4)).state
  with optax_lamb16.Checkpointer(tmp_path / "onebit") as checkpoints:
    checkpoints.save(1, onebit, world_size=4)
    with pytest.raises(
      ValueError, match=r"exchange\.worker_error\[\d\] is float32\[\d+\].*is not laid out for 3 ranks"
    ):
      checkpoints.restore(onebit, world_size=3, on_world_size_change="reset_error_feedback")


def test_0d_per_rank_leaves_save_restore_and_resize(tmp_path):
  # 0/1 Adam keeps a 0-d parameter's per-rank state as one value per rank (global shape (P,)).
  saved = _trained("zero_one_adam", 4, 14, per_rank_params=True)
  mu_s = np.asarray(saved.state.mu["s"])
  assert mu_s.shape == (4,) and len(set(mu_s.tolist())) > 1  # between syncs: one value per rank, and they differ
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(14, {"params": saved.params, "opt_state": saved.state}, world_size=4)
    same = checkpoints.restore({"params": saved.params, "opt_state": saved.state}, world_size=4)
    assert _bits(same) == _bits({"params": saved.params, "opt_state": saved.state})
    fresh = h.Stepper(lambda comm: make_optimizer("zero_one_adam", comm), h.make_problem(2, 1)[0], _mesh(2), True)
    checkpoints.save(15, saved.state, world_size=4)
    resized = checkpoints.restore(fresh.state, world_size=2, on_world_size_change="reset_error_feedback")
  np.testing.assert_array_equal(np.asarray(resized.mu["s"]), [mu_s[0], mu_s[0]])
  assert resized.mu["s"].sharding == fresh.state.mu["s"].sharding


class _PerRankScalar(NamedTuple):
  value: jax.Array
  PER_RANK_FIELDS = ("value",)


def test_a_0d_per_rank_leaf_of_another_state_is_taken_as_saved_on_a_world_size_change(tmp_path):
  # On one device nothing is laid out by rank: a 0-d per-rank value has no first axis to take rank 0's block from
  # (it raised IndexError before).
  tree = {"state": _PerRankScalar(jnp.float32(3.0)), "w": jnp.ones(3)}
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(1, tree, world_size=1)
    restored = checkpoints.restore(tree, world_size=2, on_world_size_change="reset_error_feedback")
  assert _bits(restored) == _bits(tree)


def test_saving_an_older_step_than_the_latest_is_not_skipped_and_an_existing_step_is_an_error(tmp_path):
  # Orbax skips, silently, a step older than its latest one (e.g. after restoring an older checkpoint).
  tree = {"w": jnp.arange(4.0)}
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(5, tree, world_size=1)
    checkpoints.save(3, {"w": jnp.arange(4.0) * 2}, world_size=1)
    assert checkpoints.all_steps() == [3, 5]
    np.testing.assert_array_equal(checkpoints.restore(tree, world_size=1, step=3)["w"], np.arange(4.0) * 2)
    with pytest.raises(ValueError, match="checkpoint step 5 exists already"):
      checkpoints.save(5, tree, world_size=1)


# -- damaged checkpoints ------------------------------------------------------------------------------------------


def _damage_tree():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((64, 32)), jnp.float32), "s": jnp.float32(0.5)}
  tx = optax_lamb16.lamb16(1e-2)
  return {"params": params, "opt_state": tx.init(params)}


def _leaf_file(step_dir):
  """The biggest data file of the replicated item: it holds the bytes of the leaf "w"."""
  files = [p for p in (step_dir / "replicated").rglob("*") if p.is_file() and "/d/" in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def _cut_short(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


@pytest.mark.parametrize(
  "damage, problem",
  [
    (lambda path: path.unlink(), "is missing"),
    (_cut_short, r"has \d+ bytes, \d+ were saved \(cut short"),
    (_flip, r"does not match the SHA-256 checksum written at save time"),
  ],
)
def test_a_damaged_checkpoint_is_an_error_naming_the_step_and_the_file(damage, problem, tmp_path):
  tree = _damage_tree()
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(7, tree, world_size=1)
    victim = _leaf_file(tmp_path / "7")
    damage(victim)
    message = rf"checkpoint step 7 is damaged: {victim} {problem}.*fallback=True"
    with pytest.raises(DamagedCheckpointError, match=message):
      checkpoints.restore(tree, world_size=1)
    with pytest.raises(DamagedCheckpointError, match=message):
      checkpoints.verify(7)
  step, damaged = newest_intact_step(tmp_path)  # what a launcher reports, without JAX devices
  assert step is None and [(error.step, error.path) for error in damaged] == [(7, str(victim))]


def test_orbax_alone_restores_a_flipped_leaf_silently(tmp_path):
  # Why the checksums: the flip above lands in a leaf's bytes, and Orbax reads other values without a word.
  tree = _damage_tree()
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(7, tree, world_size=1)
  _flip(_leaf_file(tmp_path / "7"))
  manager = ocp.CheckpointManager(tmp_path)
  leaves = manager.restore(7, args=ocp.args.Composite(replicated=ocp.args.StandardRestore()))["replicated"]
  manager.close()
  want = dict(zip((f"{i:06d}" for i in range(len(jax.tree.leaves(tree)))), jax.tree.leaves(tree)))
  assert any(np.asarray(leaf).tobytes() != np.asarray(want[key]).tobytes() for key, leaf in leaves.items())


def test_a_damaged_manifest_is_named_too(tmp_path):
  tree = _damage_tree()
  with optax_lamb16.Checkpointer(tmp_path) as checkpoints:
    checkpoints.save(2, tree, world_size=1)
    manifest = tmp_path / "2" / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace('"bytes": ', '"bytes": 1', 1))
    with pytest.raises(DamagedCheckpointError, match=rf"step 2 is damaged: {manifest} does not match its own checksum"):
      checkpoints.restore(tree, world_size=1)
    manifest.unlink()
    with pytest.raises(DamagedCheckpointError, match=rf"step 2 is damaged: {manifest} is missing"):
      checkpoints.restore(tree, world_size=1)


def test_fallback_restores_the_newest_intact_checkpoint_and_says_which(tmp_path):
  tree = _damage_tree()
  older = jax.tree.map(lambda a: a + 1 if a.dtype == jnp.float32 else a, tree)
  with optax_lamb16.Checkpointer(tmp_path, max_to_keep=3) as checkpoints:
    checkpoints.save(4, older, world_size=1)
    checkpoints.save(8, tree, world_size=1)
    _flip(_leaf_file(tmp_path / "8"))
    with pytest.raises(DamagedCheckpointError, match="step 8"):
      checkpoints.restore(tree, world_size=1)
    with pytest.warns(
      CheckpointFallbackWarning,
      match=r"restored checkpoint step 4 .* skipped step 8 \(.*SHA-256.*"
      r"Moved the damaged newer steps \[8\] aside",
    ):
      restored = checkpoints.restore(tree, world_size=1, fallback=True)
    assert checkpoints.restored_step == 4 and _bits(restored) == _bits(older)
    assert checkpoints.latest_step() == 4 and (tmp_path / "8.damaged").is_dir()  # kept, not deleted
    checkpoints.save(8, tree, world_size=1)  # training goes on and saves that step again
    assert _bits(checkpoints.restore(tree, world_size=1)) == _bits(tree)
    _flip(_leaf_file(tmp_path / "4"))
    _flip(_leaf_file(tmp_path / "8"))
    with pytest.raises(
      DamagedCheckpointError, match="holds no intact checkpoint at or before this step.*step 8.*step 4"
    ):
      checkpoints.restore(tree, world_size=1, fallback=True)


def test_without_orbax_the_error_names_the_extra(monkeypatch):
  """orbax-checkpoint is the optional `checkpoint` extra: without it, `Checkpointer` says what to install."""
  import builtins
  import sys

  real_import = builtins.__import__

  def no_orbax(name, *args, **kwargs):
    if name.startswith("orbax"):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(sys.modules, "optax_lamb16._checkpointing", raising=False)
  monkeypatch.delattr(optax_lamb16, "_checkpointing", raising=False)
  monkeypatch.setattr(builtins, "__import__", no_orbax)
  with pytest.raises(ModuleNotFoundError, match=r"optax_lamb16\[checkpoint\]"):
    optax_lamb16.Checkpointer  # noqa: B018 - the attribute access is what imports orbax
