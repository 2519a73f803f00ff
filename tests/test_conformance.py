"""The conformance checks optax runs on its contributed optimizers, for every optimizer and building block here.

Modelled on optax's ``contrib/_common_test.py``, ``_src/alias_test.py`` and ``_src/sharding_test.py``: extra keyword
arguments in `update` without recompiling, `optax.inject_hyperparams` equality, dtype preservation (bfloat16 and
float32; float64 and float16 traced under jax_enable_x64), `optax.MultiSteps`, state types stable across `update`
under an Explicit mesh, schedules wherever the signature says ``ScalarOrSchedule``, `init` on abstract shapes, and a
state that can be donated to a jitted step.

One table of cases (`CASES`) feeds every check. Public ``scale_by_*`` blocks that the table does not know yet are
discovered and built from their signatures, so that new building blocks are checked as soon as they exist. The
1-bit optimizers run with ``comm=None`` (one device) in the generic checks, and inside `jax.shard_map` over a
2-device axis "data" in the `test_mesh_*` checks. Short freeze steps make a few steps cross every phase (warm-up and
compression; 0/1 Adam's variance, compressed, sync and local steps). `optax.lion` runs as a control: every check
passes for it, so a failure here is the case's, not the harness's.

Results that several checks compare with (the plain run of each case) are computed once per session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_lamb16
from tests import onebit_harness as h

# Faithful 1-bit Adams at a constant learning rate warn of their large first steps (tests/test_drop_in.py).
pytestmark = pytest.mark.filterwarnings("ignore::optax_lamb16._onebit.LargeFirstStepsWarning")

STEPS = 5  # 1-bit Adam/LAMB: warm-up t = 2, compression from t = 3; 0/1 Adam: variance, compressed, sync, local
# Hyperparameters every case gets where its factory has them: short phases, and non-zero weight decay so that a
# dropped or mis-scheduled weight decay shows.
KNOWN_VALUES = {
  "learning_rate": 1e-2,
  "weight_decay": 1e-2,
  "freeze_step": 2,
  "var_freeze_step": 2,
  "var_update_scaler": 1,
  "local_step_scaler": 1,
  "local_step_clipper": 2,
  "max_consecutive_errors": 2,
  "block_size": 16,
}
# Hyperparameters that `optax.inject_hyperparams` cannot turn into arrays (they shape the program: step counts,
# communicators, masks, inner transformations), as optax's own list of uninjectable ones.
STATIC = (
  "comm",
  "freeze_step",
  "var_freeze_step",
  "var_update_scaler",
  "local_step_scaler",
  "local_step_clipper",
  "max_consecutive_errors",
  "mask",
  "momentum_mask",
  "mask_zero_variance",
  "inner",
  "block_size",
)
ALIASES = ("lamb16", "lamb16_blockwise", "adamw16", "onebit_adam", "zero_one_adam", "onebit_lamb")


# ----------------------------------------------------------------------------------------------------------------------
# The cases.


@dataclasses.dataclass(frozen=True)
class Case:
  """One transformation under test. `make(comm)` returns ``(factory, kwargs)``: `factory(**kwargs)` builds it (the
  factory is what `inject_hyperparams` wraps and whose signature is inspected)."""

  name: str
  make: Callable[[Any], tuple[Callable[..., Any], dict]]
  communicating: bool = False
  per_rank_params: bool = False  # 0/1 Adam: the params differ per rank between syncs

  def factory(self, comm=None):
    return self.make(comm)[0]

  def kwargs(self, comm=None):
    return self.make(comm)[1]

  def build(self, comm=None, **overrides) -> optax.GradientTransformation:
    factory, kwargs = self.make(comm)
    return factory(**{**kwargs, **overrides})


def _signature(fn) -> inspect.Signature:
  try:
    return inspect.signature(fn, eval_str=True)
  except (NameError, TypeError):  # an annotation that does not evaluate at run time: keep the strings
    return inspect.signature(fn)


def _known_kwargs(fn, comm) -> dict:
  """The hyperparameters `fn` is called with: KNOWN_VALUES where it has them, `comm` if it takes one; a clear
  error for a required argument the harness cannot fill."""
  kwargs = {}
  for name, parameter in _signature(fn).parameters.items():
    if name == "comm":
      kwargs[name] = comm
    elif name in KNOWN_VALUES:
      kwargs[name] = KNOWN_VALUES[name]
    elif parameter.default is inspect.Parameter.empty and parameter.kind not in (
      parameter.VAR_POSITIONAL,
      parameter.VAR_KEYWORD,
    ):
      raise TypeError(
        f"tests/test_conformance.py cannot build {fn.__name__}: no value for its required argument "
        f"`{name}`; add one to KNOWN_VALUES or a Case to CASES."
      )
  return kwargs


def public(name: str, per_rank_params: bool = False) -> Case:
  """A public factory of optax_lamb16, called with the hyperparameters of KNOWN_VALUES it has."""
  fn = getattr(optax_lamb16, name)
  return Case(name, lambda comm: (fn, _known_kwargs(fn, comm)), "comm" in _signature(fn).parameters, per_rank_params)


def finite_guard(inner: str) -> Case:
  """`optax_lamb16.apply_if_finite` around `inner`, wrapped for `inject_hyperparams` as optax wraps its wrappers
  (``functools.partial(wrapper, inner)``)."""
  inner_case = public(inner)

  def make(comm):
    wrapper = functools.partial(optax_lamb16.apply_if_finite, inner_case.build(comm))
    return wrapper, {"max_consecutive_errors": 2, "comm": comm}

  return Case(f"apply_if_finite({inner})", make, inner_case.communicating)


KNOWN = [
  public("lamb16"),
  public("lamb16_blockwise"),
  public("adamw16"),
  public("scale_by_lamb16"),
  public("scale_by_lamb16_trust_ratio"),
  public("onebit_adam"),
  public("zero_one_adam", per_rank_params=True),
  public("onebit_lamb"),
  public("compressed_mean"),
  public("uncompressed_mean"),
  finite_guard("onebit_adam"),
]
# Building blocks added since this table was written (e.g. the 1-bit family's scale_by_* blocks) join by themselves.
DISCOVERED = [
  public(name, per_rank_params="zero_one" in name)
  for name in sorted(dir(optax_lamb16))
  if name.startswith("scale_by_")
  and callable(getattr(optax_lamb16, name))
  and name not in {case.name for case in KNOWN}
]
# optax's own transforms are not written for strict dtype promotion (e.g. float32 hyperparameters times bfloat16
# leaves): the control runs under standard promotion (`_control_promotion`), the library under strict.
CONTROL = Case("optax.lion (control)", lambda comm: (optax.lion, {"learning_rate": 1e-2, "weight_decay": 1e-2}))
CASES = KNOWN + DISCOVERED + [CONTROL]
COMMUNICATING = [case for case in CASES if case.communicating]


@pytest.fixture(autouse=True)
def _control_promotion(request):
  case = getattr(request.node, "callspec", None) and request.node.callspec.params.get("case")
  with jax.numpy_dtype_promotion("standard") if case is CONTROL else contextlib.nullcontext():
    yield


def cases(selection=CASES):
  return pytest.mark.parametrize("case", selection, ids=[case.name for case in selection])


# ----------------------------------------------------------------------------------------------------------------------
# Params, gradients and comparisons.

# A 2-D and a 0-d float32 leaf and a 1-D bfloat16 leaf (tree-flatten order b, s, w): one tree checks that updates
# follow each leaf's dtype, for both dtypes, at the cost of one run.
PARAM_VALUES = {
  "w": np.linspace(-1.0, 1.0, 12).reshape(4, 3),
  "b": np.array([0.5, -0.25, 1.0, 0.0]),
  "s": np.array(0.75),
}
PARAM_DTYPES = {"w": jnp.float32, "b": jnp.bfloat16, "s": jnp.float32}


def make_params() -> dict:
  return {name: jnp.asarray(value, PARAM_DTYPES[name]) for name, value in PARAM_VALUES.items()}


def grads_at(t: int, lead: tuple = ()) -> dict:
  """Step t's gradients, like the params (with leading axes `lead`, e.g. one row per rank)."""
  rng = np.random.default_rng(100 + t)
  return {
    name: jnp.asarray(rng.standard_normal(lead + np.shape(value)), PARAM_DTYPES[name])
    for name, value in PARAM_VALUES.items()
  }


