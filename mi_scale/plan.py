"""`mi-scale plan`: the peak memory of one rank, predicted before anything runs.

    mi-scale plan CONFIG [--set k=v ...] [--nodes N --gpus-per-node G --gpu-memory-gb M]
                         [--host-memory-gb H] [--json] [--measure]

The model is built on the meta device (no memory) for its shapes; the
DeepSpeed JSON comes from `train/engine.py::deepspeed_config`, so the plan
uses the run's own buckets, ZeRO stage, offload and precision. What a rank
holds (N parameters, W data-parallel ranks, p = 2 bytes in bf16 else 4, b =
reduce_bucket_size elements; read off DeepSpeed 0.19's stage_1_and_2.py and
stage3.py, then measured):

    ZeRO-1/2   params N p (flat buffer); fp32 master partition 4N/W (a clone even
               in fp32); Adam m, v 8N/W (created at the first step); gradients:
               stage 1 the full N p, stage 2 a partition N p/W, both filled in
               backward while activations are freed; reduce (ipg) bucket b p.
               Step: a flat copy of the gradient partition N p/W (+ its fp32 copy
               4N/W in bf16) and Adam's denominator 4N/W.
    ZeRO-3     param partition N p/W + parameters below the persistence threshold
               kept whole + gathered ones (at most stage3_max_live_parameters);
               fp32 master partition 4N/W (a copy also in fp32: measured, see
               Z3 note below); gradient partitions N p/W and the ipg bucket b p
               (allocated at start-up); Adam 8N/W; the step works one sub-group
               (sub_group_size elements) at a time.
    offload    'cpu': master, Adam, fp32 gradients and step work move to host
               memory (at ZeRO-3 with offload_params the partitions too);
               'nvme': master and Adam live in files, host memory holds the
               swapper's buffer_count x sub-group x 4 B (params: buffer_count x
               buffer_size x p).
    activations  GPT (pre-LN, 4d GELU MLP, SDPA): ACT_PER_BLOCK x B T d p per block
               (flash/memory-efficient attention keeps no T x T matrix), the
               embeddings, and the head's B T V logits (see HEAD_* below). With
               activation checkpointing: the block inputs, one recomputed block.
    MI term    per hooked layer the sampled tokens (B P d p) and sketches
               (B P k fp32, all-gathered to W B P k), with their gradients.
    data       LM: the epoch's sample order (8 B per sample) and one batch of
               windows (int64, x and y); the token file itself is read through
               the page cache, shared by a node's ranks and reclaimable, so it
               is a note, not a line. Classification: the arrays in memory.
    runtime    on CPU: python + torch + deepspeed + data + process group
               (host memory on a GPU node, never device memory).

The peak is the largest of three moments: start-up (model built, flattened),
forward/backward (activations at their largest) and the optimizer step.

Validated against the peak RSS of real 2-rank runs on this CPU (README "Memory
planning", `python -m mi_scale.plan`). That relies on the worker fixing glibc's
mmap threshold at 1 MiB (train/memory.py::return_freed_memory_to_os, called by
train/dist_env.py): with glibc's default, *dynamic* threshold, freed tensors
below 32 MiB stay in the heap and a CPU rank's RSS drifted +37% (ZeRO-2) to
+53% (ZeRO-3, still growing each step) above the same plan on gpt-125m.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mi_scale import config as config_mod
from mi_scale.config import Config, ConfigError
from mi_scale.errors import UserError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# -- calibrated constants -------------------------------------------------------
# Activation bytes of one GPT block, in units of B*T*d*p, alive at the end of
# the forward: autograd saves 17 tensors of that size per block (ln inputs, qkv,
# attention out, MLP 4d in/out), of which attention shares some. Measured
# 16.1-16.5 on this CPU (fp32; gpt-1m, gpt-5m, gpt-125m; B 8-32, T 64-1024;
# single process and 2-rank DeepSpeed runs); no T^2 term (SDPA).
ACT_PER_BLOCK = 16
# token + position embedding outputs (and their sum)
ACT_EMBEDDING = 2
# With activation checkpointing: what stays per block (its input) in units of
# B*T*d*p; during backward one block is recomputed (ACT_PER_BLOCK). Activations
# alone measured within -12%..+14% (single process, same three models); whole
# 2-rank runs +1.8% (gpt-5m) and -0.5% (gpt-125m ZeRO-3).
ACT_CHECKPOINT_PER_BLOCK = 1
# Head: logits B*T*V*p, their fp32 copy for the loss, log-softmax (fp32) and
# two fp32 gradients at the backward's start: 12 + p bytes per logit. Measured
# 4.0 fp32 copies (16 B) at vocab 16k-32k on this CPU.
HEAD_FP32_BYTES = 12
# A DeepMLP layer: linear out, activation out, norm/residual (values per unit).
MLP_ACT_PER_LAYER = 4
# The CPU rank's own footprint: python + torch + deepspeed + datasets imported
# (340 MiB), data, gloo process group, engine and first-step workspaces. Fitted
# to 2-rank runs here (gpt-1m/5m/125m, ZeRO-2/3; see VALIDATION): 520 MiB.
RUNTIME_CPU = 520 * MiB
# A GPU rank's host memory for the same with the CUDA libraries loaded, and the
# device memory of the CUDA context + cuBLAS workspace (which
# torch.cuda.max_memory_allocated does not count). NOT measured here (no GPU was
# lent to this work): typical values for torch 2.x / CUDA 12-13 on an H100.
RUNTIME_GPU_HOST = 2 * GiB
CUDA_CONTEXT = 600 * MiB
# Assumed when planning for GPUs without --gpu-memory-gb on a machine without one.
DEFAULT_GPU_MEMORY_GB = 80
# DeepSpeed's defaults when the JSON leaves a key out (deepspeed/runtime/zero/config.py,
# offload_config.py, swap_tensor/constants.py).
DS_REDUCE_BUCKET = 500_000_000
DS_MAX_LIVE = 1_000_000_000
DS_SUB_GROUP = 1_000_000_000
DS_PERSISTENCE = 100_000
DS_OPT_SWAP_BUFFERS = 4
DS_PARAM_SWAP_BUFFERS = 5
DS_PARAM_SWAP_BUFFER_SIZE = 100_000_000
AIO_ALIGN = 1 * MiB  # swap buffers are rounded up to the aio block

KEYS = ("params", "gradients", "optimizer_state", "optimizer_step", "activations", "mi_sketches",
        "comm_buffers", "swap_buffers", "runtime", "cuda_context", "data")
PHASES = ("init", "forward_backward", "optimizer_step")
PHASE_NAMES = {"init": "start-up", "forward_backward": "forward/backward", "optimizer_step": "optimizer step"}


# -- where it runs ----------------------------------------------------------------

@dataclass
class Target:
    device: str  # "cpu" | "gpu"
    nodes: int
    ranks_per_node: int
    world_size: int
    gpu_memory: Optional[int]  # bytes per GPU
    host_memory: int  # bytes per node
    notes: list = field(default_factory=list)

    @property
    def memory_per_rank(self) -> int:
        if self.device == "gpu":
            return int(self.gpu_memory)
        return self.host_memory // self.ranks_per_node

    def describe(self) -> str:
        ranks = f"{self.world_size} {'GPU' if self.device == 'gpu' else 'CPU'} rank{'s' * (self.world_size != 1)}"
        nodes = f"{self.nodes} node{'s' * (self.nodes != 1)}"
        if self.device == "gpu":
            return f"{ranks} ({nodes} x {self.ranks_per_node} GPU{'s' * (self.ranks_per_node != 1)})"
        return f"{ranks} ({nodes}, {self.ranks_per_node} per node)"


def _positive(name: str, value, kind=int):
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0 or (kind is int and int(value) != value):
        raise UserError(f"{name}: invalid value {value!r}: use a positive {'integer' if kind is int else 'number'}")
    return kind(value)


def resolve_target(cfg: Config, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
                   gpu_memory_gb: Optional[float] = None, host_memory_gb: Optional[float] = None) -> Target:
    """The cluster the plan is for: GPUs when --gpus-per-node/--gpu-memory-gb is
    given or cluster.use_gpu is set, else CPU ranks (cluster.num_workers)."""
    import torch

    from mi_scale.train.memory import host_memory_bytes

    nodes = _positive("--nodes", nodes) or 1
    gpus_per_node = _positive("--gpus-per-node", gpus_per_node)
    gpu_memory_gb = _positive("--gpu-memory-gb", gpu_memory_gb, float)
    host_memory_gb = _positive("--host-memory-gb", host_memory_gb, float)
    notes = []
    if host_memory_gb is not None:
        host = int(host_memory_gb * GiB)
    else:
        host = host_memory_bytes()
        notes.append(f"host memory per node: this machine's {_fmt(host)} (--host-memory-gb to change)")
    gpu = gpus_per_node is not None or gpu_memory_gb is not None or cfg.cluster.use_gpu
    if gpu:
        if gpus_per_node is not None:
            world, per_node = nodes * gpus_per_node, gpus_per_node
        else:
            world = cfg.cluster.num_workers
            per_node = math.ceil(world / nodes)
        if gpu_memory_gb is not None:
            gpu_mem = int(gpu_memory_gb * GiB)
        elif torch.cuda.is_available():
            gpu_mem = torch.cuda.get_device_properties(0).total_memory
            notes.append(f"GPU memory: this machine's {_fmt(gpu_mem)} (--gpu-memory-gb to change)")
        else:
            gpu_mem = DEFAULT_GPU_MEMORY_GB * GiB
            notes.append(f"GPU memory: assumed {DEFAULT_GPU_MEMORY_GB} GiB per GPU (--gpu-memory-gb to change)")
        return Target("gpu", nodes, per_node, world, gpu_mem, host, notes)
    world = cfg.cluster.num_workers
    return Target("cpu", nodes, math.ceil(world / nodes), world, None, host, notes)


# -- the model, from shapes alone -------------------------------------------------

@dataclass
class ModelFacts:
    kind: str
    params: int
    largest_param: int
    param_sizes: list  # elements of each distinct parameter tensor
    n_layer: int  # blocks (gpt/hf) or hidden layers (mlp)
    width: int  # d_model or mlp width
    vocab: int  # gpt/hf vocab; mlp: classes
    seq_len: int  # tokens per sample (1 for mlp)
    input_dim: int  # mlp only
    hooked: list  # MI-hooked module names
    hooked_widths: list

    def describe(self) -> str:
        if self.kind == "mlp":
            return f"mlp: {_count(self.params)} parameters, {self.n_layer} layers x width {self.width}"
        return (f"{self.kind}: {_count(self.params)} parameters, {self.n_layer} blocks x d {self.width}, "
                f"vocab {self.vocab}, seq {self.seq_len}")


def data_facts(cfg: Config) -> dict:
    """input_dim/num_classes or vocab_size/seq_len of cfg.data, without loading
    the data where the source tells (mnist1d, digits, text and any LM data with
    the byte tokenizer)."""
    d = cfg.data
    if d.name == "mnist1d":
        return {"input_dim": 40, "num_classes": 10}
    if d.name == "digits":
        return {"input_dim": 64, "num_classes": 10}
    if d.name == "text" or cfg.model.kind in ("gpt", "hf"):
        if d.tokenizer == "byte":
            vocab = 256
        else:
            from mi_scale.data.tokens import load_tokenizer
            vocab = load_tokenizer(d.tokenizer).vocab_size
        return {"vocab_size": vocab, "seq_len": d.seq_len}
    # files/hub feeding an mlp: the features are only known from the data
    from mi_scale.data import build_data
    b = build_data(d, cfg.run.seed)
    return {"input_dim": b.input_dim, "num_classes": b.num_classes, "vocab_size": b.vocab_size,
            "seq_len": b.seq_len}


def model_facts(cfg: Config) -> ModelFacts:
    from mi_scale.mi.regularizer import match_layers
    from mi_scale.models import build_model, default_hook_patterns

    facts = data_facts(cfg)
    model = build_model(cfg.model, input_dim=facts.get("input_dim"), num_classes=facts.get("num_classes"),
                        vocab_size=facts.get("vocab_size"), seq_len=facts.get("seq_len"), device="meta")
    sizes = [p.numel() for p in model.parameters()]
    layers = cfg.mi.layers
    if cfg.model.kind == "hf" and layers == ["blocks.*"]:
        layers = default_hook_patterns(cfg.model, model)
    hooked = match_layers(model, layers)
    modules = dict(model.named_modules())

    def out_width(name: str, default: int) -> int:
        ws = [p.shape[0] for p in modules[name].parameters() if p.dim() >= 1]
        return int(ws[-1]) if ws else default

    if cfg.model.kind == "gpt":
        g = model.cfg
        n_layer, width, vocab, seq = g.n_layer, g.d_model, g.vocab_size, cfg.data.seq_len
    elif cfg.model.kind == "hf":
        c = model.config  # activations: the GPT block constants, an estimate for other blocks
        width = next(getattr(c, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(c, k))
        n_layer = next(getattr(c, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(c, k))
        vocab, seq = c.vocab_size, cfg.data.seq_len
    else:
        n_layer, width, vocab, seq = cfg.model.depth, cfg.model.width, facts["num_classes"], 1
    return ModelFacts(kind=cfg.model.kind, params=sum(sizes), largest_param=max(sizes, default=0),
                      param_sizes=sizes, n_layer=n_layer, width=width, vocab=vocab, seq_len=seq,
                      input_dim=facts.get("input_dim") or 0, hooked=hooked,
                      hooked_widths=[out_width(n, width) for n in hooked])


def precision_bytes(cfg: Config, ds_conf: dict, device: str) -> int:
    """2 for bf16/fp16 training, else 4. precision=auto is bf16 on a GPU target
    (the run decides on its own machine) and fp32 on CPU."""
    if cfg.train.precision == "auto":
        half = device == "gpu"
    else:
        half = cfg.train.precision == "bf16"
    extra = cfg.deepspeed.extra
    for key in ("bf16", "fp16"):
        if isinstance(extra.get(key), dict) and "enabled" in extra[key]:
            half = half or bool(extra[key]["enabled"])
    return 2 if half else 4


def activation_bytes(m: ModelFacts, batch: int, p: int, checkpointing: bool) -> int:
    """Activations of one micro-batch at their largest (end of forward /
    start of backward), for the model kinds we build."""
    if m.kind == "mlp":
        return batch * (m.input_dim + m.n_layer * MLP_ACT_PER_LAYER * m.width + 4 * m.vocab) * p
    btd = batch * m.seq_len * m.width * p
    head = batch * m.seq_len * m.vocab * (HEAD_FP32_BYTES + p)
    if checkpointing:
        blocks = ACT_CHECKPOINT_PER_BLOCK * m.n_layer + ACT_PER_BLOCK
    else:
        blocks = ACT_PER_BLOCK * m.n_layer
    return (blocks + ACT_EMBEDDING) * btd + head


def mi_bytes(cfg: Config, m: ModelFacts, world: int, p: int) -> int:
    """The MI term: sampled tokens (kept for backward), local and all-gathered
    sketches with their gradients, and the random projections (d x k fp32 per width)."""
    k = cfg.mi.sketch_dim
    tokens = cfg.data.batch_size * (min(cfg.mi.tokens_per_sample, m.seq_len) if m.kind != "mlp" else 1)
    per_layer = [tokens * (w * p + 2 * k * 4 * (1 + world)) for w in m.hooked_widths]
    projections = sum(w * k * 4 for w in set(m.hooked_widths))
    return sum(per_layer) + projections


def data_bytes(cfg: Config, m: ModelFacts) -> tuple[int, str]:
    """Host bytes of a rank's data, and a note on the page cache (LM) or None."""
    d = cfg.data
    if m.kind == "mlp":  # classification: x float32 + y int64, train + test, in memory
        n = {"mnist1d": 5000, "digits": 1797}.get(d.name)
        if n is None:
            return 0, f"data: the table {d.path} is held in memory (rows x (features x 4 B + 8 B)); not counted"
        return n * (m.input_dim * 4 + 8), ""
    from mi_scale.data import prepare
    from mi_scale.data.windows import batch_bytes

    prepared = prepare.find_prepared(d) if d.name in ("text", "files", "hub") else None
    if prepared is None:
        return batch_bytes(d.batch_size, d.seq_len, 2), (
            "data: not prepared yet (`mi-scale prepare CONFIG`), so the sample order's 8 B per "
            "sample is not counted")
    samples = prepared.tokens("train") // (d.seq_len + 1)
    on_disk = sum((prepared.path / f).stat().st_size for f in ("train.bin", "test.bin"))
    return samples * 8 + batch_bytes(d.batch_size, d.seq_len, prepared.dtype.itemsize), (
        f"data: {_fmt(on_disk)} of tokens in {prepared.path}, read through the page cache (shared by "
        f"the node's ranks, reclaimable; not counted above)")


