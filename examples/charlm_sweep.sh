#!/usr/bin/env bash
# The committed byte-level LM sweep (docs/results/charlm.json and charlm.png), in one command, on one CPU core:
# 4 to 6 learning rates per optimizer for 150 steps, then each optimizer for 450 steps at its best one, batch 16:
# about 25 minutes with the core to itself, about 50 minutes when other processes share it.
#
#   examples/charlm_sweep.sh [core]        # pins to CPU core 1 unless told otherwise
#
# LAMB's trust ratio (||p|| / ||u|| per leaf) and LAMB16's ((wn / un) * (1e-3 / lr)) ** 0.382 (docs/SPEC.md section 1)
# shrink the step below lr (LAMB16's effective step grows only like lr ** 0.618), so their first ranges started higher;
# every range was then extended downwards while its lowest rate was the best (on this model all ended at 1e-3 or 3e-3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
SWEEP="adamw=3e-4,1e-3,3e-3,1e-2;lamb=1e-3,3e-3,1e-2,3e-2"
SWEEP+=";lamb16=1e-3,3e-3,1e-2,3e-2,1e-1;lamb16_blockwise=3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"
exec taskset -c "${1:-1}" "$PYTHON" examples/charlm.py \
  --sweep "$SWEEP" \
  --sweep-steps 150 --steps 450 --batch-size 16 --eval-every 30 --seed 0 \
  --out docs/results --json-name charlm.json --plot-name charlm.png