def loss_value(params) -> jax.Array:
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(params))


def comparable(tree):
  """Float leaves (float8 and bfloat16 included) as float32 NumPy arrays, others as they are."""
  return jax.tree.map(
    lambda x: (
      np.asarray(jnp.asarray(x).astype(jnp.float32))
      if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
      else np.asarray(x)
    ),
    tree,
  )


def assert_close(actual, desired, rtol=1e-6, atol=1e-7):
  chex.assert_trees_all_equal_structs(actual, desired)
  chex.assert_trees_all_close(comparable(actual), comparable(desired), rtol=rtol, atol=atol)


def apply_step(tx, **extra_args):
  """step(params, state, grads) -> (params, state, updates), one update with `extra_args` passed to `update`."""

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state, updates

  return step


class Run(NamedTuple):
  """A run from `make_params` and `init`: params[t] and states[t] before step t (and after the last one), updates[t]
  of step t."""

  params: list
  states: list
  updates: list


def run(step, tx, steps=STEPS, init=None) -> Run:
  """`steps` calls of ``step(params, state, grads) -> (params, state, updates)`` from `make_params` and the state
  of `init` (default ``tx.init``); one program at a time."""
  params = make_params()
  state = (init or tx.init)(params)
  result = Run([params], [state], [])
  for t in range(steps):
    params, state, updates = jax.block_until_ready(step(params, state, grads_at(t)))
    result.params.append(params)
    result.states.append(state)
    result.updates.append(updates)
  return result


