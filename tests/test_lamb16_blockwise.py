"""LAMB16 with block-wise absmax storage (SPEC.md section 1b) against its NumPy oracle, its state bytes, its kernels,
and `float8_health` on planted saturation and overflow."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_lamb16
from tests import reference
from tests.test_lamb16 import make_grads, make_params, run_steps

# Leaves shorter than a block, with a partial last block, of whole blocks only (viewed flat, as 24 x 256), and a large
# one with a partial last block.
# Leaves of at most this many elements follow the oracle to float32 rounding at every step. Beyond, the trust norms'
# float32 sums add in another order than NumPy's, the params differ by an ulp, so do the gradients that depend on
# them, and now and then a float8 rounding of one element flips (measured: 5e-5 of the distance moved on 6144
# elements, 2e-4 on 66k), which the trajectory carries on.
EXACT_ORDER_SIZE = 1024
SHAPES = {"tiny": (10,), "small": (10, 64), "whole_blocks": (96, 64), "large": (256, 257)}


def run_both(tx_kwargs, steps, grad_scale, block_size=256, seed=0):
  """`lamb16_blockwise` (jitted) and the oracle on the same gradients: (state, drift per leaf and step, oracle)."""
  start = make_params(seed, SHAPES)
  names = sorted(start)
  tx = optax_lamb16.lamb16_blockwise(**tx_kwargs, block_size=block_size)
  lr = tx_kwargs["learning_rate"]
  oracle = reference.Lamb16BlockwiseReference(
    [start[n] for n in names], block_size=block_size, **{k: v for k, v in tx_kwargs.items() if k != "learning_rate"}
  )
  step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p)))
  params, state = jax.tree.map(jnp.asarray, start), tx.init(start)
  params_np = [start[n] for n in names]
  rng = np.random.default_rng(seed + 1)
  drift = {n: [] for n in names}
  for _ in range(steps):
    grads = make_grads(dict(zip(names, params_np)), rng, grad_scale)
    params, state = step(params, state, grads)
    params_np = oracle.step(params_np, [grads[n] for n in names], lr)
    for n, want in zip(names, params_np):
      moved = np.linalg.norm(want - start[n])
      assert moved > 0
      drift[n].append(np.linalg.norm(np.asarray(params[n]) - want) / moved)
  return state, drift, oracle


@pytest.mark.parametrize(
  "lr, weight_decay, grad_scale",
  [
    pytest.param(1e-3, 0.0, 1.0, id="reference-lr"),
    pytest.param(0.02, 0.01, 1.0, id="mnist-batch1024"),
    pytest.param(0.01, 0.01, 1e-4, id="tiny-grads"),
    pytest.param(0.01, 0.1, 100.0, id="huge-grads"),
  ],
)
@pytest.mark.parametrize("stochastic_rounding", [False, True], ids=["nearest", "stochastic"])
def test_matches_numpy_oracle_every_step(lr, weight_decay, grad_scale, stochastic_rounding):
  state, drift, oracle = run_both(
    dict(learning_rate=lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding), 40, grad_scale
  )
  for name, shape in SHAPES.items():
    exact = np.prod(shape) <= EXACT_ORDER_SIZE
    # Beyond EXACT_ORDER_SIZE, measured: at most 1.4e-4 rounded to nearest, 7.4e-4 rounded stochastically.
    assert max(drift[name]) <= (1e-5 if exact else 1e-3 if stochastic_rounding else 5e-4), (name, max(drift[name]))
  for s, name in zip(oracle.states, sorted(SHAPES)):
    # The params (and the gradients that depend on them) are float32 ulps apart: so are the scales.
    exact = np.prod(SHAPES[name]) <= EXACT_ORDER_SIZE
    for got, want in ((state.mu_scale[name], s.sm), (state.nu_scale[name], s.sv)):
      close = np.mean(np.abs(np.asarray(got) - want) <= 1e-5 * want)
      assert close == 1.0 if exact else close > 0.99, (name, close)
    for got, want in ((state.mu[name], s.mq), (state.nu[name], s.vq)):
      agree = np.mean(np.asarray(got.astype(jnp.float32)) == want.astype(np.float32))
      assert agree > 0.99, (name, agree)
    # Nothing clips or overflows, and each block's largest m is stored at e4m3fn's top.
    m = np.asarray(state.mu[name].astype(jnp.float32))
    assert np.all(np.isfinite(m)) and np.all(np.isfinite(np.asarray(state.nu[name].astype(jnp.float32))))
    assert np.abs(m).max() == 448.0


def test_small_block_size_with_partial_blocks():
  state, drift, _ = run_both(dict(learning_rate=0.02, weight_decay=0.01), 15, 1.0, block_size=7)
  worst = {n: max(d) for n, d in drift.items()}
  assert all(worst[n] <= (1e-5 if np.prod(SHAPES[n]) <= EXACT_ORDER_SIZE else 5e-4) for n in SHAPES), worst
  assert state.mu_scale["small"].shape == (-(-640 // 7),)


@pytest.mark.parametrize("block_size", [256, 1024])
def test_state_bytes_per_parameter(block_size):
  """2 + 8 / B bytes per parameter plus a count: at most 2.04 for B >= 256 on a model-like tree."""
  shapes = {
    "embed": (256, 128),
    "qkv": (128, 384),
    "mlp_in": (128, 512),
    "mlp_out": (512, 128),
    "head": (128, 256),
    "norm": (128,),
    "bias": (512,),
  }
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = optax_lamb16.lamb16_blockwise(1e-3, block_size=block_size).init(params)
  n = sum(p.size for p in jax.tree.leaves(params))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  blocks = sum(-(-p.size // block_size) for p in jax.tree.leaves(params))
  assert nbytes == 2 * n + 8 * blocks + 4
  assert nbytes / n <= 2.04, nbytes / n
  # init works on abstract shapes, as optax's do.
  abstract = jax.eval_shape(optax_lamb16.lamb16_blockwise(1e-3, block_size=block_size).init, params)
  assert abstract.mu_scale["embed"].shape == (256 * 128 // block_size,)


def test_fused_alias_equals_the_chain_of_building_blocks():
  lr = 0.02
  chain = optax.chain(
    optax_lamb16.scale_by_lamb16_blockwise(),
    optax.add_decayed_weights(0.01),
    optax_lamb16.scale_by_lamb16_trust_ratio(lr),
    optax.scale_by_learning_rate(lr),
  )
  params = jax.tree.map(jnp.asarray, make_params(0, SHAPES))
  rng = np.random.default_rng(5)
  grads_list = [jax.tree.map(jnp.asarray, make_grads(make_params(0, SHAPES), rng, 1.0)) for _ in range(8)]
  got, fused_state = run_steps(optax_lamb16.lamb16_blockwise(lr, weight_decay=0.01), params, grads_list)
  want, chain_state = run_steps(chain, params, grads_list)
  for name in SHAPES:
    moved = np.linalg.norm(np.asarray(want[name]) - np.asarray(params[name]))
    assert np.linalg.norm(np.asarray(got[name]) - np.asarray(want[name])) <= 1e-5 * moved, name
    # The trust norms add in another order: params, gradients and scales are ulps apart.
    got_scale, want_scale = np.asarray(fused_state.mu_scale[name]), np.asarray(chain_state[0].mu_scale[name])
    assert np.mean(np.abs(got_scale - want_scale) <= 1e-5 * want_scale) > 0.99, name


def _planted_state(blockwise: bool):
  """A state whose moments are planted: 3 of 8 m at the ±15 clip, 1 zero; 2 v at +inf, 1 zero."""
  mu = jnp.array([15.0, -15.0, 15.0, 1.0, 0.0, 2.0, -3.0, 4.0]).astype(jnp.float8_e4m3fn)
  nu = jnp.array([jnp.inf, jnp.inf, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).astype(jnp.float8_e5m2)
  scale = jnp.ones((1,) if blockwise else (), jnp.float32)
  other = jnp.array([1.0, 0.0]).astype(jnp.float8_e4m3fn), jnp.array([0.0, 0.0]).astype(jnp.float8_e5m2)
  other_scale = jnp.ones((1,) if blockwise else (), jnp.float32)
  return optax_lamb16.ScaleByLamb16State(
    jnp.zeros([], jnp.int32),
    {"a": mu, "b": other[0]},
    {"a": nu, "b": other[1]},
    {"a": scale, "b": other_scale},
    {"a": scale, "b": other_scale},
  )


def test_float8_health_on_planted_saturation_and_overflow():
  faithful = optax_lamb16.float8_health(_planted_state(False), per_leaf=True)
  assert [float(x) for x in faithful["mu_saturated"]] == [3 / 8, 0.0]
  assert [float(x) for x in faithful["mu_zero"]] == [1 / 8, 1 / 2]
  assert [float(x) for x in faithful["nu_inf"]] == [2 / 8, 0.0]
  assert [float(x) for x in faithful["nu_zero"]] == [1 / 8, 1.0]
  overall = optax_lamb16.float8_health(_planted_state(False))
  assert float(overall["mu_saturated"]) == pytest.approx(3 / 10)
  assert float(overall["nu_zero"]) == pytest.approx(3 / 10)
  # The block-wise storage never clips: a stored ±15 is an ordinary value there.
  assert float(optax_lamb16.float8_health(_planted_state(True))["mu_saturated"]) == 0.0
  assert float(optax_lamb16.float8_health(_planted_state(True))["nu_inf"]) == pytest.approx(2 / 10)
  # Found inside wrappers, and jittable.
  wrapped = optax.inject_hyperparams(optax_lamb16.lamb16)(learning_rate=1e-3)
  state = wrapped.init({"w": jnp.zeros(4)})
  health = jax.jit(optax_lamb16.float8_health)(optax.MultiSteps(wrapped, 2).init({"w": jnp.zeros(4)}))
  assert float(health["nu_zero"]) == 1.0 and float(optax_lamb16.float8_health(state)["mu_zero"]) == 1.0
  with pytest.raises(ValueError, match="holds no float8 moments"):
    optax_lamb16.float8_health(optax.adam(1e-3).init({"w": jnp.zeros(4)}))


def test_faithful_saturates_where_blockwise_does_not():
  """The reason for the option, measured: one step on a 20k-element leaf."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal(20_000), jnp.float32)}
  grads = {"w": jnp.asarray(rng.standard_normal(20_000), jnp.float32)}
  health = {}
  for name, tx in (("faithful", optax_lamb16.lamb16(1e-3)), ("blockwise", optax_lamb16.lamb16_blockwise(1e-3))):
    _, state = tx.update(grads, tx.init(params), params)
    health[name] = optax_lamb16.float8_health(state)
  assert float(health["faithful"]["mu_saturated"]) > 0.9
  assert float(health["blockwise"]["mu_saturated"]) == 0.0 and float(health["blockwise"]["mu_zero"]) < 1e-3


