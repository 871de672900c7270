#!/usr/bin/env bash
# The test suite. pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
echo "suite wall time: $(( $(date +%s) - start )) s"
if [[ $rc -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $rc
