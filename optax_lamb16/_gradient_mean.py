"""Data-parallel gradient averaging as optax transforms: the 1-bit compressed mean and its exact baseline.

Put one first in a chain to train any optax optimizer data-parallel from each rank's LOCAL gradients, e.g.
``optax.chain(compressed_mean("data"), optax_lamb16.lamb16(1e-3))`` inside `jax.shard_map`. The exchanges
themselves (`compression.compressed_allreduce`, `compression.exact_mean`) are written once in `compression`. Both
return updates in the updates' dtypes; the compressed exchange is float32 for every dtype, the exact mean float32, or
float64 for float64 leaves (with ``jax_enable_x64``).
"""

from __future__ import annotations

from typing import Any

import optax

from optax_lamb16 import _checks, _common, _rank_types
from optax_lamb16 import _compression as compression
from optax_lamb16 import comm as comm_lib


def compressed_mean(comm: Any) -> optax.GradientTransformationExtraArgs:
  """Turns each rank's local updates into their compressed mean over ranks (one exchange for the whole tree).

  Its state, the exchange's error feedback, is per rank (see `state_partition_specs`).

  Args:
    comm: A mesh-axis name, an mpi4py communicator, None, or a `comm.Communicator`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `CompressedAllReduceState`; `update` ignores extra
    keyword arguments.

  Example (one device: the mean over one rank is the identity):
    >>> import jax.numpy as jnp, optax, optax_lamb16
    >>> tx = optax.chain(optax_lamb16.compressed_mean(None), optax.sgd(0.1))
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> updates, state = tx.update({"w": jnp.array([1.0, -1.0])}, tx.init(params), params, value=0.5)
    >>> updates["w"].tolist()
    [-0.10000000149011612, 0.10000000149011612]
  """
  communicator = comm_lib.as_communicator(comm)  # rejects unknown types early

  def init_fn(params):
    _checks.check_float_leaves("params", params)
    return compression.init_compressed_allreduce(params, communicator)

  def update_fn(updates, state, params=None):
    _checks.check_float_leaves("updates", updates)
    _rank_types.check_local_gradients(communicator, updates)
    if params is not None:
      _checks.check_same_structure("updates", updates, "params", params)
    return compression.compressed_allreduce(updates, state, communicator)

  return _common.extra_args_transform(init_fn, update_fn)


def uncompressed_mean(comm: Any) -> optax.GradientTransformationExtraArgs:
  """The exact counterpart of `compressed_mean`: each rank's local updates -> their mean over ranks (one all-reduce
  of the flattened tree, in float32; float64 leaves in a float64 one of their own). Stateless; the baseline that
  `compressed_mean` saves 31/32 of the bytes of (float32 leaves).

  Args:
    comm: A mesh-axis name, an mpi4py communicator, None, or a `comm.Communicator`.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`; `update` ignores extra keyword arguments.
  """
  communicator = comm_lib.as_communicator(comm)  # rejects unknown types early

  def update_fn(updates, state, params=None):
    del params
    _checks.check_float_leaves("updates", updates)
    _rank_types.check_local_gradients(communicator, updates)
    return compression.exact_mean(updates, communicator), state

  return _common.extra_args_transform(lambda params: optax.EmptyState(), update_fn)
