"""Reductions over large flat arrays, one chunk at a time, so that no full-size temporary is materialised.

XLA materialises an element-wise expression that several reductions and outputs share (and XLA:CPU does not fuse
a float8 decode into a reduction), so a straightforward LAMB16 update keeps float32 copies of m, v and u of every
leaf alive. Reducing chunk by chunk inside `lax.fori_loop` bounds those temporaries to a chunk; the element-wise
pass that follows recomputes m, v and u instead of storing them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Elements per chunk: 256 KiB of float32, large enough that the loop overhead is negligible.
CHUNK = 1 << 16


def _split(n: int, chunk: int) -> tuple[int, int]:
  """(number of full chunks, length of the tail)."""
  return divmod(n, chunk)


def chunked_sums(fn: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
                 chunk: int = CHUNK) -> tuple[jax.Array, ...]:
  """Sums over chunks of ``fn(*chunks)``, where `fn` returns a tuple of scalar partial sums of its chunk."""
  n = arrays[0].shape[0]
  full, tail = _split(n, chunk)
  if full <= 1:
    return tuple(fn(*arrays))

  def body(i, totals):
    parts = fn(*(jax.lax.dynamic_slice_in_dim(a, i * chunk, chunk) for a in arrays))
    return tuple(total + part for total, part in zip(totals, parts))

  shapes = jax.eval_shape(fn, *(jax.ShapeDtypeStruct((chunk,), a.dtype) for a in arrays))
  totals = jax.lax.fori_loop(0, full, body, tuple(jnp.zeros(s.shape, s.dtype) for s in shapes))
  if tail:
    totals = tuple(total + part for total, part in zip(totals, fn(*(a[full * chunk:] for a in arrays))))
  return totals
