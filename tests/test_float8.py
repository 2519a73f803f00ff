"""The float8 casts LAMB16 uses are bitwise XLA's and ml_dtypes' casts (round to nearest even, subnormals, ties,
overflow, signed zeros and NaN)."""

import jax
import ml_dtypes
import numpy as np
import pytest

from optax_lamb16 import _float8 as float8


def probes(low_exponent: int, high_exponent: int, seed: int = 0) -> np.ndarray:
  """Random float32 over a range of exponents, every finite float16 and its float32 neighbours (which hold every
  float8 value, every midpoint between two, and the values just beside them), and the special values."""
  rng = np.random.default_rng(seed)
  n = 300_000
  bits = (
    (rng.integers(0, 2, n, dtype=np.uint32) << 31)
    | (rng.integers(low_exponent + 127, high_exponent + 127, n).astype(np.uint32) << 23)
    | rng.integers(0, 1 << 23, n, dtype=np.uint32)
  )
  halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
  halves = halves[np.isfinite(halves)]
  near = [halves, (halves.view(np.uint32) + 1).view(np.float32), (halves.view(np.uint32) - 1).view(np.float32)]
  special = np.array([0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf], np.float32)
  return np.concatenate([bits.view(np.float32), *near, special])


def same_bytes(got, want_dtype, x):
  xla = np.asarray(jax.jit(lambda v: v.astype(want_dtype))(x)).view(np.uint8)
  reference = x.astype(want_dtype).view(np.uint8)  # ml_dtypes
  got = np.asarray(got).view(np.uint8)
  assert np.array_equal(xla, reference)
  bad = got != reference
  assert not bad.any(), (x[bad][:8], got[bad][:8], reference[bad][:8])


def test_e5m2_cast_is_bitwise_the_reference_cast():
  x = probes(-30, 17)
  x = x[~(np.abs(x) > 3e38)]  # inf and NaN stay in as special values
  x = np.concatenate([x, np.array([np.inf, -np.inf, 57344, 61439.996, 61440, 1e6], np.float32)])
  same_bytes(jax.jit(float8.to_e5m2)(x), ml_dtypes.float8_e5m2, x)


@pytest.mark.parametrize("scale", [1.0, 2.0**-8])
def test_e4m3fn_cast_is_bitwise_the_reference_cast(scale):
  x = probes(-20, 10) * np.float32(scale)
  x = np.concatenate(
    [
      x,
      np.array(
        [448, -448, 463.99997, 464, -464, 480, 1e6, np.inf, -np.inf, 15, -15, 2.0**-9, 2.0**-10, 3 * 2.0**-11],
        np.float32,
      ),
    ]
  )
  same_bytes(jax.jit(float8.to_e4m3fn)(x), ml_dtypes.float8_e4m3fn, x)


@pytest.mark.parametrize("dtype", [float8.MOMENTUM_DTYPE, float8.VARIANCE_DTYPE])
@pytest.mark.parametrize("scale", [1.0, 3.7e-5, 1e-6 + 2.0**-30, 2.5])
def test_decode_is_bitwise_the_plain_cast_times_the_scale(dtype, scale):
  every_byte = np.arange(256, dtype=np.uint8).view(dtype)
  got = np.asarray(jax.jit(float8.decode)(every_byte, np.float32(scale)))
  want = every_byte.astype(np.float32) * np.float32(scale)
  assert np.array_equal(np.isnan(got), np.isnan(want))
  finite = ~np.isnan(want)  # NaN payloads may differ; every other value, signed zeros included, bit for bit
  assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def test_divide_is_ieee_division_where_xla_would_multiply_by_a_reciprocal():
  """XLA rewrites x / scalar and x / constant as x * (1 / scalar): an ulp off NumPy's quotient about one time in
  four, which flips float8 roundings. `float8.divide` must give NumPy's quotient bit for bit, specials included."""
  rng = np.random.default_rng(0)
  x = rng.uniform(-1e3, 1e3, 100_000).astype(np.float32)
  x[:4] = [np.nan, np.inf, -np.inf, 0.0]
  scale = np.float32(0.0123456)
  by_scalar = jax.jit(lambda a, s: float8.divide(a, s))(x, scale)
  plain = jax.jit(lambda a, s: a / s)(x, scale)
  by_constant = jax.jit(lambda a: float8.divide(a, np.float32(410240)))(x)
  with np.errstate(invalid="ignore"):
    np.testing.assert_array_equal(np.asarray(by_scalar), x / scale)
    np.testing.assert_array_equal(np.asarray(by_constant), x / np.float32(410240))
    # The rewrite this guards against is still there: the plain division is not NumPy's (if XLA stops rewriting,
    # divide may become a plain division).
    assert np.sum(np.asarray(plain)[4:] != x[4:] / scale) > 100
    # By the 410k leaf's N, about a quarter of plain quotients are off (measured: 23 %).
    plain_by_constant = np.asarray(jax.jit(lambda a: a / np.float32(410240))(x))[4:]
    assert np.mean(plain_by_constant != x[4:] / np.float32(410240)) > 0.15