# -- the plan ---------------------------------------------------------------------

@dataclass
class Plan:
    config: dict  # what was planned: path, overrides, stage, precision, offload, ...
    model: ModelFacts
    target: Target
    params: int
    world_size: int
    p: int
    phases: dict  # phase -> {key: bytes} on the limiting memory (GPU memory on GPUs)
    host_phases: dict  # GPU only: phase -> {key: bytes} of host memory per rank
    notes: list
    advice: list = field(default_factory=list)

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda ph: sum(self.phases[ph].values()))

    @property
    def breakdown(self) -> dict:
        return dict(self.phases[self.peak_phase])

    @property
    def per_rank_peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def memory_per_rank_bytes(self) -> int:
        return self.target.memory_per_rank

    @property
    def host_per_rank_bytes(self) -> int:
        if self.target.device == "cpu":
            return self.per_rank_peak_bytes
        return max(sum(v.values()) for v in self.host_phases.values())

    @property
    def host_per_node_bytes(self) -> int:
        return self.host_per_rank_bytes * self.target.ranks_per_node

    @property
    def device_fits(self) -> bool:
        return self.per_rank_peak_bytes <= self.memory_per_rank_bytes

    @property
    def host_fits(self) -> bool:
        return self.host_per_node_bytes <= self.target.host_memory

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits

    def to_json(self) -> dict:
        t = self.target
        out = {
            **self.config,
            "model": {"kind": self.model.kind, "params": self.params, "layers": self.model.n_layer,
                      "width": self.model.width, "vocab": self.model.vocab, "seq_len": self.model.seq_len,
                      "hooked_layers": len(self.model.hooked)},
            "params": self.params,
            "world_size": self.world_size,
            "device": t.device,
            "nodes": t.nodes,
            "ranks_per_node": t.ranks_per_node,
            "bytes_per_param_value": self.p,
            "per_rank_peak_bytes": self.per_rank_peak_bytes,
            "peak_phase": self.peak_phase,
            "memory_per_rank_bytes": self.memory_per_rank_bytes,
            "fits": self.fits,
            "breakdown": self.breakdown,
            "phases": {ph: dict(v) for ph, v in self.phases.items()},
            "host": {"per_rank_bytes": self.host_per_rank_bytes, "per_node_bytes": self.host_per_node_bytes,
                     "memory_per_node_bytes": t.host_memory, "fits": self.host_fits},
            "advice": self.advice,
            "notes": self.notes + t.notes,
        }
        if t.device == "gpu":
            out["host"]["breakdown"] = dict(max(self.host_phases.values(), key=lambda v: sum(v.values())))
            out["host"]["phases"] = {ph: dict(v) for ph, v in self.host_phases.items()}
        return out


