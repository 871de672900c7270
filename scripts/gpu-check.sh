#!/usr/bin/env bash
# The checks that need a CUDA GPU, on a machine with one:
#   bash scripts/gpu-check.sh [--sizes gpt-350m,gpt-1.3b] [--seq-len 1024] [--batch 8] [--steps 8]
# 1. sets up .venv with a CUDA torch (MI_SCALE_TORCH=gpu bash scripts/setup.sh),
# 2. prints bf16 GPT training with the MI term off and on (MFU, tokens/s, peak
#    GPU memory, MI overhead ratio) and every estimator on CUDA vs CPU
#    (mi_scale/gpu_check.py; also writes runs/bench/bench_gpu.json),
# 3. runs the GPU tests (tests/test_gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU here (nvidia-smi finds none): run this on a machine with a CUDA GPU" >&2
    exit 2
fi
nvidia-smi -L
MI_SCALE_TORCH=gpu bash scripts/setup.sh
# setup.sh reuses an existing .venv: one made on a CPU machine has a CPU torch
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: .venv's torch cannot see the GPU (a CPU build?): rm -rf .venv and rerun" >&2
    exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} WANDB_MODE=disabled
.venv/bin/python -m mi_scale.gpu_check "$@"
.venv/bin/python -m pytest tests/test_gpu.py -q