def test_stochastic_e5m2_is_the_spec_rounding_and_unbiased():
  """SPEC.md 1b's stochastic rounding of v: bit for bit the NumPy oracle's (written from the spec), always one of
  the two e5m2 neighbours, grid values kept, the top never exceeded, NaN kept; and unbiased."""
  from tests import reference

  rng = np.random.default_rng(0)
  x = np.concatenate(
    [
      rng.uniform(0, 57344, 4000),
      10.0 ** rng.uniform(-12, 4.7, 4000),
      [0.0, 2.0**-16, 1.5 * 2.0**-15, 57344.0, 57344.0 * (1 + 2**-20), np.nan],
    ]
  ).astype(np.float32)
  for step, leaf in [(0, 0), (7, 3)]:
    bits = float8.random_bits(float8.rounding_key(jax.numpy.int32(step), leaf), x.size)
    got = np.asarray(jax.jit(float8.stochastic_e5m2)(x, bits))
    want = reference.stochastic_e5m2(x, step, leaf)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
  stored = got.astype(np.float32)
  assert np.isnan(stored[-1]) and stored[-2] == 57344.0 and stored[-3] == 57344.0
  on_grid = x[:4000].astype(ml_dtypes.float8_e5m2).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(float8.stochastic_e5m2(on_grid, bits[:4000])).astype(np.float32), on_grid)
  # The mean of 100k draws of one value, within 5 standard deviations of two-point draws (gap / value: at most 1/4
  # for normal e5m2 values; 2^-16 / 3e-6 = 5.1 for the subnormal one).
  for value, relative_gap in ((1.3e-3, 0.25), (1000.7, 0.25), (3e-6, 5.1)):
    draws = np.full(100_000, value, np.float32)
    mean = np.asarray(
      float8.stochastic_e5m2(draws, float8.random_bits(jax.numpy.uint32(11), draws.size)), np.float64
    ).mean()
    assert abs(mean / value - 1) < 5 * relative_gap / 2 / np.sqrt(draws.size), (value, mean / value)
  # Rounded to nearest, the same draws would all be 1.22e-3, 6 % below.
  assert float(np.float32(1.3e-3).astype(ml_dtypes.float8_e5m2)) < 1.3e-3 * 0.97


def test_two_stage_reductions_fold_large_leaves_and_keep_their_results():
  """`leaf_sum` and `block_maxima` fold leaves of FOLD_MIN_SIZE elements or more in groups of adjacent elements of
  the last axis (fewer under 8 devices, so that no group spans two of them), and not smaller ones; the block maxima
  stay exact and the sums within a few ulps of the exactly rounded sum."""
  from tests import reference

  assert float8.FOLD_MIN_SIZE == 1 << 19 and jax.device_count() == 8
  assert [float8._fold_width(n) for n in (1024, 512, 500, 1000, 641)] == [8, 8, 1, 1, 1]
  rng = np.random.default_rng(5)
  shape = (1024, 1024)
  x = np.minimum((rng.standard_t(2, shape) * 10.0 ** rng.uniform(-6, 1, shape)) ** 2, 10).astype(np.float32)
  assert jax.jit(lambda a: float8.fold_last_axis(a, jax.numpy.add))(x).shape == (1024, 128)
  assert jax.jit(lambda a: float8.fold_last_axis(a, jax.numpy.add))(x[:256]).shape == (256, 1024)  # below the size
  got, want = np.float32(jax.jit(float8.leaf_sum)(x)), reference.exact_sum(x)
  assert abs(int(got.view(np.int32)) - int(want.view(np.int32))) <= 4, (got, want)
  maxima = np.asarray(jax.jit(float8.block_maxima, static_argnums=1)(x, 256))
  np.testing.assert_array_equal(maxima, x.reshape(-1, 256).max(1))
