"""Slow NumPy re-implementations of SPEC.md, written from the spec alone, used as test oracles.

Nothing here imports optax_lamb16 or JAX: float8 rounding comes from ml_dtypes, arithmetic is float32 NumPy (the
1-bit optimizers' oracles take `dtype=np.float64` for float64 params: sections 4-6 in float64, the compressed
exchange of section 3 in float32 as ever).
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

F32 = np.float32


def complement(b: float, dtype=F32) -> np.floating:
  """``1 - b`` as the references form it: in double precision from the Python number, rounded once to float32
  (PyTorch's ``alpha=1 - beta``), not ``1 - float32(b)``; or to `dtype`."""
  return dtype(1.0 - float(b))


def exact_sum(x: np.ndarray) -> np.float32:
  """SPEC.md's sums behind the float8 scales: the exact sum of the float32 terms, rounded once to float32
  (`math.fsum` is exact up to its final rounding to double; the float32 rounding of that double can differ from the
  direct one only when the sum sits within 2^-53 of a float32 midpoint)."""
  return F32(math.fsum(np.asarray(x, np.float64).ravel()))


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

  def __init__(
    self, params, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, trust_scale=0.382, reference_lr=1e-3, decay_mask=None
  ):
    self.b1, self.b2, self.eps = F32(b1), F32(b2), F32(eps)
    self.c1, self.c2 = complement(b1), complement(b2)
    self.weight_decay, self.trust_scale, self.reference_lr = F32(weight_decay), F32(trust_scale), F32(reference_lr)
    self.decay_mask = decay_mask if decay_mask is not None else [True] * len(params)
    self.count = 0  # steps taken: SPEC.md 1b's stochastic rounding hashes it
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
      m, v = self.dequantize(s)
      # 2. moments, no bias correction
      m = self.b1 * m + self.c1 * g
      v = self.b2 * v + self.c2 * g * g
      # 3.-4. new scales, requantize
      self.requantize(s, m, v, index)
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
    self.count += 1
    return new_params

  def dequantize(self, s: Lamb16LeafState) -> tuple[np.ndarray, np.ndarray]:
    return s.mq.astype(F32) * s.sm, s.vq.astype(F32) * s.sv

  def requantize(self, s: Lamb16LeafState, m: np.ndarray, v: np.ndarray, leaf: int) -> None:
    n = F32(max(m.size, 1))
    # 3. scales: L2 norm of squares clipped at 10, divided by N
    sm_new = np.sqrt(exact_sum(np.minimum(m * m, F32(10)))) / n + self.eps
    sv_new = np.sqrt(exact_sum(np.minimum(v * v, F32(10)))) / n + self.eps
    # 4. requantize (m clipped to ±15; v only clipped at 10 before dividing)
    s.mq = to_float8_e4m3fn(np.clip(m / sm_new, F32(-15), F32(15)))
    s.vq = to_float8_e5m2(np.minimum(v, F32(10)) / sv_new)
    s.sm, s.sv = F32(sm_new), F32(sv_new)


class Lamb16BlockwiseReference(Lamb16Reference):
  """SPEC.md section 1b: section 1 with one scale per block of `block_size` elements of the flattened leaf."""

  M_TOP, V_TOP, FLOOR = F32(448), F32(57344), F32(2.0**-126)

  def __init__(self, params, block_size=256, stochastic_rounding=False, **kwargs):
    super().__init__(params, **kwargs)
    self.block_size, self.stochastic_rounding = block_size, stochastic_rounding
    for p, s in zip(params, self.states):
      blocks = -(-p.size // block_size)
      s.sm, s.sv = np.ones(blocks, F32), np.ones(blocks, F32)

  def _per_element(self, scales: np.ndarray, shape) -> np.ndarray:
    size = math.prod(shape)
    return np.repeat(scales, self.block_size)[:size].reshape(shape)

  def dequantize(self, s):
    shape = s.mq.shape
    return (s.mq.astype(F32) * self._per_element(s.sm, shape), s.vq.astype(F32) * self._per_element(s.sv, shape))

  def _block_maxima(self, x: np.ndarray) -> np.ndarray:
    blocks = -(-x.size // self.block_size)
    padded = np.zeros(blocks * self.block_size, F32)
    padded[: x.size] = x.reshape(-1)
    return padded.reshape(blocks, self.block_size).max(axis=1)

  def requantize(self, s, m, v, leaf):
    # 3. scales: each block's largest |m| and v at the formats' largest finite values, floored at 2^-126
    s.sm = np.maximum(self._block_maxima(np.abs(m)) / self.M_TOP, self.FLOOR).astype(F32)
    s.sv = np.maximum(self._block_maxima(v) / self.V_TOP, self.FLOOR).astype(F32)
    # 4. requantize, no clip
    s.mq = to_float8_e4m3fn(m / self._per_element(s.sm, m.shape))
    y = v / self._per_element(s.sv, v.shape)
    s.vq = stochastic_e5m2(y, self.count, leaf) if self.stochastic_rounding else to_float8_e5m2(y)


class AdamW16Reference(Lamb16BlockwiseReference):
  """SPEC.md section 8: optax.adamw's step with m and v in section 1b's storage (v rounded stochastically unless
  `stochastic_rounding=False`)."""

  def __init__(
    self,
    params,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    weight_decay=1e-4,
    nesterov=False,
    block_size=256,
    stochastic_rounding=True,
    decay_mask=None,
  ):
    super().__init__(
      params, block_size=block_size, stochastic_rounding=stochastic_rounding, b1=b1, b2=b2, decay_mask=decay_mask
    )
    self.b1_value, self.b2_value = b1, b2
    self.eps, self.eps_root, self.weight_decay, self.nesterov = F32(eps), F32(eps_root), F32(weight_decay), nesterov

  def step(self, params, grads, lr):
    lr = F32(lr)
    t = self.count + 1
    # 2. bias corrections in float32, as optax forms them: 1 - float32(b) ** t
    c1, c2 = F32(1) - self.b1 ** F32(t), F32(1) - self.b2 ** F32(t)
    new_params = []
    for index, (p, g) in enumerate(zip(params, grads)):
      p, g, s = np.asarray(p, F32), np.asarray(g, F32), self.states[index]
      # 1. dequantize, moments
      m, v = self.dequantize(s)
      m = self.b1 * m + self.c1 * g
      v = self.b2 * v + self.c2 * g * g
      if self.nesterov:
        m_hat = self.b1 * m / (F32(1) - self.b1 ** F32(t + 1)) + self.c1 * g / c1
      else:
        m_hat = m / c1
      # 3. direction from this step's float32 moments
      u = m_hat / (np.sqrt(v / c2 + self.eps_root) + self.eps)
      # 4. store
      self.requantize(s, m, v, index)
      if self.decay_mask[index]:
        u = u + self.weight_decay * p
      new_params.append((p + (-lr) * u).astype(F32))
    self.count += 1
    return new_params


def fmix32(h: np.ndarray) -> np.ndarray:
  """MurmurHash3's 32-bit finaliser on uint32 arrays (wrapping arithmetic)."""
  h = np.asarray(h, np.uint32)
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def stochastic_e5m2(y: np.ndarray, step: int, leaf: int) -> np.ndarray:
  """SPEC.md section 1b's stochastic rounding of the normalised v (`y` >= 0) of leaf `leaf` at step `step`."""
  key = fmix32(fmix32(np.array([leaf], np.uint32)) + np.array([step], np.uint32) * np.uint32(0x9E3779B9))
  flat = np.minimum(np.asarray(y, F32).reshape(-1), F32(57344))
  t = fmix32(key + np.arange(flat.size, dtype=np.uint32) * np.uint32(0x27D4EB2F)) >> np.uint32(11)
  nearest = flat.astype(ml_dtypes.float8_e5m2)
  lower = np.where(nearest.astype(F32) > flat, (nearest.view(np.uint8) - 1).view(ml_dtypes.float8_e5m2), nearest)
  upper = np.where(nearest.astype(F32) < flat, (nearest.view(np.uint8) + 1).view(ml_dtypes.float8_e5m2), nearest)
  low, gap = lower.astype(np.float64), upper.astype(np.float64) - lower.astype(np.float64)
  frac = np.divide(flat - low, gap, out=np.zeros_like(low), where=gap > 0)
  up = frac * 2.0**21 >= 2.0**21 - t.astype(np.float64)
  return np.where(up, upper, lower).reshape(np.shape(y))


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
    self.reset()

  def reset(self) -> None:
    """Zero error buffers (at the start, and where 0/1 Adam freezes v)."""
    self.worker_error = [np.zeros(self.n_pad, F32) for _ in range(self.world)]
    self.server_error = [np.zeros(self.chunk, F32) for _ in range(self.world)]

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
    return output[: self.n]


class TwoLevelCompressedAllReduceReference:
  """SPEC.md section 3b for a grid of `hosts` x `local` ranks (rank h * local + l is rank l of host h)."""

  def __init__(self, n: int, hosts: int, local: int):
    quantum = local * hosts * math.lcm(hosts, 8)
    self.n, self.hosts, self.local = n, hosts, local
    self.n_pad = -(-n // quantum) * quantum
    self.shard = self.n_pad // local
    # Shard l travels among the ranks (h, l), h = 0..hosts-1: one section-3 exchange per local index.
    self.exchanges = [CompressedAllReduceReference(self.shard, hosts) for _ in range(local)]

  def reset(self) -> None:
    for exchange in self.exchanges:
      exchange.reset()

  def __call__(self, inputs: list[np.ndarray]) -> np.ndarray:
    """inputs: one flat float32 vector of length n per rank, hosts major. Returns what every rank gets."""
    hosts, local, shard = self.hosts, self.local, self.shard
    padded = [np.concatenate([np.asarray(x, F32), np.zeros(self.n_pad - self.n, F32)]) for x in inputs]
    output = np.zeros(self.n_pad, F32)
    for j in range(local):
      part = slice(j * shard, (j + 1) * shard)
      host_means = []
      for h in range(hosts):
        total = np.zeros(shard, F32)
        for other in range(local):  # summed in rank order, then divided
          total = total + padded[h * local + other][part]
        host_means.append((total / F32(local)).astype(F32))
      output[part] = self.exchanges[j](host_means) if hosts > 1 else host_means[0]
    return output[: self.n]

  def errors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(worker_error, server_error) of grid rank `rank`."""
    h, j = divmod(rank, self.local)
    return self.exchanges[j].worker_error[h], self.exchanges[j].server_error[h]

  def set_errors(self, rank: int, worker_error: np.ndarray, server_error: np.ndarray) -> None:
    h, j = divmod(rank, self.local)
    self.exchanges[j].worker_error[h], self.exchanges[j].server_error[h] = list(
      map(np.asarray, (worker_error, server_error))
    )


def on_grid(oracle, hosts: int):
  """`oracle` (a 1-bit optimizer's, made for P ranks) with its exchange over `hosts` hosts of P / hosts ranks
  (SPEC.md section 3b) instead of section 3's among all P ranks."""
  oracle.car = TwoLevelCompressedAllReduceReference(oracle.car.n, hosts, oracle.world // hosts)
  if hasattr(oracle, "tail"):  # 1-bit LAMB carries the exchange's padding
    oracle.tail = np.zeros(oracle.car.n_pad - oracle.car.n, F32)
  return oracle


def _flat(leaves: list[np.ndarray], dtype=F32) -> np.ndarray:
  return np.concatenate([np.ravel(x).astype(dtype) for x in leaves]) if leaves else np.zeros(0, dtype)


def _unflat(flat: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
  out, offset = [], 0
  for x in like:
    out.append(flat[offset : offset + x.size].reshape(x.shape))
    offset += x.size
  return out


def _exact_mean(per_rank: list[list[np.ndarray]], dtype=F32) -> list[np.ndarray]:
  """Mean over ranks in `dtype` (float32 by default), leaf by leaf (ranks summed in order, then divided)."""
  total = [np.zeros_like(x, dtype) for x in per_rank[0]]
  for leaves in per_rank:
    total = [a + np.asarray(b, dtype) for a, b in zip(total, leaves)]
  return [(a / dtype(len(per_rank))).astype(dtype) for a in total]


def rounding_to(dtype, arithmetic=F32):
  """x -> x rounded to `dtype` (e.g. ml_dtypes.bfloat16) and back to `arithmetic` (float32 by default); the identity
  for None (the params are of the arithmetic dtype)."""
  if dtype is None:
    return lambda x: np.asarray(x, arithmetic)
  return lambda x: np.asarray(x, arithmetic).astype(dtype).astype(arithmetic)


def bias_correction(b, n: int, dtype=F32):
  """SPEC.md section 6b's ``c(b, n) = 1 - b^n``: b rounded to `dtype`, the power taken in `dtype`."""
  return dtype(dtype(1) - dtype(b) ** dtype(n))


class OnebitAdamReference:
  """SPEC.md sections 2 and 4 for P ranks. `step` takes every rank's params and local gradients (lists of leaves)
  and returns the new params, which all ranks share.

  `param_dtype` (None: float32): the params' dtype. The update ``-lr * (m / (sqrt(v) + eps) + wd * p)`` is then
  formed as optax chains form it, each stage rounded to that dtype (the direction, plus the weight decay, times
  -lr), and ``p + update`` is rounded too; gradients are rounded by the caller (`onebit_harness.run_oracle`).
  `dtype` (float32 by default; np.float64 for float64 params): the arithmetic's dtype, of m, v and the exact mean;
  the compressed exchange takes m rounded to float32. `drop_in`: SPEC.md section 6b's drop-in mode."""

  def __init__(
    self,
    params,
    world,
    freeze_step,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    mask=None,
    mask_zero_variance=False,
    param_dtype=None,
    dtype=F32,
    drop_in=False,
  ):
    F = self.F = dtype
    self.drop_in = drop_in
    self.round = rounding_to(param_dtype, F)
    self.world, self.freeze_step, self.lr = world, freeze_step, F(lr)
    self.mask_zero_variance = mask_zero_variance
    self.b1, self.b2, self.eps, self.wd = F(b1), F(b2), F(eps), F(weight_decay)
    self.c1, self.c2 = complement(b1, F), complement(b2, F)
    self.m = [np.zeros(p.shape, F) for p in params]
    self.v = [np.zeros(p.shape, F) for p in params]
    self.mask = mask
    self.car = CompressedAllReduceReference(sum(p.size for p in params), world)
    self.t = 1  # DeepSpeed's set-up call

  def step(self, per_rank_params, local_grads):
    params = per_rank_params[0]  # identical on every rank
    self.t += 1
    F, b1, b2, c1, c2 = self.F, self.b1, self.b2, self.c1, self.c2
    if self.t <= self.freeze_step:
      g = _exact_mean(local_grads, F)
      self.m = [b1 * m + c1 * gi for m, gi in zip(self.m, g)]
      self.v = [b2 * v + c2 * gi * gi for v, gi in zip(self.v, g)]
    else:
      local_m = [_flat([b1 * m + c1 * gi for m, gi in zip(self.m, grads)], F) for grads in local_grads]
      self.m = _unflat((self.car(local_m) if self.world > 1 else local_m[0]).astype(F), self.m)
      if self.mask is not None:
        self.m = [m * F(k) for m, k in zip(self.m, self.mask)]
      if self.mask_zero_variance:
        self.m = [np.where(v > 0, m, F(0)) for m, v in zip(self.m, self.v)]
    r = self.round
    new_params = []
    c1 = c2 = F(1)
    if self.drop_in:  # m corrected with every update so far, v with its updates up to the freeze
      c1 = bias_correction(b1, self.t - 1, F)
      c2 = bias_correction(b2, min(self.t, self.freeze_step) - 1, F)
    for p, m, v in zip(params, self.m, self.v):
      direction = m / c1 / (np.sqrt(v / c2) + self.eps) if self.drop_in else m / (np.sqrt(v) + self.eps)
      update = r(-self.lr * r(r(direction) + self.wd * p))
      new_params.append(r(p + update))
    return new_params


class ZeroOneAdamReference:
  """SPEC.md sections 2 and 5 for P ranks: per-rank params, m and u; shared v, lr sum and schedules.

  `param_dtype` (None: float32): the params' dtype; each rank's step ``new - p`` is rounded to it, and so is
  ``p + step``. `dtype` (float32 by default; np.float64 for float64 params): the arithmetic's dtype; the compressed
  exchanges take their inputs rounded to float32. `drop_in`: SPEC.md section 6b's drop-in mode."""

  def __init__(
    self,
    params,
    world,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    var_freeze_step=100000,
    var_update_scaler=16,
    local_step_scaler=32678,
    local_step_clipper=16,
    mask=None,
    mask_zero_variance=False,
    param_dtype=None,
    dtype=F32,
    drop_in=False,
  ):
    F = self.F = dtype
    self.drop_in, self.variance_updates = drop_in, 0
    self.param_dtype, self.round = param_dtype, rounding_to(param_dtype, F)
    self.world, self.lr = world, F(lr)
    self.mask_zero_variance = mask_zero_variance
    self.b1, self.b2, self.eps, self.wd = F(b1), F(b2), F(eps), F(weight_decay)
    self.c1, self.c2 = complement(b1, F), complement(b2, F)
    self.var_freeze_step, self.var_update_scaler = var_freeze_step, var_update_scaler
    self.local_step_scaler, self.local_step_clipper = local_step_scaler, local_step_clipper
    self.mask = mask
    self.m = [[np.zeros(p.shape, F) for p in params] for _ in range(world)]
    self.u = [[np.zeros(p.shape, F) for p in params] for _ in range(world)]
    self.v = [np.zeros(p.shape, F) for p in params]
    self.lrs = F(0)
    self.var_interval, self.var_counter = 1, 0
    self.local_step_interval, self.local_step_counter = 1, 0
    self.frozen = False
    self.car = CompressedAllReduceReference(sum(p.size for p in params), world)
    self.t = 1
    # What happened on each step, for the tests: "variance", "compressed", "local" or "local+sync".
    self.log = []

  def _car(self, per_rank_leaves):
    like, F = per_rank_leaves[0], self.F
    out = self.car([_flat(leaves) for leaves in per_rank_leaves]) if self.world > 1 else _flat(like, F)
    out = _unflat(out.astype(F), like)
    if self.mask is not None:
      out = [x * F(k) for x, k in zip(out, self.mask)]
    if self.mask_zero_variance:
      out = [np.where(v > 0, x, F(0)) for x, v in zip(out, self.v)]
    return out

  def step(self, per_rank_params, local_grads):
    self.t += 1
    F, t, b1, b2, c1, c2, world = self.F, self.t, self.b1, self.b2, self.c1, self.c2, self.world
    momentum = lambda m, g: [b1 * a + c1 * b for a, b in zip(m, g)]
    variance_due = not self.frozen and t % self.var_interval == 0
    if variance_due:
      g = _exact_mean(local_grads, F)
      self.v = [b2 * v + c2 * gi * gi for v, gi in zip(self.v, g)]
      self.m = [momentum(self.m[r], g) for r in range(world)]
      self.variance_updates += 1
      self.log.append("variance")
    elif not self.frozen:
      g = self._car(local_grads)
      self.m = [momentum(self.m[r], g) for r in range(world)]
      self.log.append("compressed")
    else:
      self.m = [momentum(self.m[r], local_grads[r]) for r in range(world)]
      self.lrs = F(self.lrs + self.lr)
      self.log.append("local")
    m_correction = bias_correction(b1, t - 1, F) if self.drop_in else F(1)
    v_correction = bias_correction(b2, self.variance_updates, F) if self.drop_in else F(1)
    d = [np.sqrt(v / v_correction) + self.eps for v in self.v]
    new_params = []
    for r in range(world):
      delta = [m / m_correction / di + self.wd * p for m, di, p in zip(self.m[r], d, per_rank_params[r])]
      new_params.append([p - self.lr * x for p, x in zip(per_rank_params[r], delta)])
      if self.frozen:
        self.u[r] = [u - self.lr * x for u, x in zip(self.u[r], delta)]
    if self.frozen and t % self.local_step_interval == 0:
      previous = [[p - u for p, u in zip(new_params[r], self.u[r])] for r in range(world)]
      w = self._car([[u * di for u, di in zip(self.u[r], d)] for r in range(world)])
      self.m = [[(-wi / self.lrs) * m_correction for wi in w] for _ in range(world)]
      new_params = [[p0 + wi / di for p0, wi, di in zip(previous[r], w, d)] for r in range(world)]
      self.u = [[np.zeros_like(u) for u in self.u[r]] for r in range(world)]
      self.lrs = F(0)
      self.log[-1] = "local+sync"
    if variance_due:
      self.var_counter += 1
      if self.var_counter == self.var_update_scaler:
        self.var_counter, self.var_interval = 0, self.var_interval * 2
    if self.frozen:
      self.local_step_counter += 1
      if self.local_step_counter == self.local_step_scaler:
        self.local_step_counter = 0
        self.local_step_interval = min(self.local_step_clipper, 2 * self.local_step_interval)
    if not self.frozen and t > self.var_freeze_step:
      self.frozen = True
      self.car.reset()
    if self.param_dtype is None:
      return [[x.astype(F) for x in leaves] for leaves in new_params]
    r = self.round  # the optimizer returns the step new - p, in the params' dtype, which optax then adds to p
    return [[r(p + r(x - p)) for x, p in zip(new_params[rank], per_rank_params[rank])] for rank in range(world)]


class OnebitLambReference:
  """SPEC.md sections 2 and 6 for P ranks; params and every state but the error feedback are shared.

  `mask`: optional 0/1 leaves multiplied into the averaged momentum after it is divided by the scaling coefficient
  (DeepSpeed's ``exp_avg_mask``). `param_dtype` (None: float32): the params' dtype; the step ``-lr * coeff * u`` is
  rounded to it, and so is ``p + step``. `dtype` (float32 by default; np.float64 for float64 params): the
  arithmetic's dtype; the compressed exchange takes the scaled momenta rounded to float32 (its padding tail stays
  float32). `drop_in`: SPEC.md section 6b's drop-in mode."""

  def __init__(
    self,
    params,
    world,
    freeze_step,
    lr,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.0,
    max_coeff=10.0,
    min_coeff=0.01,
    coeff_beta=0.9,
    factor_max=4.0,
    factor_min=0.5,
    factor_threshold=0.1,
    mask=None,
    mask_zero_variance=False,
    param_dtype=None,
    dtype=F32,
    drop_in=False,
  ):
    F = self.F = dtype
    self.drop_in = drop_in
    self.round = rounding_to(param_dtype, F)
    self.mask = mask
    self.world, self.freeze_step, self.lr = world, freeze_step, F(lr)
    self.mask_zero_variance = mask_zero_variance
    self.b1, self.b2, self.eps, self.wd = F(b1), F(b2), F(eps), F(weight_decay)
    self.c1, self.c2 = complement(b1, F), complement(b2, F)
    self.max_coeff, self.min_coeff, self.coeff_beta = F(max_coeff), F(min_coeff), F(coeff_beta)
    self.coeff_complement = complement(coeff_beta, F)
    self.factor_max, self.factor_min, self.factor_threshold = F(factor_max), F(factor_min), F(factor_threshold)
    zeros = lambda: [np.zeros(p.shape, F) for p in params]
    self.m, self.v, self.v_fresh = zeros(), zeros(), zeros()
    self.coeff_freeze = [F(0)] * len(params)
    self.last_factor = [F(1)] * len(params)
    self.scaling = [F(1)] * len(params)
    self.car = CompressedAllReduceReference(sum(p.size for p in params), world)
    self.tail = np.zeros(self.car.n_pad - self.car.n, F32)
    self.t = 1

  def step(self, per_rank_params, local_grads):
    params = per_rank_params[0]
    self.t += 1
    F, t, b1, b2, eps, wd = self.F, self.t, self.b1, self.b2, self.eps, self.wd
    c1, c2 = self.c1, self.c2
    norm = lambda x: F(np.sqrt(np.sum(x * x, dtype=F)))
    new_params = []
    # Drop-in mode's corrections (SPEC.md section 6b); 1 in faithful mode, where they change nothing.
    one = lambda b, n: bias_correction(b, n, F) if self.drop_in else F(1)
    c_m, c_v, c_fresh = one(b1, t - 1), one(b2, min(t, self.freeze_step) - 1), one(b2, t - 1)
    c_coeff = one(self.coeff_beta, self.freeze_step - 1)
    if t <= self.freeze_step:
      g = _exact_mean(local_grads, F)
      self.m = [b1 * m + c1 * gi for m, gi in zip(self.m, g)]
      self.v = [b2 * v + c2 * gi * gi for v, gi in zip(self.v, g)]
      if t == self.freeze_step:
        self.v_fresh = [v.copy() for v in self.v]
      for i, (p, m, v) in enumerate(zip(params, self.m, self.v)):
        u = m / c_m / (np.sqrt(v / c_v) + eps) + wd * p
        r = F(1)
        if norm(p) > 0 and norm(u) > 0:
          r = F(np.clip(norm(p) / norm(u), self.min_coeff, self.max_coeff))
        if r != 1 or self.drop_in:
          self.coeff_freeze[i] = F(self.coeff_beta * self.coeff_freeze[i] + self.coeff_complement * r)
        new_params.append(self.round(p + self.round(-self.lr * (r * u))))
      return new_params
    m_prev = [m.copy() for m in self.m]
    if t == self.freeze_step + 1:
      rms = [norm(m) / np.sqrt(F(max(m.size, 1))) for m in self.m]
      mean_rms = F(sum(rms) / F(len(rms)))
      # Guard (not in DeepSpeed): a leaf without momentum gets scaling 0 and keeps zero momentum.
      self.scaling = [F(mean_rms / r) if r > 0 else F(0) for r in rms]
    local = [[(b1 * m + c1 * gi) * s for m, gi, s in zip(self.m, grads, self.scaling)] for grads in local_grads]
    if self.world > 1:
      buffers = [np.concatenate([_flat(leaves), self.tail]) for leaves in local]
      saved_n = self.car.n
      self.car.n = self.car.n_pad  # the tail is part of the input: exchange the whole padded buffer
      decoded = self.car(buffers)
      self.car.n = saved_n
      self.tail = decoded[saved_n:]
      averaged = _unflat(decoded[:saved_n].astype(F), self.m)
    else:
      averaged = local[0]
    self.m = [a / s if s > 0 else np.zeros_like(a) for a, s in zip(averaged, self.scaling)]
    if self.mask is not None:
      self.m = [m * F(k) for m, k in zip(self.m, self.mask)]
    if self.mask_zero_variance:
      self.m = [np.where(v > 0, m, F(0)) for m, v in zip(self.m, self.v)]
    for i, (p, m, mp, v) in enumerate(zip(params, self.m, m_prev, self.v)):
      g_hat = (m - b1 * mp) / c1
      self.v_fresh[i] = b2 * self.v_fresh[i] + c2 * g_hat * g_hat
      d = np.sqrt(v / c_v) + eps
      u0 = m / c_m / d
      u = u0 + wd * p
      f = F(np.max(d / (np.sqrt(self.v_fresh[i] / c_fresh) + eps))) if d.size else F(1)
      if wd > 0:
        rho = F(min(F(1), norm(u0) / norm(u))) if norm(u) > 0 else F(1)
        f = F(f * rho + (F(1) - rho))
      f = F(np.clip(f, self.factor_min, self.factor_max))
      lf = self.last_factor[i]
      f = F(np.clip(f, lf * (F(1) - self.factor_threshold), lf * (F(1) + self.factor_threshold)))
      self.last_factor[i] = f
      new_params.append(self.round(p + self.round(-self.lr * ((self.coeff_freeze[i] / c_coeff * f) * u))))
    return new_params
