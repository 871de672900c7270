"""GPU-only checks (skipped without CUDA; scripts/gpu-check.sh runs the full
GPU report): estimators agree between CUDA and CPU, and a bf16 GPT step with
the MI term trains on CUDA. On CPU, only the clear error is checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs a CUDA GPU; run scripts/gpu-check.sh on a GPU machine")


@needs_gpu
def test_estimators_on_cuda_equal_cpu():
    from mi_scale.gpu_check import ESTIMATORS, estimator_agreement

    rows = estimator_agreement("cuda", n=1024, d=8, total_mi=1.0)
    assert [r["estimator"] for r in rows] == list(ESTIMATORS)
    for r in rows:
        # gaussian, renyi2, hsic and ksg compute in float64; infonce's critic in float32
        assert r["cuda"] == pytest.approx(r["cpu"], abs=1e-4, rel=1e-4), r
    gaussian = rows[0]
    assert gaussian["cuda"] == pytest.approx(1.0, abs=0.1)  # and both are right, not just equal


STEPS = dict(seq_len=128, batch=8, steps=3, warmup=1)


def cpu_reference(out: Path) -> dict:
    """The same 4 steps (same seed, init and batches) in fp32 on the CPU, in a
    process that sees no GPU."""
    code = ("import json, sys; from pathlib import Path; from mi_scale.gpu_check import train_variant; "
            f"print(json.dumps(train_variant('gpt-1m', True, precision='fp32', out=Path(sys.argv[1]), **{STEPS})))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_gpu
def test_bf16_gpt_steps_with_mi_on_cuda(tmp_path):
    from mi_scale import plan
    from mi_scale.gpu_check import _config, train_variant

    r = train_variant("gpt-1m", True, out=tmp_path / "gpu", **STEPS)
    cpu = cpu_reference(tmp_path / "cpu")
    assert r["dtype"] == "bfloat16" and cpu["dtype"] == "float32" and r["params"] == cpu["params"]
    # bf16 on the GPU follows fp32 on the CPU: the first loss (same initial model and
    # batch) to bf16 rounding, the MI after 4 AdamW steps to within 25 %
    assert r["first_loss"] == pytest.approx(cpu["first_loss"], rel=0.02)
    assert r["last_loss"] < r["first_loss"]  # 4 AdamW steps lower the loss of a fresh byte-level model
    assert r["last_loss"] == pytest.approx(cpu["last_loss"], rel=0.05)
    assert cpu["last_mi_mean"] > 0 and r["last_mi_mean"] == pytest.approx(cpu["last_mi_mean"], rel=0.25)
    # peak GPU memory: at least the bf16 weights and the fp32 Adam moments, at most
    # 4x what the planner predicts for this config (its CUDA context is not torch's)
    cfg = _config("gpt-1m", STEPS["seq_len"], STEPS["batch"], True, 0, "bf16", True, tmp_path)
    pl = plan.plan(cfg, nodes=1, gpus_per_node=1, gpu_memory_gb=80, host_memory_gb=64, advise=False)
    predicted = pl.per_rank_peak_bytes - pl.breakdown.get("cuda_context", 0)
    assert 10 * r["params"] <= r["peak_mem_gib"] * 2**30 <= 4 * predicted, (r["peak_mem_gib"], predicted)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_cuda_says_so(capsys):
    from mi_scale import gpu_check

    assert gpu_check.main(["--sizes", "gpt-1m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU check needs a CUDA GPU") and "scripts/gpu-check.sh" in err
