"""Fails the docs build when a public name has no API entry.

The public names are `optax_lamb16.__all__` (modules among them contribute their own `__all__`). Each must be
documented as a Python object (autofunction, autoclass, ...) under one of its public paths, e.g.
``optax_lamb16.lamb16`` or ``optax_lamb16.comm.TwoLevel``; a missing one is a warning, which `make docs` (``-W``)
turns into an error.
"""

import importlib
import types

from sphinx.util import logging

_log = logging.getLogger(__name__)
PACKAGE = "optax_lamb16"


def public_names(package: str = PACKAGE) -> list[str]:
  """Every public dotted name: `package.__all__`, descending into the modules it lists."""
  module = importlib.import_module(package)
  names = []
  for name in module.__all__:
    value = getattr(module, name)
    if isinstance(value, types.ModuleType):
      names += public_names(value.__name__)
    else:
      names.append(f"{package}.{name}")
  return names


def _resolve(dotted: str):
  module, _, name = dotted.rpartition(".")
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    return None


def _check(app, env) -> None:
  # A name re-exported under two public paths (e.g. `optax_lamb16.Communicator`, `optax_lamb16.comm.Communicator`)
  # needs one entry.
  documented = {id(_resolve(name)) for name in env.get_domain("py").objects}
  missing = [name for name in public_names() if id(_resolve(name)) not in documented]
  for name in missing:
    _log.warning(f"public name {name} has no API entry: add it to docs/api.md")


def setup(app):
  app.connect("env-check-consistency", _check)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
