"""Several sums of element-wise expressions over a large flat array, without materialising them whole.

XLA materialises an element-wise expression that several reductions share (the float32 m, v and u of a LAMB16
leaf), and XLA:CPU's reductions only read materialised inputs (one variadic reduce would fuse the expression but
compiles to a slow serial loop). So the array is processed chunk by chunk inside `lax.fori_loop`, and the terms are
added element-wise into chunk-sized accumulators, each summed once at the end: the loop body is a few fused
element-wise passes with no reduction in it (a reduction per chunk is a library call).

Terms go in pairs into complex64 accumulators (real part, imaginary part): XLA:CPU has no multi-output fusion, so
each accumulator is one pass over the chunk; a pair shares its pass, its reads and the values both terms use.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Elements per accumulator (64 KiB as complex64), and chunks per loop iteration: `fori_loop` unrolls the body
# UNROLL times and XLA fuses the unrolled additions, so each pass reads UNROLL chunks into one accumulator. On 4M
# parameters (benchmarks/update_bench.py) 2^13-2^14 elements with 8 chunks per iteration were the fastest, about 10%
# faster than 2^15-2^16 with one chunk per iteration, whose larger accumulators also add up in XLA's temporaries
# (it overlaps the loops of several leaves).
CHUNK = 1 << 13
UNROLL = 8


def _as_bytes(x: jax.Array) -> jax.Array:
  # XLA:CPU converts a float8 array that a while loop carries to float16 first; carrying its bytes avoids that copy.
  return jax.lax.bitcast_convert_type(x, jnp.uint8) if x.dtype.itemsize == 1 else x


def _from_bytes(x: jax.Array, dtype) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def _paired(terms: Sequence[jax.Array]) -> list[jax.Array]:
  """float32 terms two by two as complex64 (a last odd term alone)."""
  pairs = [jax.lax.complex(terms[k], terms[k + 1]) for k in range(0, len(terms) - 1, 2)]
  return pairs + ([terms[-1]] if len(terms) % 2 else [])


def _unpaired(totals: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
  """The inverse of `_paired`: each complex64 total back as its two float32 sums."""
  return tuple(part for total in totals
               for part in ((jnp.real(total), jnp.imag(total)) if jnp.iscomplexobj(total) else (total,)))


# Offsets into the chunked loop are int32 (JAX's default integers): leaves of 2^31 elements or more are summed whole
# instead, where XLA indexes with 64-bit offsets.
MAX_CHUNKED_SIZE = 2**31 - 1


def whole_sums(terms_fn: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
               compensated: int = 0) -> tuple[jax.Array, ...]:
  """``tuple(sum(t) for t in terms_fn(*arrays))`` as plain whole-array float32 reductions, which XLA:GPU fuses with
  the element-wise terms into one pass; `compensated` is `fused_sums`' and ignored (XLA's reductions add in
  pairwise trees, close to exact on leaves under `2 * CHUNK` elements)."""
  return tuple(jnp.sum(t) for t in terms_fn(*arrays))


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth's TwoSum: no branch, any magnitudes;
  complex64 operands are two independent float32 lanes)."""
  s = a + b
  b_virtual = s - a
  return s, (a - (s - b_virtual)) + (b - b_virtual)


