"""optax_lamb16: memory- and communication-efficient optax optimizers.

LAMB16 keeps LAMB's moments in float8 (2 bytes of optimizer state per parameter instead of 8).
"""

from optax_lamb16.lamb16 import (
    ScaleByLamb16State,
    clipped_layer_norm,
    lamb16,
    scale_by_lamb16,
    scale_by_lamb16_trust_ratio,
)

__all__ = [
    "ScaleByLamb16State",
    "clipped_layer_norm",
    "lamb16",
    "scale_by_lamb16",
    "scale_by_lamb16_trust_ratio",
]

__version__ = "0.1.0"
