"""Wall-clock of MNIST data-parallel training over a throttled link: exact Adam vs 1-bit Adam vs 0/1 Adam.

  sudo python -m benchmarks.link_train [--rate 100mbit] [--optimizers adam,onebit_adam,zero_one_adam]
                                      [--epochs 1] [--out docs/results/link_train.json]

Runs `experiments/mnist_multihost.py` (2 `jax.distributed` processes, one CPU device each, the convnet of the MNIST
comparison, global batch 256) inside a network namespace whose loopback (MTU 1500, only 127.0.0.1) is shaped by
`tc qdisc ... tbf rate RATE burst 64kb latency 50ms`, as `link_bench.py` shapes it, and ALWAYS deletes the
namespace. Every optimizer trains the same epochs on the same data order (eps 1e-5 and the 1-bit warm-up of 20 % of
the steps, as in the README's convergence run); the table gives each run's training
wall-clock, its final test accuracy and the bytes it sent. Writes JSON and a markdown table (`--out` with `.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile

from benchmarks import link_bench  # its namespace checks and link parsing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(args) -> dict:
  namespace = f"olt{os.getpid()}"
  inside = ["ip", "netns", "exec", namespace]
  rate, delay = link_bench.parse_link(args.rate)
  subprocess.run(["ip", "netns", "add", namespace], check=True)
  try:
    subprocess.run([*inside, "ip", "link", "set", "lo", "mtu", "1500", "up"], check=True)
    if rate is not None:
      subprocess.run(
        [*inside, "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"],
        check=True,
      )
    with tempfile.TemporaryDirectory() as out:
      env = dict(
        os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
      )
      subprocess.run(
        [
          *inside,
          sys.executable,
          "-m",
          "experiments.mnist_multihost",
          "--processes",
          "2",
          "--devices-per-process",
          "1",
          "--optimizers",
          args.optimizers,
          "--epochs",
          str(args.epochs),
          "--eps",
          str(args.eps),
          "--out",
          out,
          *(["--train-samples", str(args.train_samples)] if args.train_samples else []),
        ],
        env=env,
        check=True,
        timeout=args.timeout,
      )
      return json.loads((pathlib.Path(out) / "results.json").read_text())
  finally:
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def markdown(result: dict) -> str:
  runs = result["runs"]
  exact = next((r for r in runs if r["optimizer"] == "adam"), runs[0])
  lines = [
    f"MNIST convnet ({runs[0]['num_params']:,} parameters), 2 processes x 1 CPU device, global batch "
    f"{runs[0]['global_batch']}, {runs[0]['epochs']} epoch(s) = {runs[0]['steps']} steps, "
    f"link {result['rate']}.",
    "",
    "| optimizer | training wall-clock s | vs adam | final test accuracy | MB sent per rank |",
    "|---|---:|---:|---:|---:|",
  ]
  for r in runs:
    lines.append(
      f"| {r['optimizer']} | {r['seconds']:.1f} | {r['seconds'] / exact['seconds']:.2f}x | "
      f"{r['final_test_accuracy']:.4f} | {r['bytes_sent_per_rank'] / 1e6:.1f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rate", default="100mbit", help="a link of link_bench.py: unthrottled, 1gbit, 100mbit, ...")
  parser.add_argument("--optimizers", default="adam,onebit_adam,zero_one_adam")
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--train-samples", type=int, default=None)
  parser.add_argument(
    "--eps",
    type=float,
    default=1e-5,
    help="as in the README's convergence run: with 1e-8 the 1-bit optimizers diverge on this ReLU net",
  )
  parser.add_argument("--timeout", type=float, default=3600.0)
  parser.add_argument("--out", default="docs/results/link_train.json")
  args = parser.parse_args()
  why_not = link_bench.namespaces_available()
  if why_not is not None:
    raise SystemExit(f"link_train.py {why_not}.")
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # unwind: delete the namespace
  result = dict(run(args), rate=args.rate, command="python -m benchmarks.link_train " + " ".join(sys.argv[1:]))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  table = markdown(result)
  out.with_suffix(".md").write_text(f"Machine: {os.cpu_count()}-core CPU. Command: `{result['command']}`.\n\n{table}\n")
  print(table)


if __name__ == "__main__":
  main()