def _zero(ds_conf: dict) -> dict:
    return ds_conf.get("zero_optimization", {})


def _offload(zc: dict, key: str) -> str:
    v = zc.get(key)
    return v.get("device", "none") if isinstance(v, dict) else "none"


def plan(cfg: Config, nodes: Optional[int] = None, gpus_per_node: Optional[int] = None,
         gpu_memory_gb: Optional[float] = None, host_memory_gb: Optional[float] = None,
         advise: bool = True, *, target: Optional[Target] = None, facts: Optional[ModelFacts] = None,
         meta: Optional[dict] = None) -> Plan:
    """Predict the peak memory of one rank of `cfg` on the target cluster."""
    from mi_scale.train.engine import deepspeed_config
    from mi_scale.train.memory import ModelShape

    target = target or resolve_target(cfg, nodes, gpus_per_node, gpu_memory_gb, host_memory_gb)
    m = facts or model_facts(cfg)
    W = target.world_size
    shape = ModelShape(params=m.params, largest_param=m.largest_param)
    # deepspeed_config sizes buckets from memory_bytes // (ranks on this machine);
    # hand it the target's host memory per rank times the ranks it divides by here.
    import torch
    on_node_here = max(1, min(W, torch.cuda.device_count() or W))
    ds = deepspeed_config(cfg, W, shape, (target.host_memory // target.ranks_per_node) * on_node_here)
    zc = _zero(ds)
    p = precision_bytes(cfg, ds, target.device)
    phases, host_phases, notes = _rank_memory(cfg, target, m, ds, p)
    info = {"zero_stage": int(zc.get("stage", 0)), "precision": "bf16" if p == 2 else "fp32",
            "offload_optimizer": _offload(zc, "offload_optimizer"), "offload_params": _offload(zc, "offload_param"),
            "micro_batch": cfg.data.batch_size, "activation_checkpointing": cfg.train.activation_checkpointing,
            "reduce_bucket_elements": int(zc.get("reduce_bucket_size", DS_REDUCE_BUCKET)), **(meta or {})}
    result = Plan(config=info, model=m, target=target, params=m.params, world_size=W, p=p,
                  phases=phases, host_phases=host_phases, notes=notes)
    if advise and not result.fits:
        result.advice = _advice(cfg, result)
    return result


def _rank_memory(cfg: Config, target: Target, m: ModelFacts, ds: dict, p: int):
    """Bytes per rank in each phase, split into the limiting memory (GPU memory
    on GPUs, host memory on CPU) and, on GPUs, host memory."""
    zc = _zero(ds)
    stage = int(zc.get("stage", 0))
    W = target.world_size
    N = m.params
    part = math.ceil(N / W)
    gpu = target.device == "gpu"
    off_opt, off_par = _offload(zc, "offload_optimizer"), _offload(zc, "offload_param")
    b = int(zc.get("reduce_bucket_size", DS_REDUCE_BUCKET))
    notes: list[str] = []

    dev = {ph: dict.fromkeys(KEYS, 0) for ph in PHASES}  # device (GPU) or host (CPU) memory
    host = {ph: dict.fromkeys(KEYS, 0) for ph in PHASES}  # GPU only: host memory

    def put(where: str, phases, key: str, nbytes: float):
        """where: 'dev' (GPU memory on GPUs, host on CPU), 'host' (host memory,
        also on CPU), 'file' (NVMe: counted nowhere)."""
        if where == "file":
            return
        table = dev if (where == "dev" or not gpu) else host
        for ph in phases:
            table[ph][key] += int(nbytes)

    ALL, FB, STEP = PHASES, ("forward_backward",), ("optimizer_step",)
    RUN = ("forward_backward", "optimizer_step")
    opt_where = {"none": "dev", "cpu": "host", "nvme": "file"}[off_opt]

    act = activation_bytes(m, cfg.data.batch_size, p, cfg.train.activation_checkpointing)
    mi = mi_bytes(cfg, m, W, p)
    data, data_note = data_bytes(cfg, m)
    put("host", ALL, "data", data)
    if data_note:
        notes.append(data_note)

    def backward_peak(grads: int) -> None:
        """Gradients fill while activations drain (measured: the backward's peak
        is the forward's end plus a few %): the larger of the two sets the peak.
        With gradient accumulation they are kept across micro-batches: both."""
        if cfg.train.grad_accum > 1:
            put("dev", FB, "gradients", grads)
            put("dev", FB, "activations", act)
            put("dev", FB, "mi_sketches", mi)
        elif grads > act + mi:
            put("dev", FB, "gradients", grads)
            notes.append("the forward/backward peak is the end of backward: the gradients "
                         f"({_fmt(grads)}) outweigh the activations they replace ({_fmt(act + mi)})")
        else:
            put("dev", FB, "activations", act)
            put("dev", FB, "mi_sketches", mi)

    if stage in (1, 2):
        put("dev", ALL, "params", N * p)  # the flat bit16 buffer; model params are views into it
        put("dev", ("init",), "params", N * p)  # flattening copies the built model once
        put(opt_where, RUN, "optimizer_state", 4 * part + 8 * part)  # fp32 master + Adam m, v
        if off_opt == "cpu":
            put("host", RUN, "gradients", 4 * part)  # pinned fp32 gradient partition
            put("host", RUN, "comm_buffers", part * p)  # bit16 copy-back buffer
            put("host", STEP, "optimizer_step", 4 * part)  # Adam's denominator
            bw_grads = N * p if stage == 1 else 0  # stage 2 copies each bucket to the host
        else:
            put("dev", STEP, "gradients", part * p)  # the averaged partition
            # its flat copy (+ fp32 copy in bf16) and Adam's denominator
            put("dev", STEP, "optimizer_step", part * p + (4 * part if p == 2 else 0) + 4 * part)
            bw_grads = N * p if stage == 1 else part * p
        put("dev", FB, "comm_buffers", b * p)  # ipg reduce bucket
        backward_peak(bw_grads)
    elif stage == 3:
        live = min(N, int(zc.get("stage3_max_live_parameters", DS_MAX_LIVE)))
        threshold = int(zc.get("stage3_param_persistence_threshold", DS_PERSISTENCE))
        persistent = sum(s for s in m.param_sizes if s < threshold)
        sub = min(part, int(zc.get("sub_group_size", DS_SUB_GROUP)))
        par_where = {"none": "dev", "cpu": "host", "nvme": "file"}[off_par]
        put(par_where, ALL, "params", part * p)  # partitions (defragmented into one buffer)
        put("dev", ALL, "params", persistent * p * (W - 1) / W)  # small params, whole on every rank
        put("dev", ("init",), "params", m.largest_param * 4)  # zero.Init: one layer drawn in full
        put("dev", FB, "params", live * p)  # gathered for the layers running now (+ prefetch)
        # fp32 master partition: DeepSpeed 0.19 clones it unless the bit16 partition already is
        # fp32 on the same device (its device check fails on CPU: measured a copy in fp32 too)
        put(opt_where, ALL, "optimizer_state", 4 * part)
        put(opt_where, RUN, "optimizer_state", 8 * part)  # Adam m, v
        grad_where = "host" if off_opt != "none" else "dev"
        put(grad_where, ALL, "gradients", part * p)  # gradient partitions, allocated at start-up
        if off_opt == "cpu":
            put("host", RUN, "gradients", 4 * part)  # fp32 gradient of each sub-group
        put("dev", ALL, "comm_buffers", b * p)  # ipg bucket, allocated at start-up
        put("dev", FB, "comm_buffers", b * p)  # reduce-scatter staging
        step_where = "dev" if off_opt == "none" else "host"
        put(step_where, STEP, "optimizer_step", sub * (4 + 4) + (sub * p if p == 2 else 0))
        put("dev", FB, "activations", act)
        put("dev", FB, "mi_sketches", mi)
        if off_opt == "nvme":
            opt_sw = _zero_offload_conf(zc, "offload_optimizer")
            count = int(opt_sw.get("buffer_count", DS_OPT_SWAP_BUFFERS))
            put("host", RUN, "swap_buffers", count * _aligned(sub * 4))
            notes.append(f"optimizer state (fp32 master + Adam, {_fmt(12 * part)} per rank) lives in NVMe "
                         f"files; host memory holds {count} swap buffers of one sub-group")
        if off_par == "nvme":
            par_sw = _zero_offload_conf(zc, "offload_param")
            count = int(par_sw.get("buffer_count", DS_PARAM_SWAP_BUFFERS))
            size = max(int(par_sw.get("buffer_size", DS_PARAM_SWAP_BUFFER_SIZE)), m.largest_param)
            put("host", ALL, "swap_buffers", count * _aligned(size * p))
            notes.append(f"parameter partitions ({_fmt(part * p)} per rank) live in NVMe files; host memory "
                         f"holds {count} swap buffers of {size:,} elements")
    else:  # stage 0: plain data parallelism
        put("dev", ALL, "params", N * p)
        if p == 2:  # DeepSpeed's BF16_Optimizer: fp32 master and fp32 gradient accumulators
            put("dev", RUN, "optimizer_state", 4 * N)
            put("dev", RUN, "gradients", 4 * N)
        put("dev", RUN, "optimizer_state", 8 * N)
        put("dev", STEP, "gradients", N * p)
        put("dev", STEP, "optimizer_step", 4 * N)
        put("dev", FB, "comm_buffers", min(N, b) * p)
        backward_peak(N * p)

    if gpu:
        for ph in PHASES:
            dev[ph]["cuda_context"] = CUDA_CONTEXT
            host[ph]["runtime"] = RUNTIME_GPU_HOST
        if stage < 3:  # built whole in fp32 on the host, then moved by deepspeed.initialize
            host["init"]["params"] += 4 * N
            notes.append(f"ZeRO-{stage} builds the whole model in fp32 on the host first: "
                         f"{_fmt(4 * N)} of host memory per rank at start-up")
    else:
        for ph in PHASES:
            dev[ph]["runtime"] = RUNTIME_CPU
        if off_opt == "cpu" or off_par == "cpu":
            notes.append("offload to 'cpu' moves nothing on a CPU rank: it is all host memory already")
    if off_opt == "nvme" or off_par == "nvme":
        notes.append("NVMe offload needs DeepSpeed's async I/O op (libaio) on every node")
    strip = lambda t: {ph: {k: v for k, v in t[ph].items() if v or k in KEYS[:7]} for ph in PHASES}  # noqa: E731
    return strip(dev), (strip(host) if gpu else {}), notes


def _zero_offload_conf(zc: dict, key: str) -> dict:
    v = zc.get(key)
    return v if isinstance(v, dict) else {}


def _aligned(nbytes: int) -> int:
    return math.ceil(nbytes / AIO_ALIGN) * AIO_ALIGN


# -- advice -----------------------------------------------------------------------

def _with(cfg: Config, overrides: list[str]) -> Config:
    return config_mod.from_dict(config_mod.apply_overrides(copy.deepcopy(cfg.to_dict()), overrides))


def _advice(cfg: Config, base: Plan) -> list[dict]:
    """What to change, in order, until the run fits: ZeRO-3, optimizer offload,
    activation checkpointing, parameter offload, a smaller micro-batch, more
    GPUs / nodes. The changes are applied one on top of the other and each
    step is re-planned; a change that turns out unnecessary once the later
    ones are in (ZeRO-3 alone may not help while activations dominate, and
    help a lot with checkpointing) is dropped again."""
    gpu = base.target.device == "gpu"
    ds = cfg.deepspeed
    Change = tuple  # (overrides, text, target or None)

    def evaluate(changes: list) -> Optional[Plan]:
        sets = [o for c in changes for o in c[0]]
        target = next((c[2] for c in reversed(changes) if c[2] is not None), base.target)
        try:
            return plan(_with(cfg, sets), advise=False, target=copy.deepcopy(target), facts=base.model)
        except (ConfigError, UserError):
            return None

    candidates: list[Change] = []
    if ds.zero_stage < 3 and base.world_size > 1:
        two = ds.zero_stage < 2 and (evaluate([(["deepspeed.zero_stage=2"], "", None)]) or base).fits
        s = 2 if two else 3
        candidates.append(([f"deepspeed.zero_stage={s}"], f"use deepspeed.zero_stage={s}", None))
    if gpu and ds.offload_optimizer == "none":
        candidates.append((["deepspeed.offload_optimizer=cpu"], "set deepspeed.offload_optimizer=cpu", None))
    if ds.offload_optimizer != "nvme" and (not gpu or not base.host_fits):
        candidates.append((["deepspeed.offload_optimizer=nvme"],
                           "set deepspeed.offload_optimizer=nvme (needs libaio and a fast local disk)", None))
    if not cfg.train.activation_checkpointing and cfg.model.kind != "mlp":
        candidates.append((["train.activation_checkpointing=true"], "set train.activation_checkpointing=true", None))
    if gpu and ds.offload_params == "none":
        candidates.append((["deepspeed.offload_params=cpu"], "set deepspeed.offload_params=cpu", None))

    chain: list[Change] = []
    current = base
    for cand in candidates:
        new = evaluate(chain + [cand])
        if new is None or _need(new) > _need(current) * 1.02:
            continue
        chain.append(cand)
        current = new
        if current.fits:
            break
    if not current.fits and cfg.data.batch_size > 1:
        b, best = cfg.data.batch_size, None
        while b > 1:
            b //= 2
            trial = evaluate(chain + [([f"data.batch_size={b}"], "", None)])
            if trial is None:
                break
            best = (b, trial)
            if trial.fits:
                break
        if best is not None and _need(best[1]) < _need(current):
            b = best[0]
            accum = cfg.train.grad_accum * math.ceil(cfg.data.batch_size / b)
            chain.append(([f"data.batch_size={b}"],
                          f"lower data.batch_size to {b} (train.grad_accum={accum} keeps the global batch)", None))
            current = best[1]
    if not current.fits and current.config["zero_stage"] >= 1:
        tgt = copy.deepcopy(current.target)
        for _ in range(12):  # up to 4096x the nodes
            tgt.nodes *= 2
            if gpu or tgt.ranks_per_node == 1:
                tgt.world_size = tgt.nodes * tgt.ranks_per_node
            else:
                tgt.ranks_per_node = math.ceil(tgt.world_size / tgt.nodes)
            sets = [f"cluster.num_workers={tgt.world_size}"] if tgt.world_size != base.world_size else []
            trial = evaluate(chain + [(sets, "", copy.deepcopy(tgt))])
            if trial is not None and trial.fits:
                what = (f"use {tgt.world_size} GPUs ({tgt.nodes} nodes x {tgt.ranks_per_node})" if gpu else
                        f"use {tgt.world_size} ranks on {tgt.nodes} nodes ({tgt.ranks_per_node} per node)")
                chain.append((sets, what, copy.deepcopy(tgt)))
                current = trial
                break
    # drop what the later changes made unnecessary
    for cand in list(chain[:-1]):
        rest = [c for c in chain if c is not cand]
        trial = evaluate(rest)
        if trial is not None and (trial.fits if current.fits else _need(trial) <= _need(current) * 1.02):
            chain, current = rest, trial
    steps = []
    for i in range(len(chain)):
        pl = evaluate(chain[: i + 1])
        steps.append({"set": list(chain[i][0]), "change": chain[i][1], "per_rank_peak_bytes": pl.per_rank_peak_bytes,
                      "host_per_node_bytes": pl.host_per_node_bytes, "fits": pl.fits})
    return steps


def _need(p: Plan) -> float:
    """How far over its memory a plan is (the worse of device and host)."""
    return max(p.per_rank_peak_bytes / p.memory_per_rank_bytes, p.host_per_node_bytes / p.target.host_memory)


# -- output -------------------------------------------------------------------------

def _fmt(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, v in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= v:
            return f"{n / v:.2f}{unit}"
    return str(n)


def _table(title: str, phases: dict, peak: str, all_keys: bool = True) -> list[str]:
    keys = [k for k in KEYS if any(phases[ph].get(k, 0) for ph in PHASES) or (all_keys and k in KEYS[:7])]
    heads = [PHASE_NAMES[ph] + (" *" if ph == peak else "") for ph in PHASES]
    lines = [f"  {title:<18}" + "".join(f"{h:>20}" for h in heads)]
    for k in keys:
        lines.append(f"  {k:<18}" + "".join(f"{_fmt(phases[ph].get(k, 0)):>20}" for ph in PHASES))
    lines.append(f"  {'total':<18}" + "".join(f"{_fmt(sum(phases[ph].values())):>20}" for ph in PHASES))
    return lines


def render(pl: Plan) -> str:
    c, t, m = pl.config, pl.target, pl.model
    offload = ", ".join(f"{k} {c[f'offload_{k}']}" for k in ("optimizer", "params") if c[f"offload_{k}"] != "none")
    lines = [
        f"model     {m.describe()}",
        f"run       {t.describe()}, ZeRO-{c['zero_stage']}, {c['precision']}, micro-batch {c['micro_batch']}, "
        f"activation checkpointing {'on' if c['activation_checkpointing'] else 'off'}"
        + (f", offload: {offload}" if offload else ""),
        "",
    ]
    where = "GPU memory" if t.device == "gpu" else "host memory"
    lines += _table(f"per rank, {where}", pl.phases, pl.peak_phase)
    peak, avail = pl.per_rank_peak_bytes, pl.memory_per_rank_bytes
    lines.append("")
    share = f"{100 * peak / avail:.0f}%"
    lines.append(f"peak      {_fmt(peak)} per rank ({PHASE_NAMES[pl.peak_phase]}) of {_fmt(avail)} "
                 f"{'per GPU' if t.device == 'gpu' else f'per rank ({_fmt(t.host_memory)} / {t.ranks_per_node})'}: "
                 f"{'fits' if pl.device_fits else 'does NOT fit'} ({share})")
    if t.device == "gpu":
        hp = max(PHASES, key=lambda ph: sum(pl.host_phases[ph].values()))
        lines.append("")
        lines += _table("per rank, host", pl.host_phases, hp, all_keys=False)
        lines.append(f"host      {t.ranks_per_node} ranks x {_fmt(pl.host_per_rank_bytes)} = "
                     f"{_fmt(pl.host_per_node_bytes)} per node of {_fmt(t.host_memory)}: "
                     f"{'fits' if pl.host_fits else 'does NOT fit'}")
    for n in pl.notes + t.notes:
        lines.append(f"note      {n}")
    if not pl.fits:
        lines.append("")
        if pl.advice:
            lines.append("to fit, in order (each step on top of the ones before, re-planned):")
            for i, a in enumerate(pl.advice, 1):
                verdict = "fits" if a["fits"] else "still too big"
                lines.append(f"  {i}. {a['change']:<62} -> {_fmt(a['per_rank_peak_bytes'])} per rank: {verdict}")
            sets = [s for a in pl.advice for s in a["set"]]
            if sets:
                lines.append("  (--set " + " --set ".join(sets) + ")")
        else:
            lines.append("no change we know of makes it fit: use more memory per rank")
    return "\n".join(lines)


# -- measuring, for validation ----------------------------------------------------

def measure(cfg: Config, timeout: float = 3600, env: Optional[dict] = None, max_steps: int = 4) -> dict:
    """Run `cfg` for real on this machine (cluster.num_workers ranks under
    torchrun, CPU; at most `max_steps` steps and one eval batch: the peak is
    reached by the second step) and return the peak RSS of the largest rank:
    each rank's own ru_maxrss, max over ranks, as the worker logs it on every
    train row (`peak_mem_mb_max_rank`). Read from the ranks themselves, not
    from the process tree, so that no other descendant (a compiler building
    a DeepSpeed op, say) can count. The run writes to a temporary directory,
    wandb disabled."""
    from mi_scale.train.dist_env import free_port

    W = cfg.cluster.num_workers
    with tempfile.TemporaryDirectory(prefix="mi-scale-plan-") as tmp:
        run_cfg = _with(cfg, [f"run.output_dir={tmp}", "tracking.wandb=disabled", "cluster.use_gpu=false",
                              f"train.steps={min(max_steps, cfg.train.steps)}", "train.eval_batches=1"])
        path = Path(tmp) / "config.yaml"
        config_mod.save(run_cfg, path)
        e = {**os.environ, **(env or {})}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        e.setdefault("OMP_NUM_THREADS", "1")
        log = Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W),
               "--master_port", str(free_port()), "-m", "mi_scale.train.worker", str(path)]
        t0 = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=e)
            try:
                while True:
                    pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() - t0 > timeout:
                        raise TimeoutError
                    time.sleep(0.2)
            except BaseException:  # timeout or Ctrl-C: torchrun passes SIGTERM on to its ranks
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise UserError(f"the measured run failed (exit {proc.returncode}): {tail}")
        rows = [json.loads(x) for x in (Path(tmp) / run_cfg.run.name / "metrics.jsonl").read_text().splitlines()]
        peak_mb = max(r["peak_mem_mb_max_rank"] for r in rows if r.get("split") == "train")
    return {"peak_bytes": int(peak_mb * 2**20), "wall_s": wall, "world_size": W}


