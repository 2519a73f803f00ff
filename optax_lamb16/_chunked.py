"""Several sums of element-wise expressions over a large flat array, without materialising them whole.

XLA materialises an element-wise expression that several reductions share (the float32 m, v and u of a LAMB16
leaf), and XLA:CPU's reductions only read materialised inputs (one variadic reduce would fuse the expression but
compiles to a slow serial loop). So the array is processed chunk by chunk inside `lax.fori_loop`, and each term is
added element-wise into a chunk-sized float32 accumulator: the loop body is one fused element-wise pass per term,
with no reduction in it (a reduction per chunk costs a library call), and each accumulator is summed once at the
end.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Elements per chunk: 256 KiB per float32 accumulator. On 4M parameters 2^16 and 2^17 were equally fast; 2^16
# holds half the accumulators (XLA overlaps the loops of several leaves, so their accumulators add up), 2^15 was
# slower.
CHUNK = 1 << 16


def _as_bytes(x: jax.Array) -> jax.Array:
  # XLA:CPU converts a float8 array that a while loop carries to float16 first; carrying its bytes avoids that copy.
  return jax.lax.bitcast_convert_type(x, jnp.uint8) if x.dtype.itemsize == 1 else x


def _from_bytes(x: jax.Array, dtype) -> jax.Array:
  return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def fused_sums(terms_fn: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
               chunk: int = CHUNK) -> tuple[jax.Array, ...]:
  """``tuple(sum(t) for t in terms_fn(*arrays))``, where `terms_fn` is element-wise on equal-length flat arrays."""
  n = arrays[0].shape[0]
  full = n // chunk
  if full <= 1:  # small: the terms are at most two chunks
    return tuple(jnp.sum(t) for t in terms_fn(*arrays))
  raw = [_as_bytes(a) for a in arrays]

  def body(i, accumulators):
    chunks = [_from_bytes(jax.lax.dynamic_slice_in_dim(r, i * chunk, chunk), a.dtype) for r, a in zip(raw, arrays)]
    return tuple(acc + t for acc, t in zip(accumulators, terms_fn(*chunks)))

  shapes = jax.eval_shape(terms_fn, *(jax.ShapeDtypeStruct((chunk,), a.dtype) for a in arrays))
  accumulators = jax.lax.fori_loop(0, full, body, tuple(jnp.zeros((chunk,), s.dtype) for s in shapes))
  totals = tuple(jnp.sum(acc) for acc in accumulators)
  if n % chunk:
    totals = tuple(total + jnp.sum(t) for total, t in zip(totals, terms_fn(*(a[full * chunk:] for a in arrays))))
  return totals
