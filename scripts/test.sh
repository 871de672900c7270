#!/usr/bin/env bash
# The test suite. pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export WANDB_MODE=offline WANDB_SILENT=true HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# DeepSpeed JIT-compiles its async I/O op (NVMe offload) on first use: about
# 200 s on 2 cores, once per machine (cached in ~/.cache/torch_extensions).
# Built here, timed on its own line, so that the suite's time is the tests'.
.venv/bin/python - <<'PY'
import time
from deepspeed.ops.op_builder import AsyncIOBuilder
from mi_scale.train.engine import warn_if_stale_build_lock
builder, t = AsyncIOBuilder(), time.time()
if builder.is_compatible(verbose=False):
    warn_if_stale_build_lock(builder.name)
    builder.load(verbose=False)
    print(f"[test] DeepSpeed async I/O op ready in {time.time() - t:.0f} s (built once per machine, then cached)")
PY
start=$(date +%s)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
echo "suite wall time: $(( $(date +%s) - start )) s"
if [[ $rc -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit $rc
