"""Throughput metrics: model FLOPs per token and per step, peak FLOP/s, MFU.

Model FLOPs follow the PaLM convention (Chowdhery et al. 2022, appendix B):

    GPT:  flops_per_token = 6 N + 12 L D T
    MLP:  flops_per_token = 6 N          (one "token" per sample)
    HF:   flops_per_token = 6 N + 12 L D T  when the config names L and D, else 6 N

    6 N      a multiply-add (2 FLOPs) per weight per token in the forward, and
             twice that in the backward (gradients of activations and of weights).
    12 L D T attention scores Q K^T and the weighted sum A V: 2 T D FLOPs each
             per token and layer in the forward (4 T D), x3 for forward+backward.
             No causal halving, as in PaLM, although causal kernels skip half.
    N        parameters that multiply: all parameters minus pure lookups. For
             the GPT that is everything but the positional embedding; the tied
             token embedding counts once, as the lm head matmul.

Activation-checkpoint recompute is NOT counted: this is model FLOPs
utilization (MFU), not hardware FLOPs utilization (HFU). Neither is the MI
term (sketches and estimators): it is overhead on top of the model's work,
which is what MFU measures.

    flops_per_step = flops_per_token * tokens_per_step
    tokens_per_step = micro-batch x grad_accum x world x tokens per sample
                      (seq_len for an LM, 1 for classification)
    mfu = flops_per_step / step_time_s / (peak_flops_per_s per rank * world)

Peak FLOP/s per rank: on CUDA, the vendor's dense datasheet number for the GPU
(table below); on CPU, a measured square-matmul rate, cached per CPU model,
dtype and thread count in $MI_SCALE_CACHE_DIR/peak_flops.json (default
~/.cache/mi-scale/). `mi-scale bench peak` fills the cache; a run that finds no
entry measures for about 2 s at start-up and caches it. MI_SCALE_PEAK_FLOPS
(FLOP/s per rank) overrides both, for hardware the table does not know.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from mi_scale.train.memory import param_numel as _numel

CACHE_FILE = "peak_flops.json"


# -- model FLOPs -------------------------------------------------------------------


def transformer_flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int) -> int:
    """6 N + 12 L D T (see the module docstring)."""
    return 6 * n_params + 12 * n_layer * d_model * seq_len


def matmul_params(model: nn.Module) -> int:
    """Parameters that multiply (lookups excluded), tied tensors counted once."""
    n = sum(_numel(p) for p in model.parameters())  # parameters() yields a tied tensor once
    pos = getattr(model, "pos_emb", None)
    if isinstance(pos, nn.Embedding):  # our GPT: positions are a lookup
        return n - _numel(pos.weight)
    hf = getattr(model, "hf_model", None)
    if hf is not None:  # transformers: every embedding that is not also the lm head is a lookup
        out = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        head = out.weight if out is not None else None
        n -= sum(_numel(m.weight) for m in model.modules()
                 if isinstance(m, nn.Embedding) and m.weight is not head)
    return n


def model_flops_per_token(model: nn.Module, seq_len: Optional[int] = None) -> int:
    """Training FLOPs (forward + backward) per token for our GPT, DeepMLP or an
    HFCausalLM. seq_len: tokens per sequence actually trained on (default:
    the GPT's cfg.seq_len; an hf model needs it for the attention term)."""
    n = matmul_params(model)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "n_layer"):  # our GPT
        return transformer_flops_per_token(n, cfg.n_layer, cfg.d_model, seq_len or cfg.seq_len)
    hf_cfg = getattr(model, "config", None)
    layers, width = getattr(hf_cfg, "num_hidden_layers", None), getattr(hf_cfg, "hidden_size", None)
    if hf_cfg is not None and layers and width and seq_len:
        return transformer_flops_per_token(n, layers, width, seq_len)
    return 6 * n  # MLP (and anything without attention shapes we can read)


def flops_per_step(flops_per_token: int, micro_batch: int, grad_accum: int, world: int,
                   tokens_per_sample: int) -> int:
    return flops_per_token * micro_batch * grad_accum * world * tokens_per_sample


def mfu(flops_per_step: float, step_time_s: float, peak_per_rank: float, world_size: int) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the world's peak."""
    return flops_per_step / step_time_s / (peak_per_rank * world_size)


