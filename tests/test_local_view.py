"""Why `local_view` exists: inside shard_map, gradients of replicated params come back summed over the axis."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import optax_lamb16
from tests import onebit_harness as h


def test_local_view_gives_local_gradients_and_plain_grad_gives_their_sum():
  world = 4
  mesh = h.host_mesh(world)
  params = {"w": jnp.ones(3)}
  x = jnp.arange(world * 3, dtype=jnp.float32).reshape(world, 3)
  loss = lambda p, x: jnp.sum(p["w"] * x)  # gradient = this rank's x

  def both(params, x):
    local = jax.grad(loss)(optax_lamb16.local_view(params, "data"), x[0])["w"]
    summed = jax.grad(loss)(params, x[0])["w"]
    return local[None], summed[None]

  f = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"), check_vma=True))
  local, summed = f(params, x)
  np.testing.assert_array_equal(local, x)
  np.testing.assert_array_equal(summed, np.broadcast_to(x.sum(axis=0), x.shape))