# The README's validation table: (label, config, overrides); run one at a time.
VALIDATION = [
    ("gpt-1m  ZeRO-2 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-1m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=2"]),
    ("gpt-5m  ZeRO-2 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=2"]),
    ("gpt-5m  ZeRO-3 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=3"]),
    ("gpt-5m  ZeRO-2 B32 T256", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=32", "data.seq_len=256", "deepspeed.zero_stage=2"]),
    ("gpt-125m ZeRO-2 B8 T128", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=8", "data.seq_len=128", "deepspeed.zero_stage=2"]),
    ("gpt-125m ZeRO-3 B4 T128", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=4", "data.seq_len=128", "deepspeed.zero_stage=3",
      "mi.sketch_dim=16"]),
    ("gpt-5m  ZeRO-2 B32 T256 ckpt", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=32", "data.seq_len=256", "deepspeed.zero_stage=2",
      "train.activation_checkpointing=true"]),
    ("gpt-125m ZeRO-3 B8 T128 ckpt", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=8", "data.seq_len=128", "deepspeed.zero_stage=3",
      "train.activation_checkpointing=true"]),
]
VALIDATION_COMMON = ["train.steps=4", "train.eval_batches=1", "train.log_every=1", "tracking.wandb=disabled"]


def validate(cases=None, repo: Optional[Path] = None, env: Optional[dict] = None, out=sys.stdout) -> list[dict]:
    """Predicted vs measured for each case, one run at a time, as a markdown table."""
    repo = repo or Path(__file__).resolve().parents[1]
    rows = []
    print("| run | params | predicted | measured | error |", file=out)
    print("|---|---|---|---|---|", file=out)
    for label, path, overrides in cases or VALIDATION:
        cfg = config_mod.load(repo / path, overrides + VALIDATION_COMMON)
        pl = plan(cfg, advise=False)
        got = measure(cfg, env=env)
        err = pl.per_rank_peak_bytes / got["peak_bytes"] - 1
        rows.append({"run": label, "params": pl.params, "predicted_bytes": pl.per_rank_peak_bytes,
                     "measured_bytes": got["peak_bytes"], "error": err})
        print(f"| {label} | {_count(pl.params)} | {_fmt(pl.per_rank_peak_bytes)} | {_fmt(got['peak_bytes'])} "
              f"| {100 * err:+.1f}% |", file=out, flush=True)
    return rows


