"""The docs pages' examples run as doctests (`pytest --doctest-glob="*.md" docs`), as a user would run them."""

import os

import pytest

# 8 host CPU devices for the data-parallel examples, when this directory is collected before jax is imported.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

collect_ignore = ["conf.py"]  # Sphinx configuration, not a module with examples


@pytest.fixture(autouse=True)
def standard_dtype_promotion():
  # tests/conftest.py makes dtype promotion strict for the library's own tests; users run with JAX's default.
  with jax.numpy_dtype_promotion("standard"):
    yield
