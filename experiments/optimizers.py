"""The optimizers of the experiments, by name: one place, so that a name is the same optimizer in every driver.

Without `comm`, every name is a single-device optimizer. With `comm` (a mesh axis name, or an MPI communicator),
the optimizers that do not communicate themselves first average the ranks' gradients with an exact float32
all-reduce (`optax_lamb16.uncompressed_mean(comm)`), and the 1-bit ones do their own communication.

Names:
- ``adam``: the LAMB16 reference's baseline, ``torch.optim.Adam``, whose weight decay is an L2 term added to the
  gradient. ``adamw``: decoupled weight decay (as the 1-bit optimizers apply theirs).
- ``lamb``: `optax.lamb`. ``pytorch_lamb``: LAMB as the pytorch-lamb package has it (`baselines`).
- ``adamw16``: `optax_lamb16.adamw16`, AdamW with 8-bit moments; ``adamw16_1bit``: behind `compressed_mean`.
- ``lamb16``, ``lamb16_blockwise``: float8 LAMB. ``lamb16_blockwise_sr``: stochastic rounding of v.
  ``lamb16_blockwise_adam``: trust_scale 0, no trust ratio. ``lamb16_float32``: LAMB16's step with float32 moments
  (an ablation, `baselines`).
- ``lamb16_1bit``, ``lamb16_blockwise_1bit``: the 1-bit compressed gradient mean (`compressed_mean`) in front of
  LAMB16: float8 state and 1-bit communication together.
- ``onebit_adam``, ``zero_one_adam``, ``onebit_lamb``: the 1-bit family, freezing at `freeze_step`; their
  ``*_exact`` counterparts never freeze (an exact all-reduce every step).
"""

from __future__ import annotations

from typing import Any

import optax

import optax_lamb16
from experiments import baselines

NEVER = 2**30  # a freeze step that is never reached: the "uncompressed counterpart" of a 1-bit optimizer

SINGLE_DEVICE = (
  "adam",
  "adamw",
  "adamw16",
  "lamb",
  "pytorch_lamb",
  "lamb16",
  "lamb16_blockwise",
  "lamb16_blockwise_sr",
  "lamb16_blockwise_adam",
  "lamb16_float32",
)
ONEBIT = (
  "lamb16_1bit",
  "lamb16_blockwise_1bit",
  "adamw16_1bit",
  "onebit_adam",
  "onebit_adam_exact",
  "zero_one_adam",
  "zero_one_adam_exact",
  "onebit_lamb",
  "onebit_lamb_exact",
)
NAMES = SINGLE_DEVICE + ONEBIT


def freeze_at(fraction: float, steps: int) -> int:
  """The freeze step of a 1-bit optimizer that warms up for `fraction` of `steps` (at least 2: the first update
  is t = 2, and the warm-up needs one)."""
  return max(2, int(fraction * steps))


def check_names(names, allowed=NAMES) -> None:
  """Raises ValueError for a name not in `allowed`: before any training."""
  for name in names:
    if name not in allowed:
      raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(allowed)}")