# -- peak FLOP/s: GPUs --------------------------------------------------------------

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets
# and architecture whitepapers: (name pattern, bf16, tf32, fp32 non-tensor).
# First match wins, so specific names come before their family.
GPU_PEAK_TFLOPS: list[tuple[str, float, float, float]] = [
    (r"\bGH200\b", 989.4, 494.7, 66.9),        # GH200 Grace Hopper: H100/H200 SXM compute
    (r"\bH200 NVL\b", 835.5, 417.5, 60.0),     # H200 NVL datasheet
    (r"\bH200\b", 989.4, 494.7, 66.9),         # H200 SXM datasheet
    (r"\bH100 NVL\b", 835.5, 417.5, 60.0),     # H100 NVL datasheet
    (r"\bH100 PCIe\b", 756.5, 378.0, 51.2),    # H100 PCIe datasheet
    (r"\bH100\b", 989.4, 494.7, 66.9),         # H100 SXM5 ("H100 80GB HBM3") datasheet
    (r"\bA100\b", 312.0, 156.0, 19.5),         # A100 datasheet (SXM and PCIe alike)
    (r"\bL40S\b", 362.1, 183.0, 91.6),         # L40S datasheet
    (r"\bL4\b", 121.0, 60.0, 30.3),            # L4 datasheet (242 / 120 are with sparsity)
    (r"\bA10\b", 125.0, 62.5, 31.2),           # A10 datasheet; not A10G (no public datasheet)
    (r"\bRTX A6000\b", 154.8, 77.4, 38.7),     # RTX A6000 datasheet
    (r"\bRTX 4090\b", 165.2, 82.6, 82.6),      # Ada whitepaper, bf16 with fp32 accumulate
    (r"\bRTX 3090\b", 71.0, 35.6, 35.6),       # Ampere GA102 whitepaper, fp32 accumulate
    (r"\bV100\b", 15.7, 15.7, 15.7),           # V100 SXM2: no bf16/tf32 tensor cores, so fp32 rate
]


def gpu_peak_flops_per_s(name: str, dtype: torch.dtype, tf32: bool = False) -> Optional[float]:
    """Datasheet dense peak of the GPU called `name` (torch.cuda.get_device_name),
    or None for a GPU not in the table. fp32 matmuls run at the tf32 rate when
    torch allows tf32."""
    for pattern, bf16, tf32_peak, fp32 in GPU_PEAK_TFLOPS:
        if re.search(pattern, name):
            if dtype in (torch.bfloat16, torch.float16):
                return bf16 * 1e12
            return (tf32_peak if tf32 else fp32) * 1e12
    return None


# -- peak FLOP/s: CPUs (measured, cached) ---------------------------------------------


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cache_path() -> Path:
    base = os.environ.get("MI_SCALE_CACHE_DIR") or Path.home() / ".cache" / "mi-scale"
    return Path(base) / CACHE_FILE


def _cache_key(dtype: torch.dtype, threads: int) -> str:
    return f"{cpu_model_name()} | {str(dtype).removeprefix('torch.')} | {threads} threads"


def read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def write_cache_entry(dtype: torch.dtype, threads: int, flops_per_s: float) -> None:
    entries = read_cache()
    entries[_cache_key(dtype, threads)] = flops_per_s
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # atomic: concurrent readers see old or new
    tmp.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def measure_matmul_flops(dtype: torch.dtype = torch.float32, threads: Optional[int] = None,
                         seconds: float = 2.0, n: int = 1024, device: str = "cpu") -> float:
    """Best rate of repeated n x n matmuls (2 n^3 FLOPs each) over ~`seconds`.

    a @ b.T is nn.Linear's layout (weight stored out x in). On CPUs without
    native bf16 matmul it is also the fast bf16 path: on a 2-core AVX2 EPYC,
    1024^2 bf16 a @ b ran at 0.8 GFLOP/s and a @ b.T at ~8."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=device).to(dtype)
        b = torch.randn(n, n, generator=g, device=device).to(dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        a @ b.T  # warm-up: kernel selection, page faults
        sync()
        best, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            for _ in range(4):  # several per timing, so timer noise is small
                a @ b.T
            sync()
            best = min(best, (time.perf_counter() - t0) / 4)
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(old_threads)


def cpu_peak_flops_per_s(dtype: torch.dtype, threads: int, measure_if_missing: bool = True) -> Optional[float]:
    """Cached matmul peak for this CPU, dtype and thread count; measured and
    cached when missing (unless measure_if_missing is False)."""
    cached = read_cache().get(_cache_key(dtype, threads))
    if cached is not None or not measure_if_missing:
        return cached
    value = measure_matmul_flops(dtype, threads)
    write_cache_entry(dtype, threads, value)
    return value


def peak_flops_per_s(device: torch.device, dtype: torch.dtype, threads: Optional[int] = None) -> Optional[float]:
    """Peak FLOP/s of one rank on `device` for `dtype` matmuls; None when unknown."""
    override = os.environ.get("MI_SCALE_PEAK_FLOPS")
    if override:
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return gpu_peak_flops_per_s(torch.cuda.get_device_name(device), dtype, tf32)
    return cpu_peak_flops_per_s(dtype, threads or torch.get_num_threads())


def agreed_peak_flops_per_s(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """peak_flops_per_s looked up (or measured) on rank 0 while the other ranks
    wait, then broadcast so every rank uses the same number."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return peak_flops_per_s(device, dtype)
    value = peak_flops_per_s(device, dtype) if dist.get_rank() == 0 else None
    t = torch.tensor([value or 0.0], dtype=torch.float64, device=device)  # 0 = unknown
    dist.broadcast(t, src=0)
    return t.item() or None