@functools.cache
def float32_decay_rates(case: Case) -> dict:
  """`case`'s decay rates as float32 arrays. A decay rate given as a Python number has its ``1 - b`` formed in double
  precision (SPEC.md), one that is injected or scheduled in float32; the plain runs that injected and scheduled runs
  are compared with take them as arrays, so that both form ``1 - b`` alike. (optax's own transforms, the controls,
  form it in float32 either way.)"""
  if not case.factory().__module__.startswith("optax_lamb16"):
    return {}
  names = _signature(case.factory()).parameters
  return {name: jnp.float32(_value(case, name)) for name in ("b1", "b2") if name in names}


def reference_run(case: Case, float32_decays: bool = False) -> Run:
  """The plain jitted run of `case` (`float32_decays`: with `float32_decay_rates`). Several checks compare with it;
  it is computed once."""
  tx = case.build(**(float32_decay_rates(case) if float32_decays else {}))
  return run(jax.jit(apply_step(tx)), tx)


def inject(case: Case, comm=None) -> optax.GradientTransformationExtraArgs:
  """`case` built through `optax.inject_hyperparams`, the STATIC hyperparameters static. Hyperparameters in
  float32: by default optax promotes the leaves' dtypes to choose theirs, which strict promotion rejects for a tree
  of bfloat16 and float32 leaves."""
  factory, kwargs = case.make(comm)
  static = tuple(name for name in kwargs if name in STATIC)
  return optax.inject_hyperparams(factory, static_args=static, hyperparam_dtype=jnp.float32)(**kwargs)


@contextlib.contextmanager
def compilations():
  """Collects the XLA compilations that happen inside the block (as optax's ``test_utils.log_compilations``)."""
  records, found = [], []
  handler = logging.Handler()
  handler.emit = records.append
  logger = logging.getLogger("jax")
  logger.addHandler(handler)
  try:
    with jax.log_compiles(True):
      yield found
  finally:
    logger.removeHandler(handler)
    found.extend(r.getMessage() for r in records if re.search(r"Finished .* compilation", r.getMessage()))


def type_mismatches(before, after) -> list[str]:
  """Paths of the leaves whose `jax.typeof` (shape, dtype, weak type, sharding) differs between two states."""
  chex.assert_trees_all_equal_structs(before, after)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
  return [
    f"{path}: {jax.typeof(a)} -> {jax.typeof(b)}"
    for path, a, b in zip(paths, jax.tree.leaves(before), jax.tree.leaves(after))
    if jax.typeof(a) != jax.typeof(b)
  ]


# ----------------------------------------------------------------------------------------------------------------------
# The generic checks (comm=None for the 1-bit optimizers).


@cases()
def test_is_an_extra_args_transformation(case):
  tx = case.build()
  assert isinstance(tx, optax.GradientTransformationExtraArgs), type(tx)