@pytest.mark.parametrize("block_size", [0, -4, 2.5, True])
def test_bad_block_size_is_rejected(block_size):
  with pytest.raises(ValueError, match="block_size"):
    optax_lamb16.lamb16_blockwise(1e-3, block_size=block_size)
  with pytest.raises(ValueError, match="block_size"):
    optax_lamb16.scale_by_lamb16_blockwise(block_size=block_size)


def test_inject_hyperparams_as_written():
  """`optax.inject_hyperparams(lamb16_blockwise)` with no `static_args`: the default block size, a block size given
  (which inject_hyperparams turns into an int32 array: `init` reads its value, the jitted update recovers it from the
  state's block counts) and stochastic rounding (a bool, never injected) train as the plain optimizer does."""
  params = {"w": jnp.linspace(-1.0, 1.0, 64 * 80).reshape(64, 80), "b": jnp.zeros(7)}  # w: 80 blocks of 64
  rng = np.random.default_rng(0)
  grads_list = [
    jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(3)
  ]
  # Injected decay rates are float32 arrays (1 - b formed in float32): the plain optimizer gets them so too.
  betas = dict(b1=jnp.float32(0.9), b2=jnp.float32(0.999))
  for kwargs in (dict(), dict(block_size=64), dict(stochastic_rounding=True, block_size=64)):
    injected = optax.inject_hyperparams(optax_lamb16.lamb16_blockwise)(learning_rate=1e-2, **kwargs)
    got, state = run_steps(injected, params, grads_list)
    want, _ = run_steps(optax_lamb16.lamb16_blockwise(1e-2, **betas, **kwargs), params, grads_list)
    assert state.inner_state.mu_scale["w"].shape == ((5120 // kwargs.get("block_size", 256)),)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), got, want)


def test_a_traced_block_size_that_the_state_cannot_tell_is_a_clear_error():
  """A leaf of 40 elements in 3 blocks fits every block size from 14 to 19; and a jitted `init` has only the traced
  array. Both ask for `static_args`, which still works."""
  params = {"w": jnp.zeros(40)}
  tx = optax.inject_hyperparams(optax_lamb16.lamb16_blockwise)(1e-3, block_size=16)
  state = tx.init(params)
  assert state.inner_state.mu_scale["w"].shape == (3,)
  with pytest.raises(ValueError, match="from 14 to 19.*static_args=\\('block_size',\\)"):
    jax.jit(tx.update)(params, state, params)
  with pytest.raises(ValueError, match="`init` got a traced array.*static_args=\\('block_size',\\)"):
    jax.jit(tx.init)(params)
  static = optax.inject_hyperparams(optax_lamb16.lamb16_blockwise, static_args=("block_size",))(1e-3, block_size=16)
  updates, _ = jax.jit(static.update)(params, jax.jit(static.init)(params), params)
  assert updates["w"].shape == (40,)


def test_stochastic_rounding_lets_v_follow_a_decline():
  """After one large gradient, v decays by 0.1 % a step while each block's largest element keeps its gradient (and
  the block its scale). Rounded to nearest, the others keep their stored v (an e5m2 step is 25 %); rounded
  stochastically, their stored v follows the float32 EMA on average. (Where a whole block decays together, the
  scale carries the decay either way.)"""
  n, steps = 64 * 256, 300
  rng = np.random.default_rng(0)
  magnitude = (10.0 ** rng.uniform(-2, 0, n)).astype(np.float32)
  magnitude[::256] = 10.0  # each block's largest element: its v sets the block's scale
  first = (rng.choice([-1.0, 1.0], n) * magnitude).astype(np.float32)
  later = (0.01 * first).astype(np.float32)  # the others' v then decays towards 1e-4 of its value
  later[::256] = first[::256]
  v = np.zeros(n)
  for t in range(steps):
    v = 0.999 * v + 0.001 * (first if t == 0 else later).astype(np.float64) ** 2
  ratios = {}
  for stochastic in (False, True):
    tx = optax_lamb16.scale_by_lamb16_blockwise(stochastic_rounding=stochastic)
    state = tx.init({"w": jnp.zeros(n)})
    update = jax.jit(tx.update)
    for t in range(steps):
      _, state = update({"w": jnp.asarray(first if t == 0 else later)}, state)
    stored = np.asarray(state.nu["w"].astype(jnp.float32)) * np.repeat(np.asarray(state.nu_scale["w"]), 256)
    followers = np.ones(n, bool)
    followers[::256] = False
    ratios[stochastic] = np.mean(stored[followers]) / np.mean(v[followers])
  assert abs(ratios[True] - 1) < 0.03, ratios
  assert ratios[False] > 1.05, ratios  # the test can fail: rounding to nearest does not follow


@pytest.mark.parametrize("blockwise", [False, True])
def test_momentum_of_quiet_elements_sticks_at_the_smallest_code(blockwise):
  """Rounded to nearest, m of an element whose gradients stop decays (10 % a step) down to float8_e4m3fn's smallest
  subnormal code, 2^-9, and stays there while its scale holds (0.9 * 2^-9 rounds back up): after 300 quiet steps the
  float32 EMA is 0.9^300 ~ 2e-14 of where it started, the stored m 2^-9 of the scale. The direction of such an
  element, m / (sqrt(v) + eps), keeps its sign and does not go to 0 in either storage."""
  tx = optax_lamb16.scale_by_lamb16_blockwise() if blockwise else optax_lamb16.scale_by_lamb16()
  state = tx.init({"w": jnp.zeros(256)})
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  first = rng.standard_normal(256).astype(np.float32)
  for t in range(300):
    g = rng.standard_normal(256).astype(np.float32)
    g[:128] = first[:128] if t == 0 else 0.0  # half the elements get one gradient, then none
    _, state = update({"w": jnp.asarray(g)}, state)
  codes = np.abs(np.asarray(state.mu["w"].astype(jnp.float32)))
  assert (codes[:128] == 2.0**-9).all(), sorted(set(codes[:128].tolist()))
  assert (np.sign(np.asarray(state.mu["w"].astype(jnp.float32))[:128]) == np.sign(first[:128])).all()


def test_stochastic_rounding_is_a_static_bool():
  with pytest.raises(ValueError, match="stochastic_rounding"):
    optax_lamb16.lamb16_blockwise(1e-3, stochastic_rounding="yes")
  with pytest.raises(ValueError, match="stochastic_rounding"):
    optax_lamb16.scale_by_lamb16_blockwise(stochastic_rounding=1)
  with pytest.raises(ValueError, match="stochastic_rounding.*traced"):
    jax.jit(lambda flag: optax_lamb16.lamb16_blockwise(1e-3, stochastic_rounding=flag))(jnp.bool_(True))


def test_block_layouts_are_the_flat_leafs_blocks():
  """SPEC.md 1b's blocks run over the row-major flattened leaf, whatever view of the leaf computes them: the leaf's
  own shape split in its last dims (4 x 512 -> 4 x 2 x 256; 3 x 128 x 2 -> 3 x 1 x 256; 96 x 64 -> 24 x 256) or,
  when the size is not a multiple of the block size, the flattened leaf by windows."""
  from optax_lamb16 import _float8 as float8

  rng = np.random.default_rng(0)
  for shape, block, view in [
    ((4, 512), 256, (4, 2, 256)),
    ((3, 128, 2), 256, (3, 1, 256)),
    ((96, 64), 256, (24, 256)),
    ((10, 64), 256, None),
    ((7, 5), 4, None),
    ((), 256, None),
    ((12,), 5, None),
  ]:
    assert float8.block_layout(shape, block) == view
    x = np.abs(rng.standard_normal(shape)).astype(np.float32)
    blocks = -(-x.size // block)
    flat = np.pad(x.reshape(-1), (0, blocks * block - x.size)).reshape(blocks, block)
    np.testing.assert_array_equal(np.asarray(jax.jit(float8.block_maxima, static_argnums=1)(x, block)), flat.max(1))
    scales = np.arange(blocks, dtype=np.float32)
    expanded = jax.jit(float8.expand_blocks, static_argnums=(1, 2))(scales, shape, block)
    np.testing.assert_array_equal(np.asarray(expanded), np.repeat(scales, block)[: x.size].reshape(shape))


def test_quantizer_study_runs_and_ranks_the_storages():
  """benchmarks/quantizer_study.py on a small stream: every storage reported, and the ranking the README cites
  (per-tensor worst, stochastic rounding of v better than rounding to nearest)."""
  from benchmarks import quantizer_study

  results = quantizer_study.run(elements=4096, steps=400, seed=0)
  assert len(results) == 6 and all(np.isfinite(v) for r in results.values() for v in r.values())
  error = {name: r["direction_error"] for name, r in results.items()}
  assert (
    error["block-wise, stochastic rounding of v"]
    < 0.7 * error["block-wise"]
    < 0.7 * error["per-tensor (lamb16, the reference)"]
  )
