#!/usr/bin/env bash
# The scaling study, end to end (experiments/results/scaling.md):
#
#   experiments/scaling.sh            # ~70 min on 2 CPU cores; re-running resumes/skips
#
# 1. the offline 12-kingdom corpus, unless it is there (nucleo data corpus, ~75 s);
# 2. the 40-point sweep of experiments/sweeps/scaling.yaml (finished points are skipped,
#    interrupted ones resume), tracked as the MLflow experiment nucleo-scaling in runs/mlflow.db;
# 3. the fits, plots and report, with the hand-written discussion appended.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${NUCLEO_PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || { launch/setup.sh; }
if [ ! -f data/offline/shards/manifest.json ]; then
    "$PY" -m nucleo data corpus --out data/offline
fi
"$PY" -m nucleo sweep run experiments/sweeps/scaling.yaml
"$PY" -m nucleo scaling fit --experiment nucleo-scaling --sweep scaling \
    --out experiments/results/scaling.md --notes experiments/sweeps/scaling_notes.md