@cases()
def test_update_accepts_extra_args_and_does_not_recompile(case):
  """optax's ``test_optimizers_accept_extra_args``: `update(..., value=..., <unknown>=...)` works, changes nothing,
  and the second call of the jitted step compiles nothing."""
  tx = case.build()
  step = jax.jit(
    lambda params, state, grads: apply_step(
      tx, value=loss_value(params), unexpected_extra_args_your_optimizer_doesnt_expect=1
    )(params, state, grads)
  )
  first = run(step, tx, steps=1)
  with compilations() as compiled:
    params, state, second = jax.block_until_ready(step(first.params[-1], first.states[-1], grads_at(1)))
  assert not compiled, f"the second call of a jitted update recompiles: {compiled}"
  want = reference_run(case)
  assert_close([first.updates[0], second], want.updates[:2])  # the extra arguments are ignored
  assert_close((params, state), (want.params[2], want.states[2]))


# optax's own aliases fail this check on a tree with a bfloat16 leaf: the injected float32 learning rate promotes
# that leaf's updates to float32. The control shows that the check sees it.
PROMOTING_CONTROL = pytest.mark.xfail(
  strict=True, reason="optax promotes bfloat16 updates with injected float32 hyperparameters"
)


@pytest.mark.parametrize(
  "case", [pytest.param(case, id=case.name, marks=PROMOTING_CONTROL if case is CONTROL else ()) for case in CASES]
)
def test_inject_hyperparams_gives_the_same_updates_and_states(case):
  """optax's ``test_optimizers_can_be_wrapped_in_inject_hyperparams``, over every step of the plain run."""
  injected = inject(case)
  got = run(jax.jit(apply_step(injected)), injected, init=jax.jit(injected.init))
  want = reference_run(case, float32_decays=True)
  chex.assert_trees_all_equal_dtypes(got.updates, want.updates)
  assert_close(got.updates, want.updates, rtol=1e-5, atol=1e-6)
  assert_close([state.inner_state for state in got.states], want.states, rtol=1e-5, atol=1e-6)


@cases()
def test_updates_follow_the_params_dtype_and_the_state_keeps_its_types(case):
  """optax's ``test_preserve_dtype`` and ``test_state_shape_dtype_shard_stability``: updates have the params'
  dtypes, and every state has the types (shape, dtype, weak type) of `init`'s, step after step (else a `lax.cond`
  or `lax.scan` over the update fails, and a jitted loop recompiles)."""
  got = reference_run(case)
  for t, (updates, state) in enumerate(zip(got.updates, got.states[1:])):
    chex.assert_trees_all_equal_dtypes(updates, make_params())
    chex.assert_trees_all_equal_shapes(updates, make_params())
    chex.assert_tree_all_finite(comparable(updates))
    mismatches = type_mismatches(got.states[0], state)
    assert not mismatches, f"after update {t + 1}:\n" + "\n".join(mismatches)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(got.updates))


# optax's ``test_state_shape_dtype_shard_stability`` runs every optimizer on float16, bfloat16, float32 and float64
# params (float64 with jax_enable_x64). The float32 and bfloat16 leaves are the runs above; these trees add float64,
# alone and next to float16 and float32 leaves.
WIDE_DTYPES = (
  {"w": jnp.float64, "b": jnp.float64, "s": jnp.float64},
  {"w": jnp.float64, "b": jnp.float16, "s": jnp.float32},
)


def _cond_steps(tx, params, grads, pred, steps=2):
  """optax's stability check: `steps` updates, each in a `lax.cond` whose other branch returns ``(params, state)``
  (so the updates must have the params' types and the state `init`'s), applied to the params."""
  state = tx.init(params)
  for _ in range(steps):
    updates, state = jax.lax.cond(pred, lambda: tx.update(grads, state, params), lambda: (params, state))
    params = optax.apply_updates(params, updates)
  return params


@cases()
def test_float64_params_keep_their_dtype_and_the_state_its_types(case):
  """optax's dtype and state stability check on float64 params: traced (`jax.eval_shape`), with comm=None and, for
  the communicating transforms, inside `jax.shard_map` over 2 ranks. Traced only: the values are checked against
  float64 oracles in tests/test_onebit_common.py and tests/test_compressed_allreduce.py."""
  with jax.enable_x64(True):
    for dtypes in WIDE_DTYPES:
      params = {name: jnp.asarray(value, dtypes[name]) for name, value in PARAM_VALUES.items()}
      pred = jnp.bool_(True)
      got = jax.eval_shape(functools.partial(_cond_steps, case.build()), params, params, pred)
      assert not type_mismatches(params, got), dtypes
      if not case.communicating:
        continue
      tx = case.build("data")

      def local(params, grads, pred):
        if case.per_rank_params:
          params = jax.lax.pcast(params, ("data",), to="varying")
        return jax.tree.map(lambda p: p[None], _cond_steps(tx, params, jax.tree.map(lambda g: g[0], grads), pred))

      per_rank = jax.tree.map(lambda p: jnp.broadcast_to(p, (WORLD, *p.shape)), params)
      got = jax.eval_shape(
        jax.shard_map(local, mesh=h.host_mesh(WORLD), in_specs=(P(), P("data"), P()), out_specs=P("data")),
        params,
        per_rank,
        pred,
      )
      assert {name: x.dtype for name, x in got.items()} == dtypes


