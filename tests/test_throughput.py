"""Throughput metrics: model FLOPs per token and step against hand counts,
MFU arithmetic, the peak FLOP/s table and cache, the rank-0 broadcast, and the
worker's metrics rows."""

from __future__ import annotations

import json

import pytest
import torch

from distributed_helpers import run_world
from mi_scale import config as config_mod
from mi_scale.models import DeepMLP, build_gpt
from mi_scale.models.gpt import GPT, GPTConfig
from mi_scale.train import throughput

# gpt-1m at byte vocab 256 and seq_len 64: L=4, D=128.
# One block: ln_1 2D + qkv (3D^2 + 3D) + proj (D^2 + D) + ln_2 2D + fc (4D^2 + 4D) + proj (4D^2 + D)
#          = 12 D^2 + 13 D = 196608 + 1664 = 198272; four blocks = 793088.
# tok_emb (tied lm head, counted once) 256 * 128 = 32768; ln_f 2 * 128 = 256;
# pos_emb 64 * 128 = 8192 is a lookup and not counted.
GPT1M_N = 793088 + 32768 + 256  # = 826112
GPT1M_FLOPS_PER_TOKEN = 6 * GPT1M_N + 12 * 4 * 128 * 64  # = 4956672 + 393216 = 5349888

# DeepMLP(40 -> 10, depth 4, width 32): stem 40*32 + 32 = 1312; blocks 4 * (32*32 + 32) = 4224;
# head 32*10 + 10 = 330; N = 5866, one token per sample.
MLP_N = 1312 + 4224 + 330
MLP_FLOPS_PER_TOKEN = 6 * MLP_N  # = 35196


def test_gpt_flops_per_token_and_step_by_hand():
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=64)
    assert throughput.matmul_params(model) == GPT1M_N == 826112
    assert throughput.model_flops_per_token(model) == GPT1M_FLOPS_PER_TOKEN == 5349888
    # Training on shorter sequences than the model's positions: T = 32 in the attention term.
    assert throughput.model_flops_per_token(model, seq_len=32) == 6 * GPT1M_N + 12 * 4 * 128 * 32
    # micro-batch 16 x grad_accum 2 x world 2 x 64 tokens = 4096 tokens per step.
    assert throughput.flops_per_step(GPT1M_FLOPS_PER_TOKEN, 16, 2, 2, 64) == 5349888 * 4096 == 21913141248


def test_mlp_flops_per_token_and_step_by_hand():
    model = DeepMLP(40, 10, depth=4, width=32)
    assert throughput.model_flops_per_token(model) == MLP_FLOPS_PER_TOKEN == 35196
    assert throughput.flops_per_step(35196, 16, 1, 1, 1) == 563136


def test_counts_zero3_partitioned_parameters_by_ds_numel():
    """Under ZeRO-3 partitioned init a parameter's local tensor is empty; the
    count must come from ds_numel, and come out the same."""
    model = build_gpt("gpt-1m", vocab_size=256, seq_len=64)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert sum(p.numel() for p in model.parameters()) == 0
    assert throughput.model_flops_per_token(model) == GPT1M_FLOPS_PER_TOKEN


def test_hf_gpt2_counts_like_our_gpt(tmp_path):
    """A transformers GPT-2 of the same shape: tied wte counted once, wpe left out."""
    transformers = pytest.importorskip("transformers")
    from mi_scale.config import ModelConfig
    from mi_scale.models import build_model

    transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=256, n_positions=64,
                            bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    hf = build_model(ModelConfig(kind="hf", hf_name_or_path=str(tmp_path)), vocab_size=256, seq_len=16)
    ours = GPT(GPTConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=2, d_model=32))
    # 2 blocks x (12 * 32^2 + 13 * 32) = 2 x 12704 = 25408; wte 256 * 32 = 8192; ln_f 64.
    n = 25408 + 8192 + 64
    expected = 6 * n + 12 * 2 * 32 * 16  # = 201984 + 12288 = 214272
    assert throughput.model_flops_per_token(ours, seq_len=16) == expected == 214272
    assert throughput.model_flops_per_token(hf, seq_len=16) == expected


