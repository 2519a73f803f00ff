"""How well each float8 storage of Adam's moments tracks float32 moments, on a synthetic gradient stream.

The question behind `lamb16_blockwise` (docs/SPEC.md section 1b) and the options it did not take: per-tensor scales
(section 1, the reference) or block-wise absmax scales; v stored as v (float8_e5m2) or as sqrt(v) (float8_e4m3fn:
half the dynamic range to cover, one more mantissa bit); round to nearest even or stochastic rounding (unbiased,
so that a per-step change smaller than half a float8 step is kept in expectation instead of rounded away).

Each variant runs the moment EMAs (b1 = 0.9, b2 = 0.999, no bias correction, as LAMB16) on the same stream of
gradients, storing m and v in float8 between steps, next to a float32 run. Reported, averaged over the second half of
the steps: the relative error of the Adam direction ``u = m / (sqrt(v) + eps)`` against the float32 one
(``|u_q - u| / |u|`` over the whole tensor), its cosine, and the median of ``|log2(v_q / v)|`` over the elements with
v > 0 (how far the stored variance is from the float32 one, in binades). NumPy and ml_dtypes only; seeded.

The stream (`gradient_stream`) is built to hold what hurts float8 storage: per-element gradient scales spread over
three decades inside every block, scales that decay by up to 30x over the run at per-element rates (so that v must
follow a slow decline, 0.1 % per step at most), heavy-tailed noise (Student t, 3 degrees of freedom) around a small
per-element mean, and short 10x bursts on 2 % of the elements. It is synthetic: a guide to the design, not a claim
about any model.

  python -m benchmarks.quantizer_study [--elements 65536] [--steps 3000] [--seed 0]
                                       [--out docs/results/quantizer_study.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import ml_dtypes
import numpy as np

F32 = np.float32
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
TOP = {E4M3: F32(448.0), E5M2: F32(57344.0)}
B1, B2, EPS, BLOCK = F32(0.9), F32(0.999), F32(1e-6), 256
C1, C2 = F32(1.0 - 0.9), F32(1.0 - 0.999)


def gradient_stream(elements: int, steps: int, seed: int):
  """Yields `steps` float32 gradients of `elements` entries (see the module docstring)."""
  rng = np.random.default_rng(seed)
  scale = 10.0 ** rng.uniform(-1.5, 1.5, elements)
  decay_rate = np.log(10.0 ** rng.uniform(0.0, 1.5, elements)) / steps  # total decay 1x..30x over the run
  mean = rng.normal(0.0, 0.3, elements)
  bursty = rng.random(elements) < 0.02
  burst_start = rng.integers(0, steps, elements)
  for t in range(steps):
    sigma = scale * np.exp(-decay_rate * t) * np.where(bursty & (t >= burst_start) & (t < burst_start + 20), 10, 1)
    yield (sigma * (mean + rng.standard_t(3, elements) / np.sqrt(3.0))).astype(F32)


def round_stochastic(x: np.ndarray, dtype, rng: np.random.Generator) -> np.ndarray:
  """float8 `dtype` of float32 `x` (|x| at most the format's top) rounded up or down in magnitude with probability
  proportional to the distance to each neighbour, so that the expected stored value is x."""
  magnitude = np.abs(x)
  nearest = magnitude.astype(dtype)
  below = np.where(nearest.astype(F32) > magnitude, (nearest.view(np.uint8) - 1).view(dtype), nearest)
  above = np.where(nearest.astype(F32) < magnitude, (nearest.view(np.uint8) + 1).view(dtype), nearest)
  low, high = below.astype(F32), above.astype(F32)
  gap = high - low
  up = rng.random(x.shape, dtype=F32) * gap < (magnitude - low)
  stored = np.where(up, above, below).astype(F32)
  return (np.sign(x) * stored).astype(dtype)


class Float32:
  name = "float32 (reference)"

  def __init__(self, n):
    self.m, self.v = np.zeros(n, F32), np.zeros(n, F32)

  def step(self, g):
    self.m = B1 * self.m + C1 * g
    self.v = B2 * self.v + C2 * g * g
    return self.m, self.v


class PerTensor(Float32):
  """SPEC.md section 1 (`lamb16`): one scale per tensor, m clipped at +-15 scale units, v at 10."""

  name = "per-tensor (lamb16, the reference)"

  def __init__(self, n):
    super().__init__(n)
    self.mq, self.vq = np.zeros(n, E4M3), np.zeros(n, E5M2)
    self.sm = self.sv = F32(1.0)

  def step(self, g):
    m = B1 * (self.mq.astype(F32) * self.sm) + C1 * g
    v = B2 * (self.vq.astype(F32) * self.sv) + C2 * g * g
    n = F32(m.size)
    self.sm = F32(np.sqrt(np.sum(np.minimum(m * m, F32(10)), dtype=np.float64)) / n + EPS)
    self.sv = F32(np.sqrt(np.sum(np.minimum(v * v, F32(10)), dtype=np.float64)) / n + EPS)
    self.mq = np.clip(m / self.sm, F32(-15), F32(15)).astype(E4M3)
    self.vq = (np.minimum(v, F32(10)) / self.sv).astype(E5M2)
    return m, v

  def stored(self):
    """The moments the next step reads: the float8 codes times their scales."""
    return self.mq.astype(F32) * self.sm, self.vq.astype(F32) * self.sv


class BlockWise(Float32):
  """SPEC.md section 1b (`lamb16_blockwise`) and its variants: absmax scale per block of 256, v stored as v
  (e5m2) or as sqrt(v) (e4m3fn), rounded to nearest even or stochastically."""

  def __init__(self, n, sqrt_v=False, stochastic="", seed=1):
    """`stochastic`: which moments are rounded stochastically: "", "v" or "m and v"."""
    super().__init__(n)
    self.sqrt_v, self.stochastic = sqrt_v, stochastic
    self.v_dtype = E4M3 if sqrt_v else E5M2
    self.mq, self.vq = np.zeros(n, E4M3), np.zeros(n, self.v_dtype)
    self.sm = self.sv = np.ones(n // BLOCK, F32)
    self.rng = np.random.default_rng(seed)
    self.name = (
      "block-wise"
      + (", sqrt(v) in e4m3fn" if sqrt_v else "")
      + (f", stochastic rounding of {stochastic}" if stochastic else "")
    )

  def _store(self, x, dtype, stochastic):
    blocks = x.reshape(-1, BLOCK)
    scale = np.maximum(np.max(np.abs(blocks), axis=1) / TOP[dtype], F32(2.0**-126)).astype(F32)
    normalised = (blocks / scale[:, None]).reshape(-1)
    stored = round_stochastic(normalised, dtype, self.rng) if stochastic else normalised.astype(dtype)
    return stored, scale

  def _load(self, stored, scale):
    return (stored.astype(F32).reshape(-1, BLOCK) * scale[:, None]).reshape(-1)

  def step(self, g):
    m = B1 * self._load(self.mq, self.sm) + C1 * g
    stored_v = self._load(self.vq, self.sv)
    v = B2 * (stored_v * stored_v if self.sqrt_v else stored_v) + C2 * g * g
    self.mq, self.sm = self._store(m, E4M3, "m" in self.stochastic)
    self.vq, self.sv = self._store(np.sqrt(v) if self.sqrt_v else v, self.v_dtype, "v" in self.stochastic)
    return m, v

  def stored(self):
    """The moments the next step reads (v squared back where sqrt(v) is stored)."""
    v = self._load(self.vq, self.sv)
    return self._load(self.mq, self.sm), v * v if self.sqrt_v else v


def direction(m, v):
  return m / (np.sqrt(v) + EPS)


def run(elements: int, steps: int, seed: int) -> dict:
  if elements % BLOCK:
    raise ValueError(f"--elements must be a multiple of {BLOCK}")
  reference = Float32(elements)
  variants = [
    PerTensor(elements),
    BlockWise(elements),
    BlockWise(elements, sqrt_v=True),
    BlockWise(elements, stochastic="v"),
    BlockWise(elements, stochastic="m and v"),
    BlockWise(elements, sqrt_v=True, stochastic="m and v"),
  ]
  totals = {v.name: {"direction_error": [], "direction_cosine": [], "v_log2_error": []} for v in variants}
  for t, g in enumerate(gradient_stream(elements, steps, seed)):
    m32, v32 = reference.step(g)
    u32 = direction(m32, v32)
    for variant in variants:
      variant.step(g)
      if t < steps // 2:
        continue
      mq, vq = variant.stored()
      u = direction(mq, vq)
      record = totals[variant.name]
      record["direction_error"].append(float(np.linalg.norm(u - u32) / np.linalg.norm(u32)))
      record["direction_cosine"].append(float(np.dot(u, u32) / (np.linalg.norm(u) * np.linalg.norm(u32))))
      positive = (v32 > 0) & (vq > 0)
      record["v_log2_error"].append(float(np.median(np.abs(np.log2(vq[positive] / v32[positive])))))
  return {name: {key: float(np.mean(values)) for key, values in record.items()} for name, record in totals.items()}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--elements", type=int, default=65536)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
  args = parser.parse_args(argv)
  results = run(args.elements, args.steps, args.seed)
  print("| storage | direction error | direction cosine | median abs log2(v_q / v) |")
  print("|---|---:|---:|---:|")
  for name, r in results.items():
    print(f"| {name} | {r['direction_error']:.4f} | {r['direction_cosine']:.5f} | {r['v_log2_error']:.4f} |")
  if args.out:
    record = {
      "results": results,
      "settings": vars(args) | {"block": BLOCK, "b1": 0.9, "b2": 0.999, "eps": 1e-6},
      "averaged_over": "the second half of the steps",
      "machine": platform.platform(),
    }
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
