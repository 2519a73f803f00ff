"""One process of a multi-process compressed all-reduce run; writes this process's ranks' outputs to --out.

jax.distributed (XLA collectives, gloo on CPU):
  python car_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 --process-id K --out DIR
MPI (mpi4jax, one device per rank):
  mpirun -n 2 python car_worker.py --mpi --out DIR
"""

import pathlib

import numpy as np

from tests.workers import launch


def main():
  parser = launch.worker_arguments(__doc__)
  parser.add_argument("--calls", type=int, default=12)
  parser.add_argument("--n", type=int, default=1000)
  args = parser.parse_args()

  import jax

  if not args.mpi:
    jax.distributed.initialize(
      args.coordinator,
      num_processes=args.num_processes,
      process_id=args.process_id,
      coordinator_bind_address=args.coordinator,  # the coordinator has no authentication: loopback only
    )
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_lamb16
  from tests.workers.inputs import random_inputs

  def run(x, comm):  # x: (T, n) this rank's inputs
    state = optax_lamb16.init_compressed_allreduce(x.shape[-1], comm)

    def call(state, x_t):
      out, state = optax_lamb16.compressed_allreduce(x_t, state, comm)
      return state, out

    return jax.lax.scan(call, state, x)[1]

  out = pathlib.Path(args.out)
  if args.mpi:
    from mpi4py import MPI

    rank, world = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    inputs = random_inputs(world, args.calls, args.n)
    outs = jax.jit(lambda x: run(x, MPI.COMM_WORLD))(jnp.asarray(inputs[rank]))
    np.save(out / f"rank{rank}.npy", np.asarray(outs))
    # Payloads mpi4jax has no type for travel bitcast: gather and all-to-all them, and check the values.
    communicator = optax_lamb16.as_communicator(MPI.COMM_WORLD)
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float8_e4m3fn, jnp.float8_e5m2):
      mine = jnp.array([[rank + 0.5, -rank - 1.0]] * world, dtype)
      gathered = jax.jit(communicator.all_gather)(mine[0])
      swapped = jax.jit(communicator.all_to_all)(mine)
      expected = np.array([[r + 0.5, -r - 1.0] for r in range(world)], np.float32)
      assert gathered.dtype == dtype and swapped.dtype == dtype
      np.testing.assert_array_equal(np.asarray(gathered, np.float32), expected)
      np.testing.assert_array_equal(np.asarray(swapped, np.float32), expected)
    mean = jax.jit(communicator.mean)(jnp.full(3, float(rank), jnp.bfloat16))
    assert mean.dtype == jnp.bfloat16 and np.all(np.asarray(mean, np.float32) == (world - 1) / 2)
    (out / f"dtypes_ok{rank}").touch()
    return

  from tests import onebit_harness as h

  world = jax.device_count()
  mesh = h.host_mesh(world)
  inputs = random_inputs(world, args.calls, args.n)
  sharding = NamedSharding(mesh, P("data"))
  x = jax.make_array_from_callback(inputs.shape, sharding, lambda index: inputs[index])
  f = jax.jit(jax.shard_map(lambda x: run(x[0], "data")[None], mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  outs = jax.block_until_ready(f(x))
  for shard in outs.addressable_shards:
    rank = shard.index[0].start
    np.save(out / f"rank{rank}.npy", np.asarray(shard.data)[0])
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
