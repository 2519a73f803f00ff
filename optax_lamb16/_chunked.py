"""Several sums of one element-wise expression over a large flat array, without materialising it whole.

XLA materialises an element-wise expression that several reductions share (the float32 m, v and u of a LAMB16
leaf), and XLA:CPU's fast reductions only read materialised inputs (one variadic reduce would fuse the expression
but compiles to a slow serial loop). So the array is summed chunk by chunk inside `lax.fori_loop`: each chunk's
terms are materialised (a few MiB at most, cache-resident) and summed by XLA's fast reductions.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Elements per chunk: 512 KiB per float32 term (on 4M elements 2^17-2^19 were fastest: smaller chunks pay the
# loop's per-iteration cost, larger ones hold more temporaries).
CHUNK = 1 << 17


def _as_bytes(x: jax.Array) -> jax.Array:
  # XLA:CPU upcasts a whole float8 operand of a dynamic slice to float16 first; slicing its bytes avoids that copy.
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

  def body(i, totals):
    chunks = [_from_bytes(jax.lax.dynamic_slice_in_dim(r, i * chunk, chunk), a.dtype) for r, a in zip(raw, arrays)]
    return tuple(total + jnp.sum(t) for total, t in zip(totals, terms_fn(*chunks)))

  shapes = jax.eval_shape(terms_fn, *(jax.ShapeDtypeStruct((chunk,), a.dtype) for a in arrays))
  totals = jax.lax.fori_loop(0, full, body, tuple(jnp.zeros((), s.dtype) for s in shapes))
  if n % chunk:
    totals = tuple(total + jnp.sum(t) for total, t in zip(totals, terms_fn(*(a[full * chunk:] for a in arrays))))
  return totals
