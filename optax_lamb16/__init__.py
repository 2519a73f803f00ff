"""optax_lamb16: memory- and communication-efficient optax optimizers.

LAMB16 keeps LAMB's moments in float8 (2 bytes of optimizer state per parameter instead of 8); the error-feedback
1-bit compressed all-reduce averages a pytree over data-parallel ranks with 1/32 of the bytes of a float32 one.
"""

from optax_lamb16 import comm
from optax_lamb16.comm import Communicator, as_communicator
from optax_lamb16.data_parallel import DataParallel, data_parallel
from optax_lamb16.compression import CompressedAllReduceState, compressed_allreduce, init_compressed_allreduce
from optax_lamb16.gradient_mean import compressed_mean, uncompressed_mean
from optax_lamb16.lamb16 import (
    ScaleByLamb16State,
    clipped_layer_norm,
    float8_health,
    lamb16,
    lamb16_blockwise,
    scale_by_lamb16,
    scale_by_lamb16_blockwise,
    scale_by_lamb16_trust_ratio,
)
from optax_lamb16.nonfinite import apply_if_finite
from optax_lamb16._onebit import LargeFirstStepsWarning
from optax_lamb16.onebit_adam import OnebitAdamState, ScaleByOnebitAdamState, onebit_adam, scale_by_onebit_adam
from optax_lamb16.onebit_lamb import OnebitLambState, onebit_lamb
from optax_lamb16.zero_one_adam import ZeroOneAdamState, zero_one_adam
from optax_lamb16.sharding import local_view, sharded_init, state_partition_specs

__all__ = [
    "Checkpointer",
    "CheckpointFallbackWarning",
    "DamagedCheckpointError",
    "Communicator",
    "CompressedAllReduceState",
    "DataParallel",
    "data_parallel",
    "apply_if_finite",
    "as_communicator",
    "comm",
    "compressed_allreduce",
    "compressed_mean",
    "init_compressed_allreduce",
    "uncompressed_mean",
    "LargeFirstStepsWarning",
    "OnebitAdamState",
    "ScaleByOnebitAdamState",
    "onebit_adam",
    "scale_by_onebit_adam",
    "OnebitLambState",
    "onebit_lamb",
    "ZeroOneAdamState",
    "zero_one_adam",
    "local_view",
    "sharded_init",
    "state_partition_specs",
    "ScaleByLamb16State",
    "clipped_layer_norm",
    "float8_health",
    "lamb16",
    "lamb16_blockwise",
    "scale_by_lamb16",
    "scale_by_lamb16_blockwise",
    "scale_by_lamb16_trust_ratio",
]

__version__ = "0.1.0"


_CHECKPOINTING = ("Checkpointer", "CheckpointFallbackWarning", "DamagedCheckpointError")


def __getattr__(name: str):
  # Orbax is imported only when checkpointing is used: it is slow to import.
  if name in _CHECKPOINTING:
    from optax_lamb16 import checkpointing
    return getattr(checkpointing, name)
  raise AttributeError(f"module 'optax_lamb16' has no attribute {name!r}")
