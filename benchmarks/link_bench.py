"""Step time of exact and 1-bit data-parallel training over throttled links: P `jax.distributed` processes, one CPU
device each, in a network namespace whose loopback is shaped with `tc ... tbf`.

  sudo python -m benchmarks.link_bench [--size 4M] [--processes 2] [--links unthrottled,1gbit,100mbit]
                                       [--steps 5] [--out docs/results/link_bench.json]

With `--devices-per-process L` each process is a host of L CPU devices and the 1-bit steps run over
`comm.TwoLevel` (SPEC.md section 3b). On XLA:CPU every device is a gloo rank of its own, so the traffic among one
process's devices crosses `lo` too and is throttled like the rest: this mode checks the driver and the grid, but a
CPU run cannot show the two-level gain (a GPU host's NVLink, or a real network between hosts, can).

Each process stands for a host, so by default each runs on cores of its own (`--cores-per-process`, the cores divided
evenly; 0 shares them all): two processes whose XLA thread pools share the same cores slow each other's compute
down several times over, which no cluster does. Every process keeps the memory XLA:CPU frees for reuse
(`--malloc reuse`, see `exchange_compute.set_malloc`), as a GPU runtime's caching allocator does; `--malloc system`
measures with glibc's defaults. Page faults per step are recorded with the times.

(`make bench-link` runs it with the defaults.) Needs root, `ip` and `tc`. It creates a namespace, sets its `lo` to
MTU 1500 (with loopback's 65536 a TCP segment exceeds the 64 KB tbf burst, every full segment is dropped and the
connection stalls), starts the processes inside it on 127.0.0.1 only, and ALWAYS deletes the namespace. For each
link, process 0 replaces the qdisc (`tbf rate R burst 64kb latency 50ms`; with `NAME+DELAY`, e.g. `1gbit+1ms`, a
`netem delay` child too, where the kernel has netem), then every configuration of `exchange_compute.STEPS` is timed
over warm steps, each from the same state, and the bytes the interface carried are counted
(`/sys/class/net/lo/statistics/tx_bytes`: every byte between the processes crosses `lo` once). Finally the
compute-only cost of each step (one process, collectives simulated with the same shapes, no network) is measured
by `exchange_compute.measure`. Writes JSON and a markdown table (`--out` with `.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TX_BYTES = "/sys/class/net/lo/statistics/tx_bytes"
RATES = {"1gbit": 1e9, "100mbit": 1e8, "10mbit": 1e7}
SYNC_INTERVAL = 16  # 0/1 Adam's mean step: one sync and SYNC_INTERVAL - 1 local steps (its default clipper)


def parse_link(link: str) -> tuple[str | None, str | None]:
  """'unthrottled' -> (None, None); '1gbit' -> ('1gbit', None); '1gbit+1ms' -> ('1gbit', '1ms')."""
  rate, _, delay = link.partition("+")
  rate = None if rate == "unthrottled" else rate
  if rate is not None and rate not in RATES:
    raise SystemExit(
      f"--links: unknown rate {rate!r} in {link!r}; use unthrottled or one of {sorted(RATES)}, "
      f"optionally with +DELAY (e.g. 1gbit+1ms)."
    )
  return rate, delay or None


def shape_link(rate: str | None, delay: str | None) -> None:
  """Replaces `lo`'s qdisc (inside the namespace this process runs in)."""
  subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
  if rate is None and delay is None:
    return
  if rate is None:
    subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", delay], check=True)
    return
  subprocess.run(
    [
      "tc",
      "qdisc",
      "add",
      "dev",
      "lo",
      "root",
      "handle",
      "1:",
      "tbf",
      "rate",
      rate,
      "burst",
      "64kb",
      "latency",
      "50ms",
    ],
    check=True,
  )
  if delay is not None:
    subprocess.run(
      ["tc", "qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "netem", "delay", delay], check=True
    )


def tx_bytes() -> int:
  return int(pathlib.Path(TX_BYTES).read_text())


# ---------------------------------------------------------------------------------------------------------- worker


def worker(args) -> None:
  """One process of the job: times every configuration on every link; process 0 writes the results."""
  if args.cores:  # before jax starts: XLA sizes its thread pools to the cores this process may run on
    os.sched_setaffinity(0, [int(core) for core in args.cores.split(",")])
  import jax

  address = f"127.0.0.1:{args.port}"  # also where the coordinator listens: it has no authentication
  jax.distributed.initialize(
    address, num_processes=args.processes, process_id=args.process_id, coordinator_bind_address=address
  )
  import numpy as np
  import optax
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import optax_lamb16
  from benchmarks import exchange_compute

  exchange_compute.set_malloc(args.malloc)

  world = jax.device_count()
  if args.devices_per_process == 1:
    mesh, comm, data = jax.make_mesh((world,), ("data",), axis_types=(AxisType.Auto,)), "data", "data"
  else:  # processes are the hosts of a two-level grid (SPEC.md section 3b), their devices its fast axis
    devices = np.array(jax.devices()).reshape(args.processes, args.devices_per_process)
    mesh = jax.sharding.Mesh(devices, ("hosts", "local"), axis_types=(AxisType.Auto,) * 2)
    comm, data = optax_lamb16.comm.TwoLevel(fast="local", slow="hosts"), ("hosts", "local")
  params = jax.tree.map(np.asarray, exchange_compute.make_tree(exchange_compute.SIZES[args.size], jax.random.key(0)))
  grads = [
    jax.tree.map(
      np.asarray, exchange_compute.make_tree(exchange_compute.SIZES[args.size], jax.random.key(1 + rank), scale=0.01)
    )
    for rank in range(world)
  ]
  stacked_grads = jax.tree.map(lambda *g: np.stack(g), *grads)

  def put(tree, spec):
    return jax.tree.map(
      lambda a: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda index: a[index]), tree
    )

  global_grads = put(stacked_grads, P(data))

  class LinkRunner:
    def __init__(self, name, step):
      self.name, self.times, self.bytes, self.faults = name, {}, {}, {}
      tx = step.make(optax_lamb16, comm)
      per_rank = step.per_rank_params
      param_spec = P(data) if per_rank else P()
      self.params = put(
        jax.tree.map(lambda p: np.broadcast_to(p, (world, *p.shape)), params) if per_rank else params, param_spec
      )
      mine = (lambda p: jax.tree.map(lambda a: a[0], p)) if per_rank else (lambda p: p)
      ours = (lambda p: jax.tree.map(lambda a: a[None], p)) if per_rank else (lambda p: p)
      local_init = optax.GradientTransformation(lambda p: tx.init(mine(p)), tx.update)
      state = optax_lamb16.sharded_init(local_init, self.params, mesh, data, param_specs=param_spec)
      specs = optax_lamb16.state_partition_specs(state, data)

      def local_step(params, state, grads):  # a training step without the gradient: -> (new params, new state)
        local = mine(params)
        updates, state = tx.update(jax.tree.map(lambda g: g[0], grads), state, local)
        return ours(optax.apply_updates(local, updates)), state

      # Params and state donated, as a training loop donates them (see `exchange_compute`).
      self.step = jax.jit(
        jax.shard_map(local_step, mesh=mesh, in_specs=(param_spec, specs, P(data)), out_specs=(param_spec, specs)),
        donate_argnums=(0, 1),
      )
      self.inputs = exchange_compute.Continuing(
        exchange_compute.bring_into_phase(name, step, self.step, self.params, state, global_grads)
      )

    def call(self):
      """One step of this phase, from the previous step's outputs (`exchange_compute.Continuing`); returns its
      seconds and this process's page faults."""
      params, state = self.inputs.take()
      faults, start = exchange_compute.minor_page_faults(), time.perf_counter()
      self.inputs.give(jax.block_until_ready(self.step(params, state, global_grads)))
      return time.perf_counter() - start, exchange_compute.minor_page_faults() - faults

    def time(self, link, steps):
      self.call()  # one untimed step on this link
      multihost_utils.sync_global_devices(f"{self.name} {link}")
      before = tx_bytes()
      times, faults = zip(*[self.call() for _ in range(steps)])
      self.bytes[link] = (tx_bytes() - before) / steps
      self.times[link], self.faults[link] = statistics.median(times), statistics.mean(faults)

  names = [name for name in exchange_compute.STEPS if name != "optax.adam"]  # optax.adam: compute-only yardstick
  runners = [LinkRunner(name, exchange_compute.STEPS[name]) for name in names]
  for link in args.links.split(","):
    if args.process_id == 0:
      shape_link(*parse_link(link))
    multihost_utils.sync_global_devices(f"link {link}")
    for runner in runners:
      runner.time(link, args.steps)
      if args.process_id == 0:
        print(
          f"{link:>12} {runner.name:<36} {runner.times[link] * 1e3:10.1f} ms {runner.bytes[link] / 1e6:8.3f} MB",
          flush=True,
        )
  if args.process_id == 0:
    shape_link(None, None)
    num_params = sum(a.size for a in jax.tree.leaves(params))
    pathlib.Path(args.worker_out).write_text(
      json.dumps(
        {
          "num_params": int(num_params),
          "processes": args.processes,
          "devices": world,
          "devices_per_process": args.devices_per_process,
          "rows": [
            {"step": r.name, "seconds": r.times, "wire_bytes_per_step": r.bytes, "page_faults_per_step": r.faults}
            for r in runners
          ],
        }
      )
    )
  jax.distributed.shutdown()


