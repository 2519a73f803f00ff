"""Storage of normalised moments in float8: one float32 scale per tensor, faithful to the reference (Algorithms section
1), or one per block of elements (section 1b, at the end of this module).

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

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_lamb16 import _common

MOMENTUM_DTYPE = jnp.float8_e4m3fn
VARIANCE_DTYPE = jnp.float8_e5m2
# Normalised first moments are clipped to ±MOMENTUM_CLIP before the e4m3fn cast.
MOMENTUM_CLIP = 15.0
# Squares in the scale norms, and the second moment itself, are clipped at SQUARE_CLIP.
SQUARE_CLIP = 10.0


def _float16_bits(byte: jax.Array, dtype) -> jax.Array:
  """The float16 whose value is a `dtype` byte's (for e4m3fn, 2^-8 times it), as uint16 bits.

  float8_e5m2 is float16 without its 8 lowest mantissa bits, and float8_e4m3fn (times 2^-8) float16 with 4 exponent
  bits and without 7 mantissa bits, subnormals included, so decoding is a shift plus the CPU's float16 conversion
  (XLA:CPU's own float8 conversions are several times slower).
  """
  byte = byte.astype(jnp.uint16)
  if dtype == VARIANCE_DTYPE:
    return byte << 8
  return ((byte & 0x80) << 8) | ((byte & 0x7F) << 7)


def decode(stored: jax.Array, scale: jax.Array) -> jax.Array:
  """Float32 value of a float8 tensor stored with `scale`: ``stored.astype(float32) * scale``.

  On CPU it is computed through float16 bits (`decode_via_float16`, bitwise the same; XLA:CPU's own float8
  conversion is several times slower); elsewhere it is XLA's conversion, native on GPUs with float8 (H100, H200).
  The choice is made when the step is lowered, for the platform lowered to.
  """
  return jax.lax.platform_dependent(stored, scale, cpu=decode_via_float16, default=decode_native)


def decode_native(stored: jax.Array, scale: jax.Array) -> jax.Array:
  """``stored.astype(float32) * scale``, XLA's own float8 conversion."""
  return stored.astype(jnp.float32) * scale


def decode_via_float16(stored: jax.Array, scale: jax.Array) -> jax.Array:
  """`decode_native` bitwise, through float16 bits: a shift and the CPU's float16 conversion."""
  byte = jax.lax.bitcast_convert_type(stored, jnp.uint8)
  value = jax.lax.bitcast_convert_type(_float16_bits(byte, stored.dtype), jnp.float16).astype(jnp.float32)
  if stored.dtype == VARIANCE_DTYPE:
    return value * scale
  # Multiplying by 2^8 first is exact, so this rounds once, as the plain product does. 0x7F/0xFF are e4m3fn's NaN.
  value = jnp.where((byte & 0x7F) == 0x7F, jnp.nan, value)
  return value * (scale * jnp.float32(256.0))


def _signed(bits: jax.Array, byte: jax.Array, dtype) -> jax.Array:
  sign = (bits >> 24) & jnp.uint32(0x80)
  return jax.lax.bitcast_convert_type((byte | sign).astype(jnp.uint8), dtype)


# The casts are XLA's own conversions, on every platform. On XLA:CPU a cast written in float32's bits runs about 0.4 ms
# per million elements faster, but its twenty-odd operations per cast roughly double the compile time of a step.
def to_e4m3fn(x: jax.Array) -> jax.Array:
  """``x.astype(float8_e4m3fn)`` for float32 `x`: round to nearest even; from 464 up, inf and NaN give NaN."""
  return x.astype(MOMENTUM_DTYPE)


def to_e5m2(x: jax.Array) -> jax.Array:
  """``x.astype(float8_e5m2)`` for float32 `x`: round to nearest even, overflow to ±inf (from 61440), NaN kept."""
  return x.astype(VARIANCE_DTYPE)


def divide(x: jax.Array, y: jax.Array | float) -> jax.Array:
  """``x / y`` rounded once, as IEEE division (and NumPy, and PyTorch's division by a tensor) rounds it.

  XLA's algebraic simplifier rewrites a division by a constant or by a broadcast scalar into a multiplication by its
  rounded reciprocal, an ulp off ``x / y`` for up to one quotient in four (how many depends on y): enough to flip the
  float8 rounding of an element that sits near a rounding boundary, and the trajectory carries the flip on. A
  divisor that is NaN-guarded per element of `x` is neither, so the division stays a division (same result for
  every x, NaN and inf included).
  """
  return x / jnp.where(x != x, jnp.float32(1), y)


def clipped_square(x: jax.Array) -> jax.Array:
  """``min(x*x, 10)``: the terms of the moment scales."""
  return jnp.minimum(x * x, SQUARE_CLIP)


def scale_from_sum(total: jax.Array, n: int, eps: jax.Array | float) -> jax.Array:
  """The reference's per-tensor scale from ``total = sum(clipped_square(x))``: ``sqrt(total) / N + eps`` (N, not
  sqrt(N); N >= 1)."""
  return divide(jnp.sqrt(total), jnp.float32(max(n, 1))) + eps  # a float32 N: leaves may exceed int32


def encode_momentum(m: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e4m3fn of ``clip(m / scale, -15, 15)``."""
  return to_e4m3fn(jnp.clip(divide(m, scale), -MOMENTUM_CLIP, MOMENTUM_CLIP))


def encode_variance(v: jax.Array, scale: jax.Array) -> jax.Array:
  """float8_e5m2 of ``min(v, 10) / scale`` (can overflow to +inf: see the module docstring)."""
  return to_e5m2(divide(jnp.minimum(v, SQUARE_CLIP), scale))


# ---------------------------------------------------------------------------------------------------------------
# Block-wise absmax storage (Algorithms section 1b, `lamb16_blockwise`): one float32 scale per block of elements, the
# block's largest magnitude stored at the format's largest finite value, so that nothing clips or overflows.

MOMENTUM_TOP = 448.0  # float8_e4m3fn's largest finite value
VARIANCE_TOP = 57344.0  # float8_e5m2's
# The smallest scale: float32's smallest normal number, so that an all-zero block divides 0 by a positive number.
SCALE_FLOOR = 2.0**-126


def num_blocks(size: int, block_size: int) -> int:
  """Blocks of `block_size` elements that cover `size` elements (the last may be shorter)."""
  return -(-size // block_size)


def block_layout(shape: tuple[int, ...], block_size: int) -> tuple[int, ...] | None:
  """The blocked view of a leaf of `shape` (Algorithms section 1b: blocks of the row-major flattened leaf), or None.

  Where the product T of the last dims ``shape[k:]`` is a multiple of `block_size` for some k (the largest such k,
  so the fewest dims are merged), the view is ``shape[:k] + (T // B, B)``: a reshape that keeps the leading dims and
  splits the merged ones, which XLA's SPMD partitioner does in place for a leaf sharded along any of them, so that no
  leaf moves between devices. None when the size is not a multiple of B (the last block is shorter).
  """
  size = 1
  for k in range(len(shape) - 1, -1, -1):
    size *= shape[k]
    if size % block_size == 0:
      return tuple(shape[:k]) + (size // block_size, block_size)
  return None


# Reductions in two stages. XLA:CPU's reduce reads its operand from memory, so a whole-leaf `jnp.sum` of terms
# computed from the state first writes every term to a leaf-sized temporary. `fold_last_axis` reduces each group of
# a few adjacent elements of the last axis as a pairwise tree of element-wise ops on halves, which XLA fuses with
# the producer of the terms into one loop; only the group partials (1/8 of the leaf) are written, then reduced.
# Groups of 8: XLA:CPU emits a fused op at most 15 times (one per index it is read at), so from 16 on it writes the
# terms to memory again (measured on 2048 x 2048 leaves: 16 and 32 use more temporaries than no folding at all).
# Each fold adds a dozen HLO ops, which cost compile time, so only leaves of FOLD_MIN_SIZE elements (2 MiB of float32
# terms) or more are folded; smaller ones are reduced at once.
FOLD_WIDTH = 8
FOLD_MIN_SIZE = 1 << 19


def _fold_width(n: int) -> int:
  """Elements per group for an axis of length n: the largest power of two <= FOLD_WIDTH that divides ``n // d`` for
  every device count d <= `jax.device_count()` that divides n, so that a group never spans two devices of an axis
  sharded evenly (the partitioner then folds each device's part where it lies)."""
  common = 0
  for d in range(1, jax.device_count() + 1):
    if n % d == 0:
      common = math.gcd(common, n // d)
  width = 1
  while 2 * width <= FOLD_WIDTH and common % (2 * width) == 0:
    width *= 2
  return width


def fold_last_axis(x: jax.Array, combine: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
  """`x` with each group of `_fold_width` adjacent elements of its last axis reduced by `combine` (`jnp.add`,
  `jnp.maximum`) as a pairwise tree: shape ``x.shape[:-1] + (L // width,)``; `x` itself below FOLD_MIN_SIZE."""
  width = _fold_width(x.shape[-1]) if x.size >= FOLD_MIN_SIZE else 1
  if width == 1:
    return x
  x = x.reshape(x.shape[:-1] + (x.shape[-1] // width, width))
  while width > 1:
    width //= 2
    x = combine(x[..., :width], x[..., width:])
  return x[..., 0]


def leaf_sum(x: jax.Array) -> jax.Array:
  """``jnp.sum(x)``: for a large leaf in two stages (`fold_last_axis`), pairwise within the groups, then XLA's reduce
  of the partials."""
  return jnp.sum(fold_last_axis(x, jnp.add))


def block_maxima(x: jax.Array, block_size: int) -> jax.Array:
  """The largest element of each block of a leaf-shaped `x` >= 0, as a flat (K,).

  Where `block_layout` gives the blocked view, each block is reduced in it (`fold_last_axis`, then the rest). A
  leaf whose size is not a multiple of the block size is reduced as its flattened elements by windows of
  `block_size` (the last one cut short): flattening keeps a leaf sharded along its first axis in place, and the
  partitioner exchanges only the elements of the blocks that straddle two devices; a leaf sharded along a later axis
  is gathered for it. (Under a mesh of Explicit axes, where JAX types each op's sharding and has no rule for the
  window reduction of a sharded dim, the flattened leaf is padded and reshaped into its blocks instead.)
  """
  blocked = block_layout(x.shape, block_size)
  if blocked is None:
    blocks = num_blocks(x.size, block_size)
    flat = x.reshape(-1)
    spec = getattr(jax.typeof(flat).sharding, "spec", None)
    if spec is not None and any(axis is not None for axis in spec):  # Explicit axes: JAX types the padded reshape
      return jnp.max(jnp.pad(flat, (0, blocks * block_size - x.size)).reshape(blocks, block_size), axis=1)
    return jax.lax.reduce_window(
      flat, jnp.array(0, x.dtype), jax.lax.max, (block_size,), (block_size,), [(0, blocks * block_size - x.size)]
    )
  return jnp.max(fold_last_axis(x.reshape(blocked), jnp.maximum), axis=-1).reshape(-1)


def expand_blocks(block_values: jax.Array, shape: tuple[int, ...], block_size: int) -> jax.Array:
  """Per-block values (K,) as a per-element array of `shape` (each element gets its block's value): a broadcast in
  the blocked view, which XLA fuses into the element-wise consumer instead of materialising."""
  blocked = block_layout(shape, block_size)
  if blocked is None:
    blocks = block_values.shape[0]
    values = jnp.broadcast_to(block_values[:, None], (blocks, block_size)).reshape(-1)[: math.prod(shape)]
  else:
    values = jnp.broadcast_to(block_values.reshape(blocked[:-1] + (1,)), blocked)
  return values.reshape(shape)


def block_scale(absmax: jax.Array, top: float) -> jax.Array:
  """The scale of a block whose largest magnitude is `absmax`: ``max(absmax / top, 2^-126)``. Dividing the block by
  it puts its largest element at `top` (at most an ulp above, which rounds back to `top`: no clip needed)."""
  return jnp.maximum(divide(absmax, jnp.float32(top)), jnp.float32(SCALE_FLOOR))


def encode_block(x: jax.Array, scale: jax.Array, cast: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """``cast(x / scale)`` for the block-wise storage, `scale` per element (`cast`: `to_e4m3fn`, `to_e5m2` or a
  stochastic rounding). The block's largest element lands within an ulp of the format's top, which still rounds to
  it."""
  return cast(divide(x, scale))


# Static options: the block size shapes the state and stochastic rounding chooses the cast, so both are Python values
# when the step is traced. `optax.inject_hyperparams` turns every int it is given into an array (a bool it keeps as
# it is); a concrete array gives back its value, and a traced one (inside `jit`) is recovered from the state's shapes.

DEFAULT_BLOCK_SIZE = 256
_STATIC_HINT = "under `optax.inject_hyperparams` pass `static_args=('block_size',)`"


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def block_size_arg(block_size: Any) -> int | jax.Array | None:
  """`block_size` as a Python int (None: `DEFAULT_BLOCK_SIZE`), or the traced array as it is (see `block_size_of`)."""
  if block_size is None:
    return DEFAULT_BLOCK_SIZE
  if isinstance(block_size, (jax.Array, np.ndarray, np.integer)) and not isinstance(block_size, np.bool_):
    if jnp.ndim(block_size) == 0 and jnp.issubdtype(jnp.result_type(block_size), jnp.integer):
      if is_traced(block_size):
        return block_size
      block_size = int(block_size)
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
    raise ValueError(
      f"`block_size` must be a positive int, got {block_size!r}. State costs 2 + 8 / block_size bytes "
      f"per parameter: 256 (the default) gives 2.03."
    )
  return block_size


def block_size_of(block_size: int | jax.Array, sizes: list[int], scale_lengths: list[int] | None) -> int:
  """The block size as a Python int: `block_size` itself, or for a traced one the only size that gives the state's
  per-block scale lengths (`scale_lengths`, None at init, where the state is not made yet).

  A leaf of N elements with K >= 2 blocks admits the sizes B with ``ceil(N / B) = K``; leaves of one block admit
  every B >= N, all of which give the same step. Leaves of more than about B^2 elements pin B down.
  """
  if not is_traced(block_size):
    return block_size
  if scale_lengths is None:
    raise ValueError(
      "`block_size` shapes the optimizer state, and `init` got a traced array "
      f"(`optax.inject_hyperparams` inside `jit` or `eval_shape`): {_STATIC_HINT}, or call `init` "
      "outside `jit`."
    )
  low, high = 1, None
  for n, k in zip(sizes, scale_lengths):
    if n:
      low = max(low, -(-n // k))
      if k > 1:
        high = (n - 1) // (k - 1) if high is None else min(high, (n - 1) // (k - 1))
  if high is None or low == high:
    return low
  raise ValueError(
    f"`block_size` is a traced array and the state's block counts fit every size from {low} to {high} "
    f"(no leaf is large enough to tell): {_STATIC_HINT}."
  )


def check_stochastic_rounding(stochastic_rounding: Any) -> bool:
  if isinstance(stochastic_rounding, (jax.Array, np.ndarray, np.bool_)) and jnp.ndim(stochastic_rounding) == 0:
    if is_traced(stochastic_rounding):
      raise ValueError(
        "`stochastic_rounding` chooses the float8 cast and must be a Python bool, not a traced array: "
        "under `optax.inject_hyperparams` pass it as True or False (a bool is not injected) or add "
        "`static_args=('stochastic_rounding',)`."
      )
    if jnp.result_type(stochastic_rounding) == jnp.bool_:
      stochastic_rounding = bool(stochastic_rounding)
  if not isinstance(stochastic_rounding, bool):
    raise ValueError(f"`stochastic_rounding` must be True or False, got {stochastic_rounding!r}.")
  return stochastic_rounding


def zero_moments(params: Any, block_size: int | jax.Array | None) -> tuple[Any, Any, Any, Any]:
  """``(mu, nu, mu_scale, nu_scale)`` of zero moments for `params`: unit scales per leaf (`block_size` None, the
  per-tensor storage) or per block (`block_size`, possibly an injected array: see `block_size_of`)."""
  if block_size is None:
    scale_shape = lambda p: ()
  else:
    size = block_size_of(block_size, [], None)
    scale_shape = lambda p: (num_blocks(p.size, size),)
  # zeros_like keeps each leaf's sharding (an explicitly sharded leaf gets its moments sharded the same way).
  return (
    jax.tree.map(lambda p: jnp.zeros_like(p, dtype=MOMENTUM_DTYPE), params),
    jax.tree.map(lambda p: jnp.zeros_like(p, dtype=VARIANCE_DTYPE), params),
    jax.tree.map(lambda p: jnp.ones(scale_shape(p), jnp.float32), params),
    jax.tree.map(lambda p: jnp.ones(scale_shape(p), jnp.float32), params),
  )


def map_leaves(
  step: Callable[..., tuple], updates: Any, state: Any, block_size: Any, stochastic_rounding: bool, params: Any = None
) -> tuple[Any, ...]:
  """`step` over the leaves of `updates` and their stored moments, as five trees like `updates`.

  ``step(index, g, p, mu, nu, mu_scale, nu_scale, *, block_size, rounding_key)`` returns the leaf's step and its new
  ``(mu, nu, mu_scale, nu_scale)``; `p` is None without `params`. `state` has the fields of `ScaleByLamb16State` /
  `ScaleByAdam16State`. `block_size` is None (per-tensor scales), an int, or an injected array recovered from the
  state's block counts (`block_size_of`); `rounding_key` is the leaf's key at this step with `stochastic_rounding`,
  else None.
  """
  leaves, treedef = jax.tree.flatten(updates)
  columns = [treedef.flatten_up_to(tree) for tree in (state.mu, state.nu, state.mu_scale, state.nu_scale)]
  if block_size is not None:
    block_size = block_size_of(block_size, [g.size for g in leaves], [jnp.size(s) for s in columns[2]])
  param_leaves = [None] * len(leaves) if params is None else treedef.flatten_up_to(params)
  results = [
    step(
      i,
      g,
      p,
      *moments,
      block_size=block_size,
      rounding_key=rounding_key(state.count, i) if stochastic_rounding else None,
    )
    for i, (g, p, *moments) in enumerate(zip(leaves, param_leaves, *columns))
  ]
  return _common.unzip(updates, jax.tree.unflatten(treedef, results), 5)


def block_decode(stored: jax.Array, block_scales: jax.Array, block_size: int) -> jax.Array:
  """Float32 moments from the block-wise storage: each element's code times its block's scale."""
  return decode(stored, expand_blocks(block_scales, stored.shape, block_size))


def block_encode(
  m: jax.Array, v: jax.Array, block_size: int, rounding_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The block-wise storage of float32 moments (Algorithms section 1b, steps 3-4): ``(mu, nu, mu_scale, nu_scale)``,
  each block's largest |m| stored at e4m3fn's top and largest v at e5m2's; v rounded stochastically with the bits of
  `rounding_key` (`rounding_key` and `stochastic_e5m2`), else to nearest. The one storage of `lamb16_blockwise` and
  `adamw16`."""
  mu_scale = block_scale(block_maxima(jnp.abs(m), block_size), MOMENTUM_TOP)
  nu_scale = block_scale(block_maxima(v, block_size), VARIANCE_TOP)
  if rounding_key is None:
    cast_v = to_e5m2
  else:
    cast_v = lambda x: stochastic_e5m2(x, random_bits(rounding_key, v.shape))
  mu = encode_block(m, expand_blocks(mu_scale, m.shape, block_size), to_e4m3fn)
  nu = encode_block(v, expand_blocks(nu_scale, v.shape, block_size), cast_v)
  return mu, nu, mu_scale, nu_scale


# Stochastic rounding of the block-wise second moment (Algorithms section 1b, `stochastic_rounding=True`). v moves by
# at most 0.1 % a step (b2 = 0.999) and e5m2's steps are 25 %: rounded to nearest, a v that should decay stays where
# it is until its block's largest element moves the scale. Rounding up with probability proportional to the distance
# keeps the expected stored value on the float32 one (benchmarks/quantizer_study.py). The random bits are a hash of
# (step, leaf, element): no state, the same on every data-parallel replica, and the same again after a restore.
_GOLDEN, _ELEMENT_STRIDE = 0x9E3779B9, 0x27D4EB2F


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection of uint32 that mixes every input bit into every output bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def rounding_key(step: jax.Array, leaf: int | jax.Array) -> jax.Array:
  """The uint32 key of one leaf's random bits at one step: ``fmix32(fmix32(leaf) + step * 0x9E3779B9)``."""
  return _fmix32(_fmix32(jnp.asarray(leaf, jnp.uint32)) + step.astype(jnp.uint32) * jnp.uint32(_GOLDEN))


def element_index(shape: int | tuple[int, ...]) -> jax.Array:
  """Each element's index in the row-major flattened array of `shape` (uint32, wrapping), built from iotas in the
  array's own shape, so that a sharded leaf computes its part where it lies."""
  shape = (shape,) if isinstance(shape, int) else tuple(shape)
  index = jnp.zeros(shape, jnp.uint32)
  for axis, size in enumerate(shape):
    index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return index


def random_bits(key: jax.Array, shape: int | tuple[int, ...]) -> jax.Array:
  """uint32 random words for the elements of an array of `shape` (an int: a flat one): ``fmix32(key + i *
  0x27D4EB2F)`` for the element of row-major index i."""
  return _fmix32(key + element_index(shape) * jnp.uint32(_ELEMENT_STRIDE))


def stochastic_e5m2(x: jax.Array, bits: jax.Array) -> jax.Array:
  """float8_e5m2 of float32 `x` >= 0 (values above 57344 are stored as 57344; NaN stays NaN), rounded to one of its
  two neighbours on the e5m2 grid: up when ``frac * 2^21 >= 2^21 - t``, where frac is x's distance from the lower
  neighbour in units of the gap and ``t = bits >> 11`` (so up with probability frac, to 2^-21)."""
  dropped = 21  # float32's mantissa bits below e5m2's two
  t = bits >> (32 - dropped)
  x = jnp.minimum(x, jnp.float32(VARIANCE_TOP))
  magnitude = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
  # Normal values: the dropped mantissa bits are frac * 2^21, so adding t carries into the kept bits exactly when
  # frac * 2^21 + t >= 2^21 (a carry out of the mantissa is the next binade's first value, as it should be).
  normal = ((magnitude + t) >> dropped) - jnp.uint32((127 - 15) << 2)
  # Subnormal values are multiples of 2^-16: frac is the fraction of x * 2^16 (exact: a power-of-two scaling).
  steps = x * jnp.float32(2.0**16)
  lower = jnp.floor(steps)
  up = (steps - lower) * jnp.float32(2.0**dropped) >= jnp.float32(2.0**dropped) - t.astype(jnp.float32)
  subnormal = lower.astype(jnp.uint32) + up.astype(jnp.uint32)
  byte = jnp.where(magnitude < jnp.uint32((127 - 14) << 23), subnormal, normal)
  return _signed(magnitude, jnp.where(x != x, jnp.uint32(0x7E), byte), VARIANCE_DTYPE)


def health(mu: jax.Array, nu: jax.Array, blockwise: bool) -> dict[str, jax.Array]:
  """Per-leaf float8 health of stored moments (`optax_lamb16.float8_health`): fractions of the elements of m at the
  encoder's clip (±15 for the per-tensor storage; the block-wise storage never clips) and stored as 0, and of v
  stored as +inf (overflow) and as 0 (underflow, or no gradient yet)."""
  size = max(mu.size, 1)
  fraction = lambda flags: jnp.sum(flags, dtype=jnp.float32) / jnp.float32(size)
  m, v = mu.astype(jnp.float32), nu.astype(jnp.float32)
  saturated = jnp.zeros([], jnp.float32) if blockwise else fraction(jnp.abs(m) >= MOMENTUM_CLIP)
  return {
    "mu_saturated": saturated,
    "mu_zero": fraction(m == 0),
    "nu_inf": fraction(jnp.isinf(v)),
    "nu_zero": fraction(v == 0),
  }
