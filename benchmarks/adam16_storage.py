"""Which 8-bit storage of Adam's moments keeps AdamW's update closest to float32 moments: the study behind `adamw16`.

The same synthetic gradient stream as `benchmarks/quantizer_study.py` (per-element scales over three decades inside
every block, slow per-element decay, heavy-tailed noise, bursts), run through AdamW's moment rule
(`optax.scale_by_adam`: b1 = 0.9, b2 = 0.999, eps = 1e-8, bias-corrected), with m and v stored in 8 bits each between
steps, next to a float32 run. Candidates: m in float8_e4m3fn and v in float8_e5m2 (LAMB16's block-wise storage), or
sqrt(v) in e4m3fn; rounded to nearest or v rounded stochastically; blocks of 32 to 256 elements with float32 or bfloat16
scales (bytes per parameter: 2 + 2 * scale bytes / block). Reported, averaged over the run's steps from step 10 and over
its second half: the relative error of the update direction ``m_hat / (sqrt(v_hat) + eps)`` against the float32 one, its
cosine, and the median |log2(v_q / v)|. NumPy and ml_dtypes only; seeded.

  python -m benchmarks.adam16_storage [--elements 65536] [--steps 3000] [--seed 0]
      [--out docs/results/adam16_storage.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import ml_dtypes
import numpy as np

from benchmarks.quantizer_study import E4M3, E5M2, TOP, gradient_stream, round_stochastic

F32, BF16 = np.float32, ml_dtypes.bfloat16
B1, B2, EPS = 0.9, 0.999, 1e-8
# 1 - b in double precision, then float32, as the library forms it from Python floats.
C1, C2 = F32(1.0 - B1), F32(1.0 - B2)
FIRST = 10  # the first steps' errors are averaged too, from this step on


class Float32:
  name = "float32 (reference)"
  bytes_per_param = 8.0

  def __init__(self, n):
    self.m, self.v = np.zeros(n, F32), np.zeros(n, F32)

  def step(self, g):
    self.m = F32(B1) * self.m + C1 * g
    self.v = F32(B2) * self.v + C2 * g * g
    return self.m, self.v

  def stored(self):
    return self.m, self.v


def _round_up_to(scale, dtype):
  """`scale` (float32) rounded up to `dtype`, so that a block's largest element still fits under it."""
  if dtype is F32:
    return scale
  rounded = scale.astype(dtype)
  return np.where(rounded.astype(F32) < scale, (rounded.view(np.uint16) + 1).view(dtype), rounded).astype(F32)


class Code:
  """An 8-bit code of the normalised moment x / scale, the scale being the block's absmax over `top`.

  "e4m3fn" / "e5m2": the float8 formats (top 448 / 57344); "int8": round(127 x) (top 1); "int8 sqrt": companded,
  round(127 sign(x) sqrt|x|) (top 1), which spends the levels where |x| is small, as flashoptim-jax stores m;
  "uint8": round(255 x) for x >= 0 (top 1), as flashoptim-jax stores sqrt(v).
  """

  def __init__(self, kind, stochastic=False):
    self.kind, self.stochastic = kind, stochastic
    self.top = {"e4m3fn": TOP[E4M3], "e5m2": TOP[E5M2]}.get(kind, F32(1.0))

  def encode(self, x, rng):
    if self.kind in ("e4m3fn", "e5m2"):
      dtype = E4M3 if self.kind == "e4m3fn" else E5M2
      return round_stochastic(x, dtype, rng) if self.stochastic else x.astype(dtype)
    y = np.sign(x) * np.sqrt(np.abs(x)) if self.kind == "int8 sqrt" else x
    levels = F32(255 if self.kind == "uint8" else 127)
    y = y * levels
    q = np.floor(y + rng.random(y.shape, dtype=F32)) if self.stochastic else np.round(y)
    return q.astype(np.uint8 if self.kind == "uint8" else np.int8)

  def decode(self, q):
    if self.kind in ("e4m3fn", "e5m2"):
      return q.astype(F32)
    y = q.astype(F32) / F32(255 if self.kind == "uint8" else 127)
    return np.sign(y) * y * y if self.kind == "int8 sqrt" else y


