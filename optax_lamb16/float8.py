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


def encode_momentum(m: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e4m3fn of ``clip(m / scale, -15, 15)``."""
  return jnp.clip(m / scale, -MOMENTUM_CLIP, MOMENTUM_CLIP).astype(MOMENTUM_DTYPE)


def encode_variance(v: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e5m2 of ``min(v, 10) / scale`` (can overflow to +inf: see the module docstring)."""
  return (jnp.minimum(v, SQUARE_CLIP) / scale).astype(VARIANCE_DTYPE)
