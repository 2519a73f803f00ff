"""Test-wide JAX set-up: 8 host CPU devices and strict dtype promotion, fixed before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

# Float8 never promotes implicitly, and float32/bfloat16 mixing is a bug here: make every such mix an error.
jax.config.update("jax_numpy_dtype_promotion", "strict")
