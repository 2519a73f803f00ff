#!/usr/bin/env bash
# The committed byte-level LM sweep (docs/results/charlm.json and charlm.png), in one command, on one CPU core:
# 3 or 4 learning rates per optimizer for 400 steps, then each optimizer for 1200 steps at its best one, batch 16,
# every run with a 5 % linear warm-up and a cosine decay to lr/10 (the usual transformer recipe): about 90 minutes
# with the core to itself. (The committed run made the lamb16_blockwise_sr rows in a second process on the other core,
# with the same settings, merged with --merge; see "commands" in docs/results/charlm.json.)
#
#   experiments/charlm_sweep.sh [core]        # pins to CPU core 1 unless told otherwise
#
# LAMB's trust ratio (||p|| / ||u|| per leaf) and LAMB16's ((wn / un) * (1e-3 / lr)) ** 0.382 (docs/SPEC.md section 1)
# shrink the step below lr (LAMB16's effective step grows only like lr ** 0.618), so their grids sit higher. A first
# pass over adamw=5e-4,1e-3,2e-3,4e-3 (400 steps: 3.509, 3.313, 3.143, 3.096 bits/byte) put AdamW's best at the top
# of its grid, so every grid was moved up before the committed run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
SWEEP="adamw=4e-3,8e-3,1.6e-2;lamb=4e-3,1e-2,2.5e-2"
SWEEP+=";lamb16=5e-3,1.5e-2,4.5e-2;lamb16_blockwise=1e-3,2.5e-3,6e-3,1.5e-2"
SWEEP+=";lamb16_blockwise_sr=1e-3,2.5e-3,6e-3,1.5e-2"
exec taskset -c "${1:-1}" "$PYTHON" -m experiments.charlm \
  --sweep "$SWEEP" --schedule cosine --warmup 0.05 \
  --sweep-steps 400 --steps 1200 --batch-size 16 --eval-every 100 --seed 0 \
  --out "${OUT:-docs/results}" --json-name charlm.json --plot-name charlm.png
