"""Slow NumPy re-implementations of SPEC.md, written from the spec alone, used as test oracles.

Nothing here imports optax_lamb16 or JAX: float8 rounding comes from ml_dtypes, arithmetic is float32 NumPy.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

F32 = np.float32


def to_float8_e4m3fn(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, F32).astype(ml_dtypes.float8_e4m3fn)


def to_float8_e5m2(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, F32).astype(ml_dtypes.float8_e5m2)


@dataclasses.dataclass
class Lamb16LeafState:
  mq: np.ndarray  # float8_e4m3fn
  vq: np.ndarray  # float8_e5m2
  sm: np.float32
  sv: np.float32


class Lamb16Reference:
  """SPEC.md section 1, one leaf at a time, in the order the spec lists the steps."""

  def __init__(self, params, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, trust_scale=0.382, reference_lr=1e-3,
               decay_mask=None):
    self.b1, self.b2, self.eps = F32(b1), F32(b2), F32(eps)
    self.weight_decay, self.trust_scale, self.reference_lr = F32(weight_decay), F32(trust_scale), F32(reference_lr)
    self.decay_mask = decay_mask if decay_mask is not None else [True] * len(params)
    self.states = [
        Lamb16LeafState(to_float8_e4m3fn(np.zeros(p.shape)), to_float8_e5m2(np.zeros(p.shape)), F32(1), F32(1))
        for p in params
    ]

  def step(self, params: list[np.ndarray], grads: list[np.ndarray], lr: float) -> list[np.ndarray]:
    """Returns the new parameters (float32) after one step with learning rate `lr`."""
    lr = F32(lr)
    new_params = []
    for index, (p, g) in enumerate(zip(params, grads)):
      p, g, s = np.asarray(p, F32), np.asarray(g, F32), self.states[index]
      n = F32(max(p.size, 1))
      # 1. dequantize
      m = s.mq.astype(F32) * s.sm
      v = s.vq.astype(F32) * s.sv
      # 2. moments, no bias correction
      m = self.b1 * m + (F32(1) - self.b1) * g
      v = self.b2 * v + (F32(1) - self.b2) * g * g
      # 3. scales: L2 norm of squares clipped at 10, divided by N
      sm_new = np.sqrt(np.sum(np.minimum(m * m, F32(10)), dtype=F32)) / n + self.eps
      sv_new = np.sqrt(np.sum(np.minimum(v * v, F32(10)), dtype=F32)) / n + self.eps
      # 4. requantize (m clipped to ±15; v only clipped at 10 before dividing)
      s.mq = to_float8_e4m3fn(np.clip(m / sm_new, F32(-15), F32(15)))
      s.vq = to_float8_e5m2(np.minimum(v, F32(10)) / sv_new)
      s.sm, s.sv = F32(sm_new), F32(sv_new)
      # 5. Adam direction from the float32 moments of this step, decoupled decay inside
      u = m / (np.sqrt(v) + self.eps)
      if self.weight_decay != 0 and self.decay_mask[index]:
        u = u + self.weight_decay * p
      # 6. clipped layer norms
      wn = np.sqrt(np.sum(np.clip(p * p, self.eps, F32(1)), dtype=F32)) / n
      un = np.sqrt(np.sum(np.clip(u * u, self.eps, F32(1)), dtype=F32)) / n
      # 7. adaptive trust
      with np.errstate(divide="ignore"):
        r = np.clip(np.power((wn / un) * (self.reference_lr / lr), self.trust_scale, dtype=F32), F32(0), F32(2))
      # 8. update, associated as the optax chain applies it: p + (-lr) * (r * u)
      new_params.append((p - lr * (r * u)).astype(F32))
    return new_params


def sgn(x: np.ndarray) -> np.ndarray:
  """SPEC.md notation: +1 where x >= 0 or x is NaN, -1 elsewhere."""
  return np.where(np.asarray(x) < 0, F32(-1), F32(1)).astype(F32)


def rms(x: np.ndarray) -> np.float32:
  return F32(np.sqrt(np.sum(x * x, dtype=F32)) / np.sqrt(F32(x.size)))


class CompressedAllReduceReference:
  """SPEC.md section 3 for all P ranks at once; keeps every rank's worker and server error."""

  def __init__(self, n: int, world: int):
    quantum = world * math.lcm(world, 8)
    self.n, self.world = n, world
    self.n_pad = -(-n // quantum) * quantum
    self.chunk = self.n_pad // world
    self.worker_error = [np.zeros(self.n_pad, F32) for _ in range(world)]
    self.server_error = [np.zeros(self.chunk, F32) for _ in range(world)]

  def __call__(self, inputs: list[np.ndarray]) -> np.ndarray:
    """inputs: one flat float32 vector of length n per rank. Returns the estimate every rank gets."""
    world, chunk = self.world, self.chunk
    worker_signs, worker_scales = [], []
    for rank in range(world):
      c = np.concatenate([np.asarray(inputs[rank], F32), np.zeros(self.n_pad - self.n, F32)]) + self.worker_error[rank]
      scale = rms(c)
      self.worker_error[rank] = (c - scale * sgn(c)).astype(F32)
      worker_signs.append(sgn(c))
      worker_scales.append(scale)
    output = np.zeros(self.n_pad, F32)
    for server in range(world):
      part = slice(server * chunk, (server + 1) * chunk)
      a = np.zeros(chunk, F32)
      for rank in range(world):
        a = a + (worker_scales[rank] / F32(world)) * worker_signs[rank][part]
      a = a + self.server_error[server]
      scale = rms(a)
      self.server_error[server] = (a - scale * sgn(a)).astype(F32)
      output[part] = scale * sgn(a)
    return output[:self.n]
