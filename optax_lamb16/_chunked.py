"""Several sums of one element-wise expression over a large flat array, in one pass, without materialising it.

XLA materialises an element-wise expression that several reductions share (the float32 m, v and u of a LAMB16
leaf), unless the reductions are ONE variadic reduce, into which the expression fuses. A variadic reduce over a
whole flat array compiles to a slow serial loop on XLA:CPU, so the array is viewed as rows of `ROW` elements: the
variadic reduce runs over each row (rows in parallel), then the row sums are added up.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

# Elements per row of the two-level reduction (measured on 4M elements: 64 to 40,000 all take the same time).
ROW = 1024


def _variadic_sum(terms: tuple[jax.Array, ...], axis: int) -> tuple[jax.Array, ...]:
  zeros = tuple(jnp.zeros((), t.dtype) for t in terms)
  return tuple(jax.lax.reduce(terms, zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)), (axis,)))


def fused_sums(terms_fn: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
               row: int = ROW) -> tuple[jax.Array, ...]:
  """``tuple(sum(t) for t in terms_fn(*arrays))``, where `terms_fn` is element-wise on equal-length flat arrays."""
  n = arrays[0].shape[0]
  rows = n // row
  totals = None
  if rows:
    body = [a[:rows * row].reshape(rows, row) for a in arrays]
    totals = tuple(jnp.sum(partial) for partial in _variadic_sum(tuple(terms_fn(*body)), axis=1))
  if n % row or not rows:
    tail = _variadic_sum(tuple(terms_fn(*(a[rows * row:] for a in arrays))), axis=0)
    totals = tail if totals is None else tuple(x + y for x, y in zip(totals, tail))
  return totals
