#!/usr/bin/env bash
# The GPU checks, as one prepared script (under 5 minutes on one H100/H200): the LAMB16 update against optax.lamb
# (time, compiled peak memory, memory traffic and its fraction of the GPU's peak bandwidth) and the compute cost of
# the 1-bit compressed exchange and of the 1-bit optimizers' steps on one device. What the GPU programs contain
# (native float8 conversions, no loops, the 1-bit exchange's collectives and bytes) is checked without a GPU, from
# programs lowered for "cuda": tests/test_cuda_lowering.py.
#
# Needs an installed jax with CUDA, optax, flax and orbax; no network, no pip. From the repository root:
#   bash benchmarks/gpu.sh [OUT_DIR]        (default OUT_DIR: docs/results/gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# XLA preallocates 75% of GPU memory by default; allocate on demand so the footprint numbers mean something.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
python - <<'PY'
import jax
device = jax.devices()[0]
print(f"jax {jax.__version__} on {device.platform}: {device.device_kind}")
if device.platform != "gpu":
  raise SystemExit("benchmarks/gpu.sh: no GPU visible to jax (jax.devices() is on "
                   f"{device.platform}); install jax with CUDA, or run python -m benchmarks.update_bench for CPU numbers.")
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
timeout 240 python -m benchmarks.update_bench --sizes 4M,50M --repeats 40 --out "$out/update_bench.json"
timeout 150 python -m benchmarks.exchange_compute --size 50M --ranks 8 --repeats 20 --out "$out/exchange_compute.json"
echo "wrote $out/update_bench.json and $out/exchange_compute.json"
