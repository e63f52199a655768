#!/usr/bin/env bash
# The GPU check, for whoever has a GPU host: set up (the project's .venv; where a CUDA build of
# torch is already installed, a venv that uses it), then nucleo.studies.gpu_check: build the missing
# kernel packages within a time limit, run the GPU tests, the precision matrix on the GPU and a
# short bf16 run of every family on one GPU and on all GPUs, and write
# experiments/results/gpu.md with tokens/s and MFU per family. About 10 minutes at most.
#
#   launch/gpu_check.sh                       # everything, within --budget seconds (570)
#   launch/gpu_check.sh --dry-run             # the plan, on any machine
#   launch/gpu_check.sh --kernel-budget 0     # do not try to build kernel packages
#   launch/gpu_check.sh --skip matrix --steps 100 --size base
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${NUCLEO_VENV:-.venv}"
if [ ! -f "$venv/.nucleo-setup" ] && python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    # a CUDA torch is here already (a GPU image, conda): build on it rather than download another
    NUCLEO_SYSTEM_TORCH=1 launch/setup.sh
else
    launch/setup.sh
fi
export PYTHONUNBUFFERED=1
exec "$venv/bin/python" -m nucleo.studies.gpu_check "$@"