# ---------------------------------------------------------------------------------------------------------- driver


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def namespaces_available() -> str | None:
  """None if this machine can run the benchmark, else why not."""
  if os.geteuid() != 0:
    return "needs root (network namespaces and tc)"
  for tool in ("ip", "tc"):
    if shutil.which(tool) is None:
      return f"needs `{tool}` (iproute2)"
  probe = f"olb_probe{os.getpid()}"
  made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
  if made.returncode != 0:
    return f"`ip netns add` failed: {made.stderr.strip()}"
  subprocess.run(["ip", "netns", "del", probe], capture_output=True)
  return None


def netem_available(namespace: str) -> bool:
  inside = ["ip", "netns", "exec", namespace]
  ok = (
    subprocess.run(
      [*inside, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], capture_output=True
    ).returncode
    == 0
  )
  subprocess.run([*inside, "tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
  return ok


def process_cores(process_id: int, cores_per_process: int) -> list[int]:
  """The cores process `process_id` runs on: its own `cores_per_process` of them, as each host of a cluster has its
  own (0: no pinning, every process may run anywhere)."""
  if cores_per_process == 0:
    return []
  available = sorted(os.sched_getaffinity(0))
  first = process_id * cores_per_process
  if first + cores_per_process > len(available):
    raise SystemExit(
      f"--cores-per-process {cores_per_process}: process {process_id} needs cores {first}.."
      f"{first + cores_per_process - 1} but {len(available)} are available; pass a smaller value, or 0 "
      f"to let the processes share the cores."
    )
  return available[first : first + cores_per_process]


def run_job(args, links: list[str], worker_out: pathlib.Path) -> dict:
  namespace = f"olb{os.getpid()}"
  subprocess.run(["ip", "netns", "add", namespace], check=True)
  procs = []
  try:
    subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "mtu", "1500", "up"], check=True)
    if any("+" in link for link in links) and not netem_available(namespace):
      print("netem is not available in this kernel: links with +DELAY are skipped", flush=True)
      links = [link for link in links if "+" not in link]
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    port = free_port()
    for pid in range(args.processes):
      cores = ",".join(map(str, process_cores(pid, args.cores_per_process)))
      procs.append(
        subprocess.Popen(
          [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-m",
            "benchmarks.link_bench",
            "--worker",
            "--port",
            str(port),
            "--process-id",
            str(pid),
            "--processes",
            str(args.processes),
            "--size",
            args.size,
            "--cores",
            cores,
            "--malloc",
            args.malloc,
            "--devices-per-process",
            str(args.devices_per_process),
            "--links",
            ",".join(links),
            "--steps",
            str(args.steps),
            "--worker-out",
            str(worker_out),
          ],
          env=env,
          stdout=None if pid == 0 else subprocess.DEVNULL,
          stderr=None if pid == 0 else subprocess.PIPE,
        )
      )
    deadline = time.monotonic() + args.timeout
    for proc in procs:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    failed = [p for p in procs if p.returncode != 0]
    if failed:
      raise SystemExit(
        f"{len(failed)} benchmark process(es) failed (return codes "
        f"{[p.returncode for p in procs]}); see their output above."
      )
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
  result = json.loads(worker_out.read_text())
  result["links"] = links
  return result


