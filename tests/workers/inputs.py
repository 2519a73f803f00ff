"""Deterministic per-rank inputs shared by the in-process tests and the multi-process workers (NumPy only)."""

import numpy as np


def random_inputs(world: int, calls: int, n: int, seed: int = 0) -> np.ndarray:
  """(world, calls, n) float32: a shared signal plus per-rank noise of different scales, like local gradients."""
  rng = np.random.default_rng(seed)
  common = rng.standard_normal((1, calls, n))
  noise = rng.standard_normal((world, calls, n)) * np.linspace(0.5, 2.0, world)[:, None, None]
  return (common + noise).astype(np.float32)