def make_optimizer(
  name: str,
  lr: optax.ScalarOrSchedule,
  weight_decay: float = 0.0,
  *,
  comm: Any = None,
  freeze_step: int | None = None,
  eps: float | None = None,
  mask_zero_variance: bool = True,
  mode: str | None = None,
  zero_one_schedules: dict | None = None,
) -> optax.GradientTransformation:
  """The optimizer `name` (see the module docstring) at learning rate (or schedule) `lr`.

  Args:
    name: One of `NAMES`.
    lr: The learning rate or schedule; LAMB16's adaptive trust reads a schedule's value at each step.
    weight_decay: Applied to every parameter (as an L2 term for ``adam``, decoupled for the others).
    comm: The data-parallel communicator; None on one device.
    freeze_step: Where the 1-bit optimizers end their warm-up (`freeze_step` / 0/1 Adam's `var_freeze_step`).
    eps: eps of the Adam-type optimizers, LAMB and the 1-bit family; None keeps each one's default. LAMB16's is
      fixed (SPEC.md section 1).
    mask_zero_variance: Of the 1-bit family (on by default here, off in the library): the ReLU nets of the
      experiments have units that never fire, whose exactly-zero v turns the 1-bit exchange's sign noise into
      exploding parameters (DeepSpeed's behaviour).
    mode: Of the 1-bit family ("faithful" or "drop_in"); None keeps the library's default.
    zero_one_schedules: 0/1 Adam's `var_update_scaler`, `local_step_scaler` and `local_step_clipper`, by name;
      None keeps the library's (DeepSpeed's) defaults.
  """
  check_names([name])
  with_eps = {} if eps is None else {"eps": eps}
  if name in SINGLE_DEVICE:
    tx = _single_device(name, lr, weight_decay, with_eps)
    return tx if comm is None else optax.chain(optax_lamb16.uncompressed_mean(comm), tx)
  if name == "lamb16_1bit":
    return optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16(lr, weight_decay=weight_decay))
  if name == "lamb16_blockwise_1bit":
    return optax.chain(optax_lamb16.compressed_mean(comm), optax_lamb16.lamb16_blockwise(lr, weight_decay=weight_decay))
  if name == "adamw16_1bit":
    return optax.chain(
      optax_lamb16.compressed_mean(comm), optax_lamb16.adamw16(lr, weight_decay=weight_decay, **with_eps)
    )
  if freeze_step is None:
    raise ValueError(f"{name} needs a freeze_step")
  exact = name.endswith("_exact")
  onebit = dict(
    comm=comm,
    weight_decay=weight_decay,
    mask_zero_variance=mask_zero_variance,
    **with_eps,
    **({} if mode is None else {"mode": mode}),
  )
  if name.startswith("onebit_adam"):
    return optax_lamb16.onebit_adam(lr, freeze_step=NEVER if exact else freeze_step, **onebit)
  if name.startswith("onebit_lamb"):
    return optax_lamb16.onebit_lamb(lr, freeze_step=NEVER if exact else freeze_step, **onebit)
  schedules = dict(zero_one_schedules or {})
  if exact:  # a variance update (exact all-reduce) every step, never frozen
    return optax_lamb16.zero_one_adam(lr, var_freeze_step=NEVER, **{**schedules, "var_update_scaler": NEVER}, **onebit)
  return optax_lamb16.zero_one_adam(lr, var_freeze_step=freeze_step, **schedules, **onebit)


def _single_device(name: str, lr, weight_decay: float, with_eps: dict) -> optax.GradientTransformation:
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr, **with_eps))
  if name == "adamw":
    return optax.adamw(lr, weight_decay=weight_decay, **with_eps)
  if name == "adamw16":
    return optax_lamb16.adamw16(lr, weight_decay=weight_decay, **with_eps)
  if name == "lamb":
    return optax.lamb(lr, weight_decay=weight_decay, **with_eps)
  if name == "pytorch_lamb":
    return optax.chain(baselines.pytorch_lamb_direction(weight_decay), optax.scale_by_learning_rate(lr))
  if name == "lamb16":
    return optax_lamb16.lamb16(lr, weight_decay=weight_decay)
  if name == "lamb16_blockwise":
    return optax_lamb16.lamb16_blockwise(lr, weight_decay=weight_decay)
  if name == "lamb16_blockwise_sr":
    return optax_lamb16.lamb16_blockwise(lr, weight_decay=weight_decay, stochastic_rounding=True)
  if name == "lamb16_blockwise_adam":  # no trust ratio (r = 1): Adam-style steps from the block-wise float8 moments
    return optax_lamb16.lamb16_blockwise(lr, weight_decay=weight_decay, trust_scale=0.0)
  return baselines.lamb16_with_float32_moments(lr, weight_decay)  # lamb16_float32