class Blocks(Float32):
  """Block-wise absmax storage: each moment in an 8-bit `Code`, one scale per block per moment; v stored as v or as
  sqrt(v)."""

  def __init__(self, n, block, m="e4m3fn", v="e5m2", sqrt_v=False, stochastic_v=False, scale_dtype=F32, seed=1):
    super().__init__(n)
    self.block, self.sqrt_v, self.scale_dtype = block, sqrt_v, scale_dtype
    self.m_code, self.v_code = Code(m), Code(v, stochastic_v)
    self.mq = self.m_code.encode(np.zeros(n, F32), None)
    self.vq = self.v_code.encode(np.zeros(n, F32), np.random.default_rng(0))
    self.sm = self.sv = np.ones(n // block, F32)
    self.rng = np.random.default_rng(seed)
    self.bytes_per_param = 2 + 2 * np.dtype(scale_dtype).itemsize / block
    self.name = (
      f"blocks of {block}, {np.dtype(scale_dtype).name} scales, m {m}, "
      + (f"sqrt(v) {v}" if sqrt_v else f"v {v}")
      + (", v stochastic" if stochastic_v else ", nearest")
    )

  def _store(self, x, code):
    blocks = x.reshape(-1, self.block)
    scale = _round_up_to(
      np.maximum(np.max(np.abs(blocks), axis=1) / code.top, F32(2.0**-126)).astype(F32), self.scale_dtype
    )
    normalised = np.clip(blocks / scale[:, None], -code.top, code.top).reshape(-1).astype(F32)
    return code.encode(normalised, self.rng), scale

  def _load(self, stored, scale, code):
    return (code.decode(stored).reshape(-1, self.block) * scale[:, None]).reshape(-1)

  def step(self, g):
    m_prev, v_prev = self.stored()
    m = F32(B1) * m_prev + C1 * g
    v = F32(B2) * v_prev + C2 * g * g
    self.mq, self.sm = self._store(m, self.m_code)
    self.vq, self.sv = self._store(np.sqrt(v) if self.sqrt_v else v, self.v_code)
    return m, v

  def stored(self):
    v = self._load(self.vq, self.sv, self.v_code)
    return self._load(self.mq, self.sm, self.m_code), v * v if self.sqrt_v else v


def direction(m, v, t):
  """Adam's bias-corrected direction after t updates."""
  return (m / F32(1 - B1**t)) / (np.sqrt(v / F32(1 - B2**t)) + F32(EPS))


def candidates(n):
  out = []
  for block in (32, 64, 128, 256):
    out += [Blocks(n, block), Blocks(n, block, stochastic_v=True)]
  for block in (64, 128):
    out += [Blocks(n, block, v="e4m3fn", sqrt_v=True), Blocks(n, block, v="e4m3fn", sqrt_v=True, stochastic_v=True)]
  out += [
    Blocks(n, 64, stochastic_v=True, scale_dtype=BF16),
    Blocks(n, 64, v="e4m3fn", sqrt_v=True, stochastic_v=True, scale_dtype=BF16),
  ]
  # Integer codes of m (linear, and companded as flashoptim-jax stores it), with the best v storage above.
  for m in ("int8", "int8 sqrt"):
    out += [
      Blocks(n, 128, m=m, v="e4m3fn", sqrt_v=True, stochastic_v=True),
      Blocks(n, 32, m=m, v="e4m3fn", sqrt_v=True, stochastic_v=True, scale_dtype=BF16),
    ]
  # Storages of the kind other 8-bit AdamW optimizers describe (not their code): v itself in e4m3fn with blocks of
  # 256, and a companded int8 m with sqrt(v) as linear uint8 in groups of 32 with 16-bit scales.
  out += [Blocks(n, 256, v="e4m3fn"), Blocks(n, 32, m="int8 sqrt", v="uint8", sqrt_v=True, scale_dtype=BF16)]
  return out


def run(elements: int, steps: int, seed: int) -> dict:
  reference, variants = Float32(elements), candidates(elements)
  keys = ("direction_error", "direction_cosine", "v_log2_error")
  totals = {v.name: {f"{k}_{part}": [] for k in keys for part in ("run", "second_half")} for v in variants}
  for t, g in enumerate(gradient_stream(elements, steps, seed), start=1):
    m32, v32 = reference.step(g)
    u32 = direction(m32, v32, t)
    for variant in variants:
      variant.step(g)
      if t < FIRST:
        continue
      mq, vq = variant.stored()
      u = direction(mq, vq, t)
      positive = (v32 > 0) & (vq > 0)
      values = {
        "direction_error": float(np.linalg.norm(u - u32) / np.linalg.norm(u32)),
        "direction_cosine": float(np.dot(u, u32) / (np.linalg.norm(u) * np.linalg.norm(u32))),
        "v_log2_error": float(np.median(np.abs(np.log2(vq[positive] / v32[positive])))),
      }
      for key, value in values.items():
        totals[variant.name][f"{key}_run"].append(value)
        if t > steps // 2:
          totals[variant.name][f"{key}_second_half"].append(value)
  return {
    v.name: {"bytes_per_param": v.bytes_per_param, **{k: float(np.mean(x)) for k, x in totals[v.name].items()}}
    for v in variants
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--elements", type=int, default=65536)
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
  args = parser.parse_args(argv)
  results = run(args.elements, args.steps, args.seed)
  print("| storage | B/param | direction error (run) | (second half) | cosine (run) | median abs log2(v_q / v) |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, r in results.items():
    print(
      f"| {name} | {r['bytes_per_param']:.4f} | {r['direction_error_run']:.4f} | "
      f"{r['direction_error_second_half']:.4f} | {r['direction_cosine_run']:.5f} | {r['v_log2_error_run']:.4f} |"
    )
  if args.out:
    settings = vars(args) | {"b1": B1, "b2": B2, "eps": EPS, "first_step_averaged": FIRST}
    record = {"results": results, "settings": settings, "machine": platform.platform()}
    pathlib.Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main()
