"""optax_lamb16: memory- and communication-efficient optax optimizers.

LAMB16 keeps LAMB's moments in float8 (2 bytes of optimizer state per parameter instead of 8) and AdamW16 Adam's
(2.03 bytes, the maths of `optax.adamw`); the error-feedback 1-bit compressed all-reduce averages a pytree over
data-parallel ranks with 1/32 of the bytes of a float32 one, and 1-bit Adam, 0/1 Adam and 1-bit LAMB train with it.
Communicators live in `optax_lamb16.comm`.
"""

from optax_lamb16 import comm
from optax_lamb16._adam16 import ScaleByAdam16State, adamw16, scale_by_adam16
from optax_lamb16._compression import CompressedAllReduceState, compressed_allreduce, init_compressed_allreduce
from optax_lamb16._data_parallel import DataParallel, data_parallel
from optax_lamb16._gradient_mean import compressed_mean, uncompressed_mean
from optax_lamb16._lamb16 import (
  ScaleByLamb16State,
  clipped_layer_norm,
  float8_health,
  lamb16,
  lamb16_blockwise,
  scale_by_lamb16,
  scale_by_lamb16_blockwise,
  scale_by_lamb16_trust_ratio,
)
from optax_lamb16._nonfinite import apply_if_finite
from optax_lamb16._onebit import LargeFirstStepsWarning
from optax_lamb16._onebit_adam import ScaleByOnebitAdamState, onebit_adam, scale_by_onebit_adam
from optax_lamb16._onebit_lamb import OnebitLambState, onebit_lamb
from optax_lamb16._sharding import local_view, sharded_init, state_partition_specs
from optax_lamb16._zero_one_adam import ZeroOneAdamState, zero_one_adam
from optax_lamb16.comm import Communicator, as_communicator

__all__ = [
  # LAMB16: float8 optimizer state.
  "lamb16",
  "lamb16_blockwise",
  "scale_by_lamb16",
  "scale_by_lamb16_blockwise",
  "scale_by_lamb16_trust_ratio",
  "ScaleByLamb16State",
  "clipped_layer_norm",
  "float8_health",
  # AdamW16: AdamW with 8-bit moments.
  "adamw16",
  "scale_by_adam16",
  "ScaleByAdam16State",
  # The 1-bit family.
  "onebit_adam",
  "scale_by_onebit_adam",
  "ScaleByOnebitAdamState",
  "zero_one_adam",
  "ZeroOneAdamState",
  "onebit_lamb",
  "OnebitLambState",
  "LargeFirstStepsWarning",
  # Gradient means and the compressed all-reduce.
  "compressed_mean",
  "uncompressed_mean",
  "compressed_allreduce",
  "init_compressed_allreduce",
  "CompressedAllReduceState",
  # Data-parallel training and sharding.
  "data_parallel",
  "DataParallel",
  "local_view",
  "sharded_init",
  "state_partition_specs",
  # Communicators.
  "comm",
  "Communicator",
  "as_communicator",
  # Checkpoints and faults.
  "Checkpointer",
  "CheckpointFallbackWarning",
  "DamagedCheckpointError",
  "apply_if_finite",
]

__version__ = "0.1.0"

_CHECKPOINTING = ("Checkpointer", "CheckpointFallbackWarning", "DamagedCheckpointError")


def __getattr__(name: str):
  # Orbax (the `checkpoint` extra) is imported only when checkpointing is used: it is optional and slow to import.
  if name in _CHECKPOINTING:
    try:
      from optax_lamb16 import _checkpointing
    except ModuleNotFoundError as error:
      if error.name is None or not error.name.startswith("orbax"):
        raise
      raise ModuleNotFoundError(
        f"optax_lamb16.{name} needs orbax-checkpoint: pip install 'optax_lamb16[checkpoint]' "
        f"(or pip install orbax-checkpoint).",
        name=error.name,
      ) from error
    return getattr(_checkpointing, name)
  raise AttributeError(f"module 'optax_lamb16' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_CHECKPOINTING])
