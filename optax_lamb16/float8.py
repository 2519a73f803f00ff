"""Storage of normalised moments in float8 with one float32 scale per tensor (SPEC.md section 1).

The first moment is stored as float8_e4m3fn (3 mantissa bits, finite range ±448) after dividing by its scale and
clipping to ±15; the second moment as float8_e5m2 (2 mantissa bits, range up to 57344) after clipping to 10 and
dividing by its scale. Float8 casts do not saturate, so every encode clips first where the reference does.

The reference does not clip the normalised second moment: when its scale is dominated by `eps` and an element's v
reaches ``61440 * scale`` (about 0.06 with eps = 1e-6; typical of one large gradient in a big, otherwise quiet leaf
such as an embedding row), that element encodes as +inf (e5m2's largest finite value is 57344; round-to-nearest
carries everything from 61440 up to inf). It then decodes to inf, its Adam direction is 0 (no NaN: m stays finite),
and the next encode clips v to 10 first, which still overflows while ``10 / scale >= 61440`` (scale <= 1.63e-4):
the element stops training until its leaf's scale grows, then resumes with v = 10. Other elements and leaves are
unaffected. This faithful behaviour is kept, tested (tests/test_lamb16.py, tests/test_bad_input.py) and documented,
not silently changed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MOMENTUM_DTYPE = jnp.float8_e4m3fn
VARIANCE_DTYPE = jnp.float8_e5m2
# Normalised first moments are clipped to ±MOMENTUM_CLIP before the e4m3fn cast.
MOMENTUM_CLIP = 15.0
# Squares in the scale norms, and the second moment itself, are clipped at SQUARE_CLIP.
SQUARE_CLIP = 10.0


def decode(stored: jax.Array, scale: jax.Array) -> jax.Array:
  """Float32 value of a float8 tensor stored with `scale`."""
  return stored.astype(jnp.float32) * scale


def moment_scale(x: jax.Array, eps: jax.Array | float) -> jax.Array:
  """The reference's per-tensor scale: ``sqrt(sum(min(x*x, 10))) / N + eps`` (N, not sqrt(N); N >= 1)."""
  clipped_squares = jnp.minimum(x * x, SQUARE_CLIP)
  return jnp.sqrt(jnp.sum(clipped_squares)) / max(x.size, 1) + eps


def _kept_float16_bits(x: jax.Array, drop: int) -> jax.Array:
  """The float16 bits of float32 `x` without their `drop` lowest mantissa bits, rounded to nearest even (uint32).

  float8_e5m2 is float16 with 8 fewer mantissa bits, and float8_e4m3fn (times 2^-8) float16 with 7 fewer, subnormals
  included, so a float8 cast is a float16 cast (fast on CPUs) plus an integer rounding. Bitwise equal to XLA's and
  ml_dtypes' casts (tests/test_float8.py); XLA:CPU's own float8 casts are slower.
  """
  half_value = x.astype(jnp.float16)
  bits = jax.lax.bitcast_convert_type(half_value, jnp.uint16).astype(jnp.uint32)
  tie = 1 << (drop - 1)
  low = bits & ((1 << drop) - 1)
  kept = bits >> drop
  up = (low > tie) | ((low == tie) & ((kept & 1) == 1))
  # Rounding to float16 can land exactly on a midpoint of the float8 grid from a value that was not on it (double
  # rounding): the float32 value decides.
  back = half_value.astype(jnp.float32)
  up = jnp.where((low == tie) & (back != x), jnp.abs(x) > jnp.abs(back), up)
  return kept + up.astype(jnp.uint32)


def _nan_byte(x: jax.Array, nan_bits: int) -> jax.Array:
  return jnp.uint32(nan_bits) | (jnp.signbit(x).astype(jnp.uint32) << 7)


def to_e4m3fn(x: jax.Array) -> jax.Array:
  """``x.astype(float8_e4m3fn)`` for float32 `x` with |x| <= 448 or NaN (no overflow handling: clip first)."""
  kept = _kept_float16_bits(x * jnp.float32(2.0 ** -8), 7)
  byte = jnp.where(jnp.isnan(x), _nan_byte(x, 0x7F), ((kept >> 1) & 0x80) | (kept & 0x7F))
  return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), MOMENTUM_DTYPE)


def to_e5m2(x: jax.Array) -> jax.Array:
  """``x.astype(float8_e5m2)`` for float32 `x`: round to nearest even, overflow to ±inf (from 61440), NaN kept."""
  byte = jnp.where(jnp.isnan(x), _nan_byte(x, 0x7E), _kept_float16_bits(x, 8) & 0xFF)
  return jax.lax.bitcast_convert_type(byte.astype(jnp.uint8), VARIANCE_DTYPE)


def encode_momentum(m: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e4m3fn of ``clip(m / scale, -15, 15)``."""
  return to_e4m3fn(jnp.clip(m / scale, -MOMENTUM_CLIP, MOMENTUM_CLIP))


def encode_variance(v: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e5m2 of ``min(v, 10) / scale`` (can overflow to +inf: see the module docstring)."""
  return to_e5m2(jnp.minimum(v, SQUARE_CLIP) / scale)