def compute_only(args) -> dict:
  """Medians of the same steps on one device with simulated collectives (a fresh process: one device, no network),
  on the cores the job's first process had."""
  cores = process_cores(0, args.cores_per_process)
  script = (
    "import os, json; "
    + (f"os.sched_setaffinity(0, {cores}); " if cores else "")
    + f"from benchmarks import exchange_compute as e; e.set_malloc({args.malloc!r}); "
    f"n, m, temp, faults = e.measure({args.size!r}, {args.processes}, {args.compute_repeats}, 5); "
    f"print(json.dumps({{'machine': e.machine_name(), 'seconds': m}}))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def worker_machine() -> str:
  from benchmarks import exchange_compute

  return exchange_compute.machine_name()


def markdown(result: dict) -> str:
  links, compute = result["links"], result.get("compute_only", {}).get("seconds")
  exact = "exact flat mean + optax.adam"
  header = "| step | " + " | ".join(links) + (" | compute only |" if compute else " |")
  grid = result.get("devices_per_process", 1)
  layout = (
    f"{result['processes']} processes of {grid} devices, 1-bit steps over `comm.TwoLevel` (SPEC.md section 3b)"
    if grid > 1
    else f"{result['processes']} processes"
  )
  cores = result.get("cores_per_process", 0)
  layout += f", each on its own {cores} core{'s' if cores > 1 else ''}" if cores else ", sharing every core"
  layout += f", malloc {result.get('malloc', 'system')}"
  lines = [
    f"{result['num_params']:,} float32 parameters, {layout}; median ms per step "
    f"(ratio to {exact} on the same link); wire MB per step over all processes.",
    "",
    header,
    "|---|" + "---:|" * (len(links) + bool(compute)),
  ]
  rows = {row["step"]: row for row in result["rows"]}
  for name, row in rows.items():
    cells = [
      f"{row['seconds'][link] * 1e3:,.1f} ({row['seconds'][link] / rows[exact]['seconds'][link]:.2f}x), "
      f"{row['wire_bytes_per_step'][link] / 1e6:.2f} MB"
      for link in links
    ]
    lines.append(f"| {name} | " + " | ".join(cells) + (f" | {compute[name] * 1e3:.1f} |" if compute else " |"))
  if compute:
    lines.append("| optax.adam alone | " + " | ".join("" for _ in links) + f" | {compute['optax.adam'] * 1e3:.1f} |")
  for link, mean in result["zero_one_mean_step"].items():
    lines.append("")
    lines.append(
      f"0/1 Adam mean step at sync interval {SYNC_INTERVAL}, {link}: {mean * 1e3:.1f} ms "
      f"({mean / rows[exact]['seconds'][link]:.3f}x exact flat)."
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="4M")
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument(
    "--devices-per-process",
    type=int,
    default=1,
    help="L > 1: each process is a host of L CPU devices, and the 1-bit steps use comm.TwoLevel",
  )
  parser.add_argument("--links", default="unthrottled,1gbit,100mbit,1gbit+1ms")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and link")
  parser.add_argument(
    "--cores-per-process",
    type=int,
    default=None,
    help="pin each process to its own cores, as each host has its own (default: the cores divided "
    "evenly; 0: no pinning, the processes share every core)",
  )
  parser.add_argument("--compute-repeats", type=int, default=20)
  parser.add_argument("--timeout", type=float, default=3600.0)
  parser.add_argument("--out", default="docs/results/link_bench.json")
  parser.add_argument(
    "--malloc",
    default="reuse",
    choices=("reuse", "system"),
    help="reuse: glibc keeps freed memory for reuse in every process (exchange_compute.set_malloc); "
    "system: glibc's defaults",
  )
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--worker-out", help=argparse.SUPPRESS)
  parser.add_argument("--cores", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  if args.cores_per_process is None:
    args.cores_per_process = len(os.sched_getaffinity(0)) // args.processes
  links = args.links.split(",")
  for link in links:
    parse_link(link)
  why_not = namespaces_available()
  if why_not is not None:
    raise SystemExit(f"link_bench.py {why_not}.")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  worker_out = out.with_suffix(".worker.json")
  # SIGTERM (a killed job, a CI timeout) unwinds like Ctrl-C, so that `run_job` still deletes the namespace.
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
  result = run_job(args, links, worker_out)
  result["cores_per_process"], result["malloc"] = args.cores_per_process, args.malloc
  worker_out.unlink()
  if args.devices_per_process == 1:  # simulated collectives model one level only
    result["compute_only"] = compute_only(args)
  machine = result["compute_only"]["machine"] if "compute_only" in result else worker_machine()
  result["machine"] = machine + f", {os.cpu_count()} cores"
  times = {row["step"]: row["seconds"] for row in result["rows"]}
  result["zero_one_mean_step"] = {
    link: (times["zero_one_adam, sync step"][link] + (SYNC_INTERVAL - 1) * times["zero_one_adam, local step"][link])
    / SYNC_INTERVAL
    for link in result["links"]
  }
  result["command"] = "python -m benchmarks.link_bench " + " ".join(sys.argv[1:])
  out.write_text(json.dumps(result, indent=1))
  table = markdown(result)
  out.with_suffix(".md").write_text(f"Machine: {result['machine']}. Command: `{result['command']}`.\n\n{table}\n")
  print(table)
  print(f"\nwrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
