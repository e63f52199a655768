#!/usr/bin/env bash
# The README's test command (and CI's): set up, lint, run the whole suite. It runs against the
# GPU when there is one; NUCLEO_TEST_DEVICE=cpu keeps it on the CPU. Arguments go to pytest
# (e.g. -m "not slow" for the fast tier, -m gpu for the GPU tests).
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
venv="${NUCLEO_VENV:-.venv}"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/python" -m pytest "$@"