# -- command line ----------------------------------------------------------------

def run_cli(args) -> int:
    """`mi-scale plan` (cli.py parses; this prints). Exit 0 whether or not it fits."""
    cfg = config_mod.load(args.config, args.overrides)
    meta = {"config_path": args.config, "overrides": list(args.overrides)}
    pl = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
              host_memory_gb=args.host_memory_gb, meta=meta)
    measured = None
    if args.measure:
        if pl.target.device != "cpu":
            raise UserError("--measure: runs the config on this machine's CPU ranks; drop --gpus-per-node/"
                            "--gpu-memory-gb and set cluster.use_gpu=false")
        measured = measure(cfg)
    if args.json:
        out = pl.to_json()
        if measured is not None:
            out["measured_peak_bytes"] = measured["peak_bytes"]
            out["measured_error"] = pl.per_rank_peak_bytes / measured["peak_bytes"] - 1
        print(json.dumps(out))
        return 0
    print(render(pl))
    if measured is not None:
        err = pl.per_rank_peak_bytes / measured["peak_bytes"] - 1
        print(f"measured  {_fmt(measured['peak_bytes'])} peak RSS of the largest of {measured['world_size']} "
              f"ranks ({measured['wall_s']:.0f} s run): plan {100 * err:+.1f}%")
    return 0


if __name__ == "__main__":  # python -m mi_scale.plan: the README's validation table
    validate()