def test_mfu_by_hand():
    # 2.0e12 FLOPs in 0.5 s on 2 ranks of 4.0e12 FLOP/s: 4e12 / 8e12 = 0.5.
    assert throughput.mfu(2.0e12, 0.5, 4.0e12, 2) == pytest.approx(0.5, rel=1e-12)
    assert throughput.mfu(5349888 * 1024, 0.25, 1.0e11, 1) == pytest.approx(5349888 * 1024 / 0.25 / 1.0e11)


def test_gpu_table_matches_datasheets():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert throughput.gpu_peak_flops_per_s("NVIDIA H100 80GB HBM3", bf16) == 989.4e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA H100 PCIe", bf16) == 756.5e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA H200", bf16) == 989.4e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA A100-SXM4-80GB", fp32) == 19.5e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA A100-SXM4-80GB", fp32, tf32=True) == 156e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA L4", bf16) == 121e12
    assert throughput.gpu_peak_flops_per_s("NVIDIA L40S", bf16) == 362.1e12  # not L4's
    assert throughput.gpu_peak_flops_per_s("NVIDIA A10G", bf16) is None  # not A10's
    assert throughput.gpu_peak_flops_per_s("Some Future GPU", bf16) is None


def test_cpu_peak_cache_measures_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_SCALE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MI_SCALE_PEAK_FLOPS", raising=False)
    calls = []
    monkeypatch.setattr(throughput, "measure_matmul_flops",
                        lambda dtype, threads: calls.append((dtype, threads)) or 7.5e10)
    assert throughput.cpu_peak_flops_per_s(torch.float32, 3, measure_if_missing=False) is None
    assert throughput.peak_flops_per_s(torch.device("cpu"), torch.float32, threads=3) == 7.5e10
    assert throughput.peak_flops_per_s(torch.device("cpu"), torch.float32, threads=3) == 7.5e10
    assert calls == [(torch.float32, 3)]  # the second lookup came from the cache
    entries = json.loads((tmp_path / "peak_flops.json").read_text())
    assert entries == {f"{throughput.cpu_model_name()} | float32 | 3 threads": 7.5e10}
    monkeypatch.setenv("MI_SCALE_PEAK_FLOPS", "1.25e9")  # the override wins
    assert throughput.peak_flops_per_s(torch.device("cpu"), torch.float32, threads=3) == 1.25e9


def _agreed_peak(rank, world):
    import os
    os.environ["MI_SCALE_PEAK_FLOPS"] = str(1e9 * (rank + 1))  # every rank would find another number
    return throughput.agreed_peak_flops_per_s(torch.device("cpu"), torch.float32)


def test_all_ranks_get_rank0_peak():
    assert run_world(2, _agreed_peak) == [1e9, 1e9]


def test_worker_rows_carry_flops_and_mfu(tmp_path, monkeypatch, capsys):
    from mi_scale.train.worker import run_worker

    peak = 2.5e10
    monkeypatch.setenv("MI_SCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MI_SCALE_PEAK_FLOPS", raising=False)
    throughput.write_cache_entry(torch.float32, torch.get_num_threads(), peak)  # no measurement runs
    cfg = config_mod.load(None, [
        f"run.output_dir={tmp_path}", "run.name=tp", "model.depth=4", "model.width=32", "data.batch_size=16",
        "mi.sketch_dim=4", "train.steps=4", "train.log_every=2", "train.eval_every=4", "train.eval_batches=1",
        "train.checkpoint_every=4", "deepspeed.zero_stage=0", "tracking.wandb=disabled"])
    run_worker(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 4
    out = capsys.readouterr().out
    for r in train:
        assert r["flops_per_step"] == MLP_FLOPS_PER_TOKEN * 16 == 563136  # 1 rank, no accumulation
        assert r["peak_flops_per_s"] == peak
        assert r["mfu"] == pytest.approx(563136 / r["step_time_s"] / peak, rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(16 / r["step_time_s"], rel=1e-9)
        if r["step"] % 2 == 0:  # the progress line shows the same MFU
            assert f"MFU {100 * r['mfu']:.1f}%" in out
