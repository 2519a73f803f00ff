"""Compute cost of the 1-bit compressed exchange and of the 1-bit optimizers' steps, on one device.

Each configuration runs as ONE rank of a P-rank job whose collectives are simulated locally with the same shapes
(`optax_lamb16.comm.SimulatedRanks`: rank 0 of P ranks that hold the same values),
so the time is what the exchange computes (packing, error feedback, unpacking, scales, flatten and unflatten), with
no network. `optax.adam`'s step on the same tree is timed alongside, in interleaved rounds, as the yardstick.

  python -m benchmarks.exchange_compute [--size 4M] [--ranks 8] [--repeats 20] [--malloc reuse|system]
                                       [--against REVISION] [--out docs/results/exchange_compute.json]

Prints a markdown table and writes JSON (with the device named, and each step's page faults per call). Each call is
a training step without the gradient: ``params, state -> apply_updates(params, update(grads, state, params)), new
state``, with params and state donated as a training loop donates them (without donation XLA:CPU allocates and
faults in fresh output buffers every call, and unchanged state cannot stay in place). Every call continues from the
previous call's outputs, as a training loop does, with the step counters and phase flags set back to those of the
phase named in its row, so that every call runs that phase (`Continuing`). `--against` times each step with the
package of another git revision too, in the same rounds (`library_at`): this VM's speed moves between runs as much as
many changes do, so compare a change with its base that way. `STEPS`
(the configurations) and `measure` are shared with `link_bench.py`, which times the same steps over real (throttled)
links.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import ctypes.util
import importlib.util
import json
import pathlib
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

import optax_lamb16
from benchmarks import update_bench
from benchmarks.update_bench import make_tree

SIZES = {**update_bench.SIZES, "tiny": (1, (8, 8), 2, 16)}  # tiny: for the tests of the benchmarks' drivers


def _next_t(state):
  return int(state.count) + 1  # the step counter the next update runs with (SPEC.md section 2)


def per_leaf_mean(lib, comm):
  """The exact mean as most data-parallel code writes it: one all-reduce per leaf (`lax.pmean` of the tree), over
  the communicator of the package `lib`."""
  communicator = lib.comm.as_communicator(comm)
  return optax.stateless(lambda updates, params=None: jax.tree.map(communicator.mean, updates))


class Step(NamedTuple):
  """One timed configuration: `make(lib, comm)` builds the transform from the package `lib` (`optax_lamb16`, or
  another revision's: `library_at`); `in_phase(state)` says whether the next update
  runs the phase the row names (None: one phase only; the runner steps until it holds); `per_rank_params`: the
  params differ per rank (0/1 Adam), so a multi-rank run lays them out per rank."""

  make: Callable[[Any, Any], optax.GradientTransformation]
  in_phase: Callable[[Any], bool] | None = None
  per_rank_params: bool = False


def _zero_one(lib, comm, **kwargs):
  return lib.zero_one_adam(1e-3, comm=comm, **kwargs)


# After the freeze (t = 3) the sync interval doubles every local step (scaler 1) up to the clipper.
_ZERO_ONE_FROZEN = dict(var_freeze_step=2, local_step_scaler=1)

STEPS = {
  "optax.adam": Step(lambda lib, comm: optax.adam(1e-3)),
  "exact per-leaf mean + optax.adam": Step(lambda lib, comm: optax.chain(per_leaf_mean(lib, comm), optax.adam(1e-3))),
  "exact flat mean + optax.adam": Step(lambda lib, comm: optax.chain(lib.uncompressed_mean(comm), optax.adam(1e-3))),
  "compressed_mean": Step(lambda lib, comm: lib.compressed_mean(comm)),
  "onebit_adam, warm-up": Step(
    lambda lib, comm: lib.onebit_adam(1e-3, comm=comm, freeze_step=10), lambda s: _next_t(s[0]) <= 10
  ),
  "onebit_adam, compression": Step(
    lambda lib, comm: lib.onebit_adam(1e-3, comm=comm, freeze_step=2), lambda s: _next_t(s[0]) > 2
  ),
  # Not frozen, and not a variance step (the variance interval doubles after every variance step: scaler 1).
  "zero_one_adam, compressed step": Step(
    lambda lib, comm: _zero_one(lib, comm, var_freeze_step=100, var_update_scaler=1),
    lambda s: not bool(s.frozen) and _next_t(s) % int(s.var_interval) != 0,
    per_rank_params=True,
  ),
  "zero_one_adam, local step": Step(
    lambda lib, comm: _zero_one(lib, comm, **_ZERO_ONE_FROZEN, local_step_clipper=16),
    lambda s: bool(s.frozen) and _next_t(s) % int(s.local_step_interval) != 0,
    per_rank_params=True,
  ),
  "zero_one_adam, sync step": Step(
    lambda lib, comm: _zero_one(lib, comm, **_ZERO_ONE_FROZEN, local_step_clipper=16),
    lambda s: bool(s.frozen) and _next_t(s) % int(s.local_step_interval) == 0 and int(s.local_step_interval) > 1,
    per_rank_params=True,
  ),
  "onebit_lamb, compression": Step(
    lambda lib, comm: lib.onebit_lamb(1e-3, comm=comm, freeze_step=2), lambda s: _next_t(s) > 2
  ),
  "compressed_mean + lamb16": Step(lambda lib, comm: optax.chain(lib.compressed_mean(comm), lib.lamb16(1e-3))),
}
MAX_PHASE_STEPS = 64


def bring_into_phase(name, step, train_step, params, state, grads):
  """Runs `train_step(params, state, grads) -> (params, state)` until `step.in_phase(state)` holds (the phase the
  row `name` times); returns that (params, state)."""
  for _ in range(MAX_PHASE_STEPS):
    if step.in_phase is None or step.in_phase(state):
      return jax.block_until_ready((params, state))
    params, state = jax.block_until_ready(train_step(params, state, grads))
  raise RuntimeError(f"{name}: not in its phase after {MAX_PHASE_STEPS} updates; fix `STEPS`.")


def fresh_copy(tree):
  """A copy of `tree` in new buffers, ready before the clock starts: the state a donating call may consume."""
  return jax.block_until_ready(jax.tree.map(lambda x: x.copy(), tree))


class Continuing:
  """The (params, state) of successive timed calls of one phase: each call takes the previous call's outputs, as a
  training loop does, with every 0-d leaf (the step counters, phase flags and 0/1 Adam's lr_sum among them) set back
  to the phase's, so that every call runs it. (Calls from fresh copies of the same arrays measure a step right after a
  copy of the whole state, which no training loop makes.)"""

  def __init__(self, inputs):
    self.phase, self.current = inputs, fresh_copy(inputs)  # the phase's own buffers are never donated

  def take(self):
    """The next call's (params, state), ready before the clock starts; pass its outputs to `give`."""
    inputs, self.current = self.current, None
    return jax.block_until_ready(
      jax.tree.map(lambda phase, now: phase.copy() if phase.ndim == 0 else now, self.phase, inputs)
    )

  def give(self, outputs):
    self.current = outputs


class Runner:
  """Times one configuration's training step on one device, every call in the same phase (`Continuing`), params and
  state donated."""

  def __init__(self, name, step, comm, params, grads, lib=optax_lamb16):
    self.name, self.grads = name, grads
    tx = step.make(lib, comm)

    def train_step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    state = tx.init(params)
    self.step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    # XLA's temporary buffers of one step: on XLA:CPU every call allocates them afresh, and above glibc's largest
    # mmap threshold (32 MiB) each call maps new pages and faults them in.
    self.temp_bytes = self.step.memory_analysis().temp_size_in_bytes
    self.inputs = Continuing(bring_into_phase(name, step, self.step, fresh_copy(params), state, grads))
    self.times, self.faults = [], []
    self.run(3, record=False)

  def run(self, calls, record=True):
    for _ in range(calls):
      params, state = self.inputs.take()
      faults, start = minor_page_faults(), time.perf_counter()
      self.inputs.give(jax.block_until_ready(self.step(params, state, self.grads)))
      if record:
        self.times.append(time.perf_counter() - start)
        self.faults.append(minor_page_faults() - faults)


def minor_page_faults() -> int:
  """This process's minor page faults so far: pages mapped in on first touch (fresh memory)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


MALLOC_CHOICES = ("reuse", "system")


def set_malloc(mode: str) -> bool:
  """``"reuse"``: glibc's malloc keeps the memory XLA:CPU frees for reuse (no mmap, no trimming, one arena), as a GPU
  runtime's caching allocator does. XLA:CPU allocates a step's temporaries with malloc on every call; with glibc's
  defaults, an allocation above its mmap threshold (at most 32 MiB) is mapped afresh and each page it touches faults
  in, every step, a cost of the CPU runtime rather than of the step's arithmetic; so do the heaps of the extra arenas
  that XLA's threads allocate from, which glibc trims and maps again. ``"system"``: glibc's defaults. Returns True;
  raises RuntimeError where "reuse" cannot be set (no glibc), so that no result is labelled with a setting it did not
  have. The benchmarks record page faults per step (`minor_page_faults`)."""
  if mode not in MALLOC_CHOICES:
    raise ValueError(f"malloc mode must be one of {MALLOC_CHOICES}, got {mode!r}")
  if mode == "system":
    return True
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # glibc's <malloc.h>
  try:
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    took = all(
      mallopt(option, value) for option, value in ((m_mmap_max, 0), (m_trim_threshold, 2**31 - 1), (m_arena_max, 1))
    )
  except (OSError, AttributeError, TypeError):
    took = False
  if not took:
    raise RuntimeError("--malloc reuse needs glibc's mallopt; pass --malloc system on this platform.")
  return True


def library_at(revision: str) -> types.ModuleType:
  """The `optax_lamb16` package as committed at git `revision`, imported beside the working tree's as
  ``optax_lamb16_at_<commit>`` (its absolute imports of itself renamed to match): for timing a change against its
  base in the same rounds, on a machine whose speed moves from run to run as much as many changes do."""
  root = pathlib.Path(__file__).resolve().parents[1]
  git = lambda *args: subprocess.run(["git", *args], cwd=root, check=True, capture_output=True).stdout
  commit = git("rev-parse", "--short", revision).decode().strip()
  name = f"optax_lamb16_at_{commit}"
  if name not in sys.modules:
    paths = [
      path.decode() for path in git("ls-tree", "-r", "-z", "--name-only", commit, "optax_lamb16").split(b"\0") if path
    ]
    if not paths:
      raise SystemExit(f"--against {revision}: commit {commit} has no optax_lamb16/ package to time.")
    directory = pathlib.Path(tempfile.mkdtemp(prefix=name))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    for path in paths:
      content = git("show", f"{commit}:{path}")
      if path.endswith(".py"):
        content = re.sub(rb"\boptax_lamb16\b", name.encode(), content)
      target = directory / name / pathlib.PurePosixPath(path).relative_to("optax_lamb16")
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(content)
    # Imported from its directory by location: its own absolute imports resolve through the package in sys.modules.
    spec = importlib.util.spec_from_file_location(
      name, directory / name / "__init__.py", submodule_search_locations=[str(directory / name)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
  return importlib.import_module(name)


def measure(size, ranks, repeats, rounds, against=None):
  """Compute-only medians (seconds), XLA temporary bytes and mean page faults per call of every configuration in
  `STEPS`, as one rank of `ranks`: ``(num_params, {name: seconds}, {name: bytes}, {name: faults})``. With
  `against` (a git revision), every configuration but `optax.adam` is timed with that revision's package too, in the
  same rounds, named ``"<name> @ <commit>"``."""
  params = make_tree(SIZES[size], jax.random.key(0))
  grads = make_tree(SIZES[size], jax.random.key(1), scale=0.01)
  comm = optax_lamb16.comm.SimulatedRanks(ranks)
  base = library_at(against) if against is not None else None
  runners = []
  for name, step in STEPS.items():
    runners.append(Runner(name, step, comm, params, grads))
    if base is not None and name != "optax.adam":
      runners.append(
        Runner(
          f"{name} @ {base.__name__.removeprefix('optax_lamb16_at_')}",
          step,
          base.comm.SimulatedRanks(ranks),
          params,
          grads,
          base,
        )
      )
  for _ in range(rounds):
    for runner in runners:
      runner.run(max(1, repeats // rounds))
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return (
    num_params,
    {r.name: statistics.median(r.times) for r in runners},
    {r.name: r.temp_bytes for r in runners},
    {r.name: statistics.mean(r.faults) for r in runners},
  )


def machine_name():
  device = jax.devices()[0]
  return f"{device.platform.upper()} {device.device_kind}, {platform.processor() or platform.machine()}"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="4M", choices=sorted(SIZES))
  parser.add_argument("--ranks", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument(
    "--malloc",
    default="reuse",
    choices=MALLOC_CHOICES,
    help="reuse: glibc keeps freed memory for reuse (see `set_malloc`); system: glibc's defaults",
  )
  parser.add_argument(
    "--against",
    metavar="REVISION",
    help="also time every step with the package as committed at this git revision (e.g. HEAD~1), "
    "interleaved in the same rounds: a change's effect, free of the machine's drift",
  )
  parser.add_argument("--out", default="docs/results/exchange_compute.json")
  args = parser.parse_args()
  set_malloc(args.malloc)
  num_params, medians, temps, faults = measure(args.size, args.ranks, args.repeats, args.rounds, args.against)
  adam = medians["optax.adam"]
  rows = [
    {
      "step": name,
      "median_seconds": seconds,
      "vs_adam": seconds / adam,
      "xla_temp_bytes": temps[name],
      "page_faults_per_call": faults[name],
    }
    for name, seconds in medians.items()
  ]
  print(
    f"jax {jax.__version__}, {machine_name()}; {num_params / 1e6:.1f}M params, {args.ranks} simulated ranks, "
    f"malloc {args.malloc}" + (f", against {args.against}" if args.against else "") + "\n"
  )
  print(
    "| step (one rank, compute only) | median ms | vs optax.adam | XLA temp MB | page faults per call |\n"
    "|---|---:|---:|---:|---:|"
  )
  for r in rows:
    print(
      f"| {r['step']} | {r['median_seconds'] * 1e3:.2f} | {r['vs_adam']:.2f}x | {r['xla_temp_bytes'] / 1e6:.1f} | "
      f"{r['page_faults_per_call']:,.0f} |"
    )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(
    json.dumps(
      {
        "jax": jax.__version__,
        "device": machine_name(),
        "num_params": num_params,
        "ranks": args.ranks,
        "malloc": args.malloc,
        "against": args.against,
        "rows": rows,
      },
      indent=1,
    )
  )
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
