#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv.
# CPU machines (no nvidia-smi): torch is pinned to the CPU build 2.13.0 via
# constraints-cpu.txt. GPU machines: set MI_SCALE_TORCH=gpu to skip the pin
# and let pip resolve the normal CUDA torch from pyproject's range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# System packages, installed where we can (root with apt):
# - libaio-dev: DeepSpeed's async I/O op (NVMe offload, ZeRO-Infinity);
#   without it nvme offload stops with an error that says so.
# - shellcheck: the test suite lints the launch and setup scripts with it;
#   without it those tests skip.
apt_missing=()
[[ -e /usr/include/libaio.h ]] || apt_missing+=(libaio-dev)
command -v shellcheck >/dev/null || apt_missing+=(shellcheck)
if (( ${#apt_missing[@]} )) && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    echo "[setup] installing ${apt_missing[*]} (apt)"
    { apt-get update -qq && apt-get install -y -qq "${apt_missing[@]}"; } >/dev/null 2>&1 \
        || echo "[setup] could not install ${apt_missing[*]}: NVMe offload may be unavailable, shellcheck tests skip"
fi
STAMP=.venv/.mi-scale-installed
# Reuse the venv when pyproject.toml and the constraints are unchanged.
want=$(cat pyproject.toml constraints-cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && "$(cat $STAMP)" == "$want" ]]; then
    exit 0
fi
echo "[setup] creating .venv with $($PY --version)"
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
pip_install --upgrade pip setuptools wheel
if [[ "${MI_SCALE_TORCH:-cpu}" == "cpu" ]]; then
    pip_install -c constraints-cpu.txt "torch==2.13.0"
    pip_install -c constraints-cpu.txt -e ".[test]"
else
    pip_install -e ".[test]"
fi
.venv/bin/python - <<'PY'
import torch
assert not torch.version.cuda or torch.cuda.is_available(), (
    "a CUDA torch was installed on a machine without a GPU: rerun with MI_SCALE_TORCH=cpu")
print(f"[setup] torch {torch.__version__} (cuda={torch.version.cuda})")
PY
echo "$want" > $STAMP