@cases()
def test_multisteps_accumulation_is_the_update_of_the_mean_gradient(case):
  """`optax.MultiSteps` with 2 mini-steps of gradients ``2 g`` and ``0``: zero updates on the first (optax's
  ``test_gradient_accumulation``), then the plain update of the mean g (exact: MultiSteps' running mean of 2g and
  0 rounds nowhere), and the plain run's state, outer step after outer step."""
  multi = optax.MultiSteps(case.build(), every_k_schedule=2)
  want = reference_run(case)
  state = multi.init(make_params())
  # optax's running mean divides the gradients by an int32 count, which strict dtype promotion rejects (an optax
  # limitation): MultiSteps runs under standard promotion, the plain run it is compared with under strict.
  with jax.numpy_dtype_promotion("standard"):
    update = jax.jit(multi.update).trace(want.params[0], state, want.params[0]).lower().compile()
  for t in range(STEPS):
    params, grads = want.params[t], grads_at(t)
    first, state = jax.block_until_ready(update(jax.tree.map(lambda g: g + g, grads), state, params))
    chex.assert_trees_all_equal(first, jax.tree.map(jnp.zeros_like, params))
    assert not bool(multi.has_updated(state))
    second, state = jax.block_until_ready(update(jax.tree.map(jnp.zeros_like, grads), state, params))
    assert bool(multi.has_updated(state))
    chex.assert_trees_all_equal_dtypes(second, want.updates[t])
    assert_close((second, state.inner_opt_state), (want.updates[t], want.states[t + 1]))


EXPLICIT_SPECS = {"w": P("x", None), "b": P("x"), "s": P()}


@cases()
def test_state_shapes_dtypes_and_shardings_are_stable_under_an_explicit_mesh(case):
  """optax's sharding tests: with params sharded over an Explicit mesh, the state after `update` has the types
  (shape, dtype, sharding) of the state after `init`, and jitted `init` gives eager `init`'s types."""
  mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:2])
  put = lambda tree: {n: jax.device_put(x, NamedSharding(mesh, EXPLICIT_SPECS[n])) for n, x in tree.items()}
  with jax.set_mesh(mesh):
    tx = case.build()
    params = put(make_params())
    state0 = tx.init(params)
    assert not type_mismatches(state0, jax.jit(tx.init)(params)), "jitted init"
    update = jax.jit(tx.update)
    state = state0
    for t in range(3):
      updates, state = jax.block_until_ready(update(put(grads_at(t)), state, params))
      mismatches = type_mismatches(state0, state)
      assert not mismatches, f"after update {t + 1}:\n" + "\n".join(mismatches)
      assert not type_mismatches(params, updates), "updates are typed like the params"


def _schedulable(case: Case) -> list[str]:
  """The hyperparameters of `case`'s factory annotated as accepting a schedule."""
  names = []
  for name, parameter in _signature(case.factory()).parameters.items():
    annotation = parameter.annotation
    if annotation in (optax.ScalarOrSchedule, optax.Schedule) or (
      isinstance(annotation, str) and re.search(r"\b(ScalarOrSchedule|Schedule)\b", annotation)
    ):
      names.append(name)
  return names


def _value(case: Case, name: str) -> Any:
  return case.kwargs().get(name, _signature(case.factory()).parameters[name].default)


def _constant_schedule_trace(case: Case, name: str) -> None:
  """Builds `case` with `name` as a constant schedule and traces (not compiles) its init and two updates."""
  tx = case.build(**{name: optax.constant_schedule(_value(case, name))})
  step = apply_step(tx)
  params = make_params()
  jax.eval_shape(lambda p, g: step(*step(p, tx.init(p), g)[:2], g), params, grads_at(0))


