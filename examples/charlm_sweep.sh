#!/usr/bin/env bash
# The committed byte-level LM sweep (docs/results/charlm.json and charlm.png), in one command, on one CPU core:
# 3 learning rates per optimizer for 150 steps, then each optimizer for 450 steps at its best one (about 45 minutes).
#
#   examples/charlm_sweep.sh [core]        # pins to CPU core 1 unless told otherwise
#
# LAMB's trust ratio (||p|| / ||u|| per leaf) and LAMB16's ((wn / un) * (1e-3 / lr)) ** 0.382 (docs/SPEC.md section 1)
# shrink the step well below lr, LAMB16's effective step growing only like lr ** 0.618: their ranges sit higher.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec taskset -c "${1:-1}" "$PYTHON" examples/charlm.py \
  --sweep "adamw=1e-3,3e-3,1e-2;lamb=3e-3,1e-2,3e-2;lamb16=1e-2,3e-2,1e-1;lamb16_blockwise=1e-2,3e-2,1e-1" \
  --sweep-steps 150 --steps 450 --eval-every 30 --seed 0 \
  --out docs/results --json-name charlm.json --plot-name charlm.png