def _compensated_total(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """The sum of the lanes of ``hi + lo`` (a power-of-two length), carried as a compensated pair down a tree of halves
  and rounded once at the end: the float32 sum of the exact total's correctly rounded value (up to the lo lanes'
  own rounding, about 2^-48 of the total)."""
  width = hi.shape[0]
  while width > 1:
    width //= 2
    hi, error = _two_sum(hi[:width], hi[width:])
    lo = lo[:width] + lo[width:] + error
  return hi[0] + lo[0]


def fused_sums(terms_fn: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
               chunk: int | None = None, compensated: int = 0) -> tuple[jax.Array, ...]:
  """``tuple(sum(t) for t in terms_fn(*arrays))``, where `terms_fn` is element-wise on equal-shaped arrays and
  returns float32 terms, summed chunk by chunk (tuned for XLA:CPU); `chunk` (a power of two) defaults to `CHUNK`.

  The first `compensated` terms are summed with error-free transformations (TwoSum into a second accumulator,
  then a compensated tree over the lanes): their totals are the exact sums rounded once to float32, whatever the
  order, at the cost of one more pass over the chunk per pair of terms. The other terms add in plain float32.
  """
  chunk = chunk or CHUNK
  arrays = [a.reshape(-1) for a in arrays]
  n = arrays[0].shape[0]
  full = n // chunk
  if full <= 1 or n > MAX_CHUNKED_SIZE:  # small (at most two chunks), or too large for int32 offsets
    return whole_sums(terms_fn, arrays)
  raw = [_as_bytes(a) for a in arrays]
  chunk_shapes = [jax.ShapeDtypeStruct((chunk,), a.dtype) for a in arrays]

  def split_terms(*chunks):
    terms = terms_fn(*chunks)
    return _paired(terms[:compensated]), _paired(terms[compensated:])

  def add(accumulators, terms):
    (hi, lo, plain), (exact_terms, plain_terms) = accumulators, terms
    hi, errors = zip(*(_two_sum(h, t) for h, t in zip(hi, exact_terms))) if hi else ((), ())
    return (tuple(hi), tuple(l + e for l, e in zip(lo, errors)),
            tuple(acc + t for acc, t in zip(plain, plain_terms)))

  def body(i, accumulators):
    chunks = [_from_bytes(jax.lax.dynamic_slice_in_dim(r, i * chunk, chunk), a.dtype) for r, a in zip(raw, arrays)]
    return add(accumulators, split_terms(*chunks))

  exact_shapes, plain_shapes = jax.eval_shape(split_terms, *chunk_shapes)
  zeros = lambda shapes: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
  accumulators = jax.lax.fori_loop(0, full, body, (zeros(exact_shapes), zeros(exact_shapes), zeros(plain_shapes)),
                                   unroll=UNROLL)
  if n % chunk:  # the tail, padded with zero terms to one more chunk
    tail = [a[full * chunk:] for a in arrays]
    pad = lambda t: jnp.pad(t, (0, chunk - t.shape[0]))
    accumulators = add(accumulators, tuple(tuple(pad(t) for t in group) for group in split_terms(*tail)))
  hi, lo, plain = accumulators
  return _unpaired([_compensated_total(h, l) for h, l in zip(hi, lo)] + [jnp.sum(acc) for acc in plain])


# Elements per chunk of `fused_block_reductions`, and chunks per loop iteration. On the 4M tree of
# benchmarks/update_bench.py: 2^13 x 8 and 2^15 x 2 took the same time (within this shared machine's noise, about
# lamb16's), with 7.8 and 7.6 MB of XLA temporaries; 2^15 x 8 was no faster and needed 14.7 MB.
BLOCK_CHUNK = 4 * CHUNK
BLOCK_UNROLL = 2


def num_blocks(size: int, block_size: int) -> int:
  """Blocks of `block_size` elements that cover `size` elements (the last may be shorter)."""
  return -(-size // block_size)


def expand_blocks(block_values: jax.Array, block_size: int, n: int) -> jax.Array:
  """Per-block values as a flat per-element array of `n` elements (element i gets block i // block_size's value),
  written as broadcast-reshape-slice, which XLA fuses into the element-wise consumer instead of materialising."""
  rows = block_values.shape[0]
  return jnp.broadcast_to(block_values[:, None], (rows, block_size)).reshape(-1)[:n]


def block_maxima(x: jax.Array, block_size: int) -> jax.Array:
  """Maximum of each block of `block_size` elements of flat `x` (the last block may be shorter; `x` >= 0, as the
  zero padding assumes)."""
  blocks = num_blocks(x.shape[0], block_size)
  return jnp.max(jnp.pad(x, (0, blocks * block_size - x.shape[0])).reshape(blocks, block_size), axis=1)


def _row_maxima(x: jax.Array) -> jax.Array:
  """``max(x, axis=1)`` as a tree of element-wise maxima of halves when the width is a power of two: one loop fusion
  with the terms that produce `x`, where a reduction would be a library call per chunk on XLA:CPU."""
  width = x.shape[1]
  if width & (width - 1):
    return jnp.max(x, axis=1)
  while width > 1:
    width //= 2
    x = jnp.maximum(x[:, :width], x[:, width:])
  return x[:, 0]


def whole_block_reductions(terms_fn: Callable[..., tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]],
                           arrays: Sequence[jax.Array], block_arrays: Sequence[jax.Array],
                           block_size: int) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """``(sums, maxima)`` of ``terms_fn(*arrays, *expanded block_arrays) = (sum terms, max terms)``: the sums of the
  first terms over all elements, and the per-block maxima of the second (non-negative) terms, as whole-array
  reductions (what XLA:GPU fuses into one pass)."""
  n = arrays[0].shape[0]
  sum_terms, max_terms = terms_fn(*arrays, *(expand_blocks(b, block_size, n) for b in block_arrays))
  return tuple(jnp.sum(t) for t in sum_terms), tuple(block_maxima(t, block_size) for t in max_terms)


def fused_block_reductions(terms_fn: Callable[..., tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]],
                           arrays: Sequence[jax.Array], block_arrays: Sequence[jax.Array], block_size: int,
                           chunk: int | None = None) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """`whole_block_reductions` chunk by chunk (tuned for XLA:CPU, as `fused_sums`): each chunk's blocks' maxima are
  written into the per-block results, its sum terms added into chunk-sized accumulators. A chunk holds a whole
  number of blocks (rounded up from `BLOCK_CHUNK`); the elements after the last full chunk are reduced whole."""
  block_chunk = num_blocks(chunk or BLOCK_CHUNK, block_size) * block_size
  n = arrays[0].shape[0]
  full = n // block_chunk
  if full <= 1 or n > MAX_CHUNKED_SIZE:
    return whole_block_reductions(terms_fn, arrays, block_arrays, block_size)
  blocks_per_chunk = block_chunk // block_size
  raw = [_as_bytes(a) for a in arrays]

  def body(i, carry):
    accumulators, maxima = carry
    chunks = [_from_bytes(jax.lax.dynamic_slice_in_dim(r, i * block_chunk, block_chunk), a.dtype)
              for r, a in zip(raw, arrays)]
    values = [expand_blocks(jax.lax.dynamic_slice_in_dim(b, i * blocks_per_chunk, blocks_per_chunk), block_size,
                            block_chunk) for b in block_arrays]
    sum_terms, max_terms = terms_fn(*chunks, *values)
    maxima = tuple(jax.lax.dynamic_update_slice_in_dim(out, _row_maxima(t.reshape(-1, block_size)),
                                                       i * blocks_per_chunk, 0) for out, t in zip(maxima, max_terms))
    return tuple(acc + t for acc, t in zip(accumulators, _paired(sum_terms))), maxima

  shapes = [jax.ShapeDtypeStruct((block_chunk,), a.dtype) for a in arrays]
  shapes += [jax.ShapeDtypeStruct((block_chunk,), b.dtype) for b in block_arrays]
  sum_shapes, max_shapes = jax.eval_shape(lambda *c: (lambda sums, maxima: (_paired(sums), maxima))(*terms_fn(*c)),
                                          *shapes)
  zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in sum_shapes)
  maxima = tuple(jnp.zeros((num_blocks(n, block_size),), s.dtype) for s in max_shapes)
  accumulators, maxima = jax.lax.fori_loop(0, full, body, (zeros, maxima), unroll=BLOCK_UNROLL)
  sums = _unpaired([jnp.sum(acc) for acc in accumulators])
  done = full * block_chunk
  if n > done:
    rest_sums, rest_maxima = whole_block_reductions(terms_fn, [a[done:] for a in arrays],
                                                    [b[full * blocks_per_chunk:] for b in block_arrays], block_size)
    sums = tuple(s + r for s, r in zip(sums, rest_sums))
    maxima = tuple(jax.lax.dynamic_update_slice_in_dim(m, r, full * blocks_per_chunk, 0)
                   for m, r in zip(maxima, rest_maxima))
  return sums, maxima
