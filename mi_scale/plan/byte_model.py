"""The byte model: what one rank holds in each phase, per part (the table
README's "Memory planning" quotes).

The DeepSpeed JSON comes from `train/engine.py::deepspeed_config`, so the plan
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
    data       LM: the epoch's sample order (4 B per sample) and one batch of
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

import math

from mi_scale.config import Config
from mi_scale.plan.facts import ModelFacts
from mi_scale.plan.target import Target
from mi_scale.plan.units import GiB, MiB, fmt_bytes

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
# to 2-rank runs here (gpt-1m/5m/125m, ZeRO-2/3; see measure.VALIDATION): 520 MiB.
RUNTIME_CPU = 520 * MiB
# A GPU rank's host memory for the same with the CUDA libraries loaded, and the
# device memory of the CUDA context + cuBLAS workspace (which
# torch.cuda.max_memory_allocated does not count). NOT measured here (no GPU was
# lent to this work): typical values for torch 2.x / CUDA 12-13 on an H100.
RUNTIME_GPU_HOST = 2 * GiB
CUDA_CONTEXT = 600 * MiB
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
            "data: not prepared yet (`mi-scale prepare CONFIG`), so the sample order's 4 B per "
            "sample is not counted")
    samples = prepared.tokens("train") // (d.seq_len + 1)
    on_disk = sum((prepared.path / f).stat().st_size for f in ("train.bin", "test.bin"))
    return samples * 4 + batch_bytes(d.batch_size, d.seq_len, prepared.dtype.itemsize), (
        f"data: {fmt_bytes(on_disk)} of tokens in {prepared.path}, read through the page cache (shared by "
        f"the node's ranks, reclaimable; not counted above)")


def zero_section(ds_conf: dict) -> dict:
    return ds_conf.get("zero_optimization", {})


def offload_device(zc: dict, key: str) -> str:
    v = zc.get(key)
    return v.get("device", "none") if isinstance(v, dict) else "none"


def rank_memory(cfg: Config, target: Target, m: ModelFacts, ds: dict, p: int):
    """Bytes per rank in each phase, split into the limiting memory (GPU memory
    on GPUs, host memory on CPU) and, on GPUs, host memory."""
    zc = zero_section(ds)
    stage = int(zc.get("stage", 0))
    W = target.world_size
    N = m.params
    part = math.ceil(N / W)
    gpu = target.device == "gpu"
    off_opt, off_par = offload_device(zc, "offload_optimizer"), offload_device(zc, "offload_param")
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
                         f"({fmt_bytes(grads)}) outweigh the activations they replace ({fmt_bytes(act + mi)})")
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
            notes.append(f"optimizer state (fp32 master + Adam, {fmt_bytes(12 * part)} per rank) lives in NVMe "
                         f"files; host memory holds {count} swap buffers of one sub-group")
        if off_par == "nvme":
            par_sw = _zero_offload_conf(zc, "offload_param")
            count = int(par_sw.get("buffer_count", DS_PARAM_SWAP_BUFFERS))
            size = max(int(par_sw.get("buffer_size", DS_PARAM_SWAP_BUFFER_SIZE)), m.largest_param)
            put("host", ALL, "swap_buffers", count * _aligned(size * p))
            notes.append(f"parameter partitions ({fmt_bytes(part * p)} per rank) live in NVMe files; host memory "
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
                         f"{fmt_bytes(4 * N)} of host memory per rank at start-up")
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
