"""GPU-only checks (skipped without CUDA; scripts/gpu-check.sh runs the full
GPU report): estimators agree between CUDA and CPU, and a bf16 GPT step with
the MI term trains on CUDA. On CPU, only the clear error is checked."""

from __future__ import annotations

import math

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


@needs_gpu
def test_bf16_gpt_steps_with_mi_on_cuda(tmp_path):
    from mi_scale.gpu_check import train_variant

    r = train_variant("gpt-1m", True, seq_len=128, batch=8, steps=3, warmup=1, out=tmp_path)
    assert r["dtype"] == "bfloat16"
    assert math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])
    assert r["last_loss"] < r["first_loss"]  # 4 AdamW steps lower the loss of a fresh byte-level model
    assert math.isfinite(r["last_mi_mean"]) and r["last_mi_mean"] > 0
    assert r["peak_mem_gib"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_cuda_says_so(capsys):
    from mi_scale import gpu_check

    assert gpu_check.main(["--sizes", "gpt-1m"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the GPU check needs a CUDA GPU") and "scripts/gpu-check.sh" in err