@cases([case for case in CASES if _schedulable(case)])
def test_schedules_are_accepted_where_the_signature_says_so(case):
  """optax's ``test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such``, for every hyperparameter
  annotated ``ScalarOrSchedule``: each builds and traces as a constant schedule, and all of them as constant
  schedules at once give the plain run's updates and states."""
  names = _schedulable(case)
  failures = {}
  for name in names:
    assert isinstance(_value(case, name), (int, float)), (name, _value(case, name))
    try:
      _constant_schedule_trace(case, name)
    except Exception as error:  # noqa: BLE001 - collected, reported together below
      failures[name] = f"{type(error).__name__}: {error}"
  assert not failures, failures
  tx = case.build(**{name: optax.constant_schedule(_value(case, name)) for name in names})
  got, want = run(jax.jit(apply_step(tx)), tx), reference_run(case, float32_decays=True)
  assert_close((got.params, got.updates), (want.params, want.updates))


# Building blocks of an alias: a hyperparameter both take must be accepted as a schedule by both or rejected by both.
FAMILIES = {
  alias: [case for case in CASES if case.name.startswith("scale_by_") and alias in case.name] for alias in ALIASES
}
SHARED = [
  pytest.param(alias, block, name, id=f"{alias}-{block.name}-{name}")
  for alias, blocks in FAMILIES.items()
  for block in blocks
  for name, parameter in _signature(block.factory()).parameters.items()
  if name in _signature(getattr(optax_lamb16, alias)).parameters
  and name != "comm"
  and isinstance(parameter.default, float)
]
CASE_OF = {case.name: case for case in CASES}


def _schedule_outcome(case: Case, name: str) -> str:
  """'accepted' (builds and traces with a constant schedule), 'rejected' (construction raises an error that names
  the argument) or what went wrong otherwise. (`test_schedules_are_accepted_where_the_signature_says_so` checks
  the values of the accepted ones that are annotated so.)"""
  try:
    case.build(**{name: optax.constant_schedule(_value(case, name))})
  except (TypeError, ValueError) as error:
    return "rejected" if f"`{name}`" in str(error) else f"rejected without naming `{name}`: {error}"
  try:
    _constant_schedule_trace(case, name)
  except Exception as error:  # noqa: BLE001 - the outcome is the point
    return f"accepted at construction, then failed: {type(error).__name__}: {error}"
  return "accepted"


@pytest.mark.parametrize("alias, block, name", SHARED)
def test_alias_and_its_blocks_agree_on_schedules(alias, block, name):
  outcomes = {alias: _schedule_outcome(CASE_OF[alias], name), block.name: _schedule_outcome(block, name)}
  assert set(outcomes.values()) <= {"accepted", "rejected"} and len(set(outcomes.values())) == 1, outcomes


@pytest.mark.parametrize("alias", ALIASES)
def test_learning_rate_is_required(alias):
  """As in optax's aliases: the first parameter, with no default."""
  parameters = list(inspect.signature(getattr(optax_lamb16, alias)).parameters.values())
  assert parameters[0].name == "learning_rate" and parameters[0].default is inspect.Parameter.empty, parameters[0]


@cases()
def test_init_on_abstract_shapes(case):
  tx = case.build()
  params = make_params()
  abstract = jax.eval_shape(tx.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
  concrete = tx.init(params)
  chex.assert_trees_all_equal_structs(abstract, concrete)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)


@cases()
def test_state_can_be_donated_to_a_jitted_step(case):
  """``jax.jit(step, donate_argnums=(0, 1))`` over the state straight from `init`, step after step (a state that
  holds one buffer twice fails with "Attempt to donate the same buffer twice"), gives the undonated results."""
  tx = case.build()
  step = apply_step(tx)
  donated = jax.jit(lambda params, state, grads: step(params, state, grads)[:2], donate_argnums=(0, 1))
  params, state = make_params(), tx.init(make_params())
  for t in range(STEPS):
    params, state = jax.block_until_ready(donated(params, state, grads_at(t)))
  want = reference_run(case)
  assert_close((params, state), (want.params[-1], want.states[-1]))


# ----------------------------------------------------------------------------------------------------------------------
# The communicating transforms inside `jax.shard_map` over 2 ranks (comm="data").

WORLD = 2


