#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv (or $NUCLEO_VENV) holding nucleo, its
# dependencies and the dev tools. Re-running does nothing unless pyproject.toml or the
# constraints changed.
#
# CPU machines: torch is installed first at the version in constraints/cpu.txt, and every
# later install runs under that constraint (PIP_CONSTRAINT reaches pip's isolated build
# environments too), so resolving deepspeed never pulls the multi-GB CUDA build of torch.
# On a public-PyPI CPU machine, point pip at the CPU wheels:
#   NUCLEO_TORCH_INDEX=https://download.pytorch.org/whl/cpu launch/setup.sh
# GPU machines: the same pinned torch from PyPI is the CUDA build; add the kernels with
#   NUCLEO_GPU_KERNELS=1 launch/setup.sh      (mamba-ssm, causal-conv1d, flash-attn; compiles)
# Machines whose python3 already has a CUDA build of torch (a GPU image, conda) can keep it:
#   NUCLEO_SYSTEM_TORCH=1 launch/setup.sh     (the venv sees python3's packages; torch stays)
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${NUCLEO_VENV:-.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.nucleo-setup"
want="$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)${NUCLEO_GPU_KERNELS:+-gpu}${NUCLEO_SYSTEM_TORCH:+-system-torch}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
echo "setting up $venv (once; about 2 minutes) ..."
if [ -n "${NUCLEO_SYSTEM_TORCH:-}" ]; then
    [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
else
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
fi
pip_install() {
    # Drop pip's notes about unreachable index folders (a local mirror's layout), keep the rest.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
        | { grep -v "^WARNING: Location '.*' is ignored" || true; }
    return "${PIPESTATUS[0]}"
}
constraints="$PWD/constraints/cpu.txt"
if [ -n "${NUCLEO_SYSTEM_TORCH:-}" ]; then
    # pin the torch that is there, so that nothing replaces it
    have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
    constraints="$(mktemp)"
    echo "torch==$have" > "$constraints"
else
    torch_spec="$(grep -E '^torch==' constraints/cpu.txt)"
    pip_install ${NUCLEO_TORCH_INDEX:+--index-url "$NUCLEO_TORCH_INDEX"} "$torch_spec"
fi
PIP_CONSTRAINT="$constraints" pip_install -e '.[dev]'
if [ -n "${NUCLEO_GPU_KERNELS:-}" ]; then
    PIP_CONSTRAINT="$constraints" pip_install --no-build-isolation -e '.[gpu]'
fi
echo "$want" > "$stamp"
echo "set up $venv"
