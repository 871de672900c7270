"""The DeepSpeed engine built from the config.

Our defaults: AdamW (torch implementation, no op compilation on CPU), linear
warmup then cosine decay, gradient clipping, ZeRO stage and offload from the
`deepspeed` section, buffers sized from the model (train/memory.py), and
`deepspeed.extra` merged last so any DeepSpeed key passes through.

At ZeRO-3 the model is built inside `partitioned_init(...)`
(deepspeed.zero.Init): each layer is sharded as soon as it exists, so no
rank ever holds the whole model (hf models: only with model.init_from).
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import torch

from mi_scale.config import Config
from mi_scale.errors import UserError
from mi_scale.train.memory import ModelShape, host_memory_bytes, zero_settings


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolved_precision(requested: str) -> str:
    """`auto` is bf16 on a GPU with bf16 support and fp32 elsewhere."""
    if requested != "auto":
        return requested
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _offload(device: str, cfg: Config) -> dict:
    if device == "nvme":
        return {"device": "nvme", "nvme_path": str(nvme_path(cfg)), "pin_memory": False, "buffer_count": 4}
    return {"device": "cpu", "pin_memory": torch.cuda.is_available()}


def nvme_path(cfg: Config) -> Path:
    return Path(cfg.deepspeed.nvme_path) if cfg.deepspeed.nvme_path else cfg.run_dir() / "offload"


def check_nvme_offload(cfg: Config) -> None:
    """NVMe offload needs DeepSpeed's async I/O op, which needs libaio."""
    ds = cfg.deepspeed
    if "nvme" not in (ds.offload_optimizer, ds.offload_params):
        return
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        field = "deepspeed.offload_optimizer" if ds.offload_optimizer == "nvme" else "deepspeed.offload_params"
        raise UserError(f"{field}: invalid value 'nvme': DeepSpeed's async I/O op needs libaio, which is not "
                        f"installed; install it (apt-get install libaio-dev; `make setup` does as root) or "
                        f"offload to 'cpu'")
    warn_if_stale_build_lock(AsyncIOBuilder().name)


def warn_if_stale_build_lock(op_name: str, stale_after_s: float = 900) -> None:
    """torch's JIT build waits, silently and forever, while its build dir holds
    a `lock` file; a build killed midway leaves one behind. A build takes a few
    minutes here, so a lock older than stale_after_s is almost surely stale."""
    import time

    from torch.utils import cpp_extension

    from mi_scale import console

    lock = Path(cpp_extension._get_build_directory(op_name, False)) / "lock"  # torch's own path rule
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > stale_after_s:
        console.say(f"[mi-scale] warning: {lock} is {age / 60:.0f} min old and DeepSpeed's {op_name} op build "
                    f"waits on it; if no build is running, a build killed midway left it: delete it")


def deepspeed_config(cfg: Config, world_size: int, shape: ModelShape | None = None,
                     memory_bytes: int | None = None) -> dict:
    """The DeepSpeed JSON. `shape` sizes the buffers (DeepSpeed's GPU defaults
    when None); `memory_bytes` is what all ranks of this node share (default:
    this machine's memory)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if shape is not None:
        on_node = max(1, min(world_size, torch.cuda.device_count() or world_size))
        rank_memory = (memory_bytes or host_memory_bytes()) // on_node
        zero.update(zero_settings(shape, ds.zero_stage, rank_memory, ds.bucket_elements))
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, cfg)
    if ds.offload_params != "none":
        zero["offload_param"] = _offload(ds.offload_params, cfg)
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW: no cpu_adam compile
        "bf16": {"enabled": resolved_precision(t.precision) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if "nvme" in (ds.offload_optimizer, ds.offload_params):
        # one I/O thread per rank: this is a 2-core class of machine; raise on real NVMe hosts
        conf["aio"] = {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1,
                       "single_submit": False, "overlap_events": True}
    return _merge(conf, ds.extra)


def partitioned_init(cfg: Config, ds_conf: dict):
    """Context to build the model in: deepspeed.zero.Init at ZeRO-3 (each
    layer sharded as soon as it is constructed), else nothing."""
    # An hf model from its config alone is built whole (transformers' own
    # init is a pass over the built model) and sharded by deepspeed.initialize.
    # With model.init_from every tensor is overwritten, so it is built
    # partitioned: transformers' init then runs on empty partitions, a no-op.
    if cfg.deepspeed.zero_stage != 3 or (cfg.model.kind == "hf" and not cfg.model.init_from):
        return contextlib.nullcontext()
    import deepspeed

    remote = cfg.deepspeed.offload_params if cfg.deepspeed.offload_params != "none" else None
    return deepspeed.zero.Init(config_dict_or_path=ds_conf, remote_device=remote)


def build_engine(cfg: Config, module: torch.nn.Module, conf: dict):
    """deepspeed.initialize on `module` (model + MI regularizer parts) with
    the JSON from `deepspeed_config`."""
    import deepspeed

    t = cfg.train

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=conf,
                                           lr_scheduler=scheduler)
    return engine