def _mesh_step(case: Case, tx, specs, **extra_args):
  """The shard_map step (to jit): params replicated (per rank for 0/1 Adam), gradients one row per rank."""
  param_spec = P("data") if case.per_rank_params else P()

  def local_step(params, state, grads):
    mine = jax.tree.map(lambda a: a[0], params) if case.per_rank_params else params
    updates, state = tx.update(jax.tree.map(lambda g: g[0], grads), state, mine, **extra_args)
    mine = optax.apply_updates(mine, updates)
    return (jax.tree.map(lambda a: a[None], mine) if case.per_rank_params else mine), state

  return jax.shard_map(
    local_step, mesh=h.host_mesh(WORLD), in_specs=(param_spec, specs, P("data")), out_specs=(param_spec, specs)
  )


def _mesh_init(case: Case, tx):
  """Global params and `sharded_init`'s state, with the state's partition specs."""
  mesh = h.host_mesh(WORLD)
  params = make_params()
  state = optax_lamb16.sharded_init(tx, params, mesh, "data")
  if case.per_rank_params:  # one copy per rank
    params = jax.tree.map(lambda p: jnp.broadcast_to(p, (WORLD, *p.shape)), params)
  params = jax.device_put(params, NamedSharding(mesh, P("data") if case.per_rank_params else P()))
  return params, state, optax_lamb16.state_partition_specs(state, "data")


@functools.cache
def _cached_mesh_init(case: Case):
  return _mesh_init(case, case.build("data"))


def mesh_start(case: Case):
  """`_mesh_init` of `case.build("data")`, computed once and handed out as fresh copies (steps may donate them)."""
  params, state, specs = _cached_mesh_init(case)
  return jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state), specs


def mesh_run(step, params, state, steps=STEPS, start=0):
  """`steps` calls of a jitted shard_map step from step `start`; the final params and the state after each step."""
  states = []
  for t in range(start, start + steps):
    params, state = jax.block_until_ready(step(params, state, grads_at(t, lead=(WORLD,))))  # one program at a time
    states.append(state)
  return params, states


@functools.cache
def mesh_reference_run(case: Case, float32_decays: bool = False):
  """The plain run of `case` with comm="data" over 2 ranks (`float32_decays`: with `float32_decay_rates`)."""
  tx = case.build("data", **(float32_decay_rates(case) if float32_decays else {}))
  params, state, specs = mesh_start(case)
  return mesh_run(jax.jit(_mesh_step(case, tx, specs)), params, state)


@cases(COMMUNICATING)
def test_mesh_step_with_extra_args_and_donated_state(case):
  """One jitted shard_map step that passes extra arguments and donates params and state (as a training loop
  would): it runs from `sharded_init`'s state, the second call compiles nothing, the global state keeps the
  shapes, dtypes and shardings `sharded_init` gave it step after step, and the results are the plain run's."""
  tx = case.build("data")
  params, state0, specs = mesh_start(case)
  step = jax.jit(_mesh_step(case, tx, specs, value=jnp.float32(1.0), unexpected_extra_args=1), donate_argnums=(0, 1))
  params, states = mesh_run(step, params, state0, steps=1)
  with compilations() as compiled:
    params, more = mesh_run(step, params, states[-1], steps=STEPS - 1, start=1)
  assert not compiled, f"a later call of the jitted shard_map step recompiles: {compiled}"
  for t, state in enumerate(states + more):  # the donated ones keep their types and shardings
    mismatches = type_mismatches(state0, state)
    shardings = [
      (a.sharding, b.sharding)
      for a, b in zip(jax.tree.leaves(state0), jax.tree.leaves(state))
      if not a.sharding.is_equivalent_to(b.sharding, a.ndim)
    ]
    assert not mismatches and not shardings, (t, mismatches, shardings)
  want_params, want_states = mesh_reference_run(case)
  assert_close((params, more[-1]), (want_params, want_states[-1]))


@cases(COMMUNICATING)
def test_mesh_inject_hyperparams_gives_the_same_params_and_states(case):
  """`inject_hyperparams` over a communicating transform: `sharded_init` and `state_partition_specs` see through
  its state, and every step's state and the params are the plain run's."""
  tx = inject(case, "data")
  params, state, specs = _mesh_init(case, tx)
  params, states = mesh_run(jax.jit(_mesh_step(case, tx, specs)), params, state)
  want_params, want_states = mesh_reference_run(case, float32_decays=True)
  assert_close(params, want_params, rtol=1e-5, atol=1e-6)
  assert_close([state.inner_state for state in states], want_states, rtol=1e-5, atol=1e-6)
