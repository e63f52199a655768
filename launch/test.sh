#!/usr/bin/env bash
# The README's test command (and CI's): set up, lint, run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
launch/setup.sh
venv="${NUCLEO_VENV:-.venv}"
export DS_ACCELERATOR=cpu
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/python" -m pytest "$@"
