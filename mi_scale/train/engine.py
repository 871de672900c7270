"""The DeepSpeed engine built from the config.

Our defaults: AdamW (torch implementation, no op compilation on CPU), linear
warmup then cosine decay, gradient clipping, ZeRO stage and offload from the
`deepspeed` section, and `deepspeed.extra` merged last so any DeepSpeed key
passes through.
"""

from __future__ import annotations

import copy
import math

import torch

from mi_scale.config import Config


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


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    t, ds = cfg.train, cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    conf = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,  # offload with torch AdamW: no cpu_adam compile
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(conf, ds.extra)


def build_engine(cfg: Config, module: torch.nn.Module, world_size: int):
    """deepspeed.initialize on `module` (model + MI regularizer parts)."""
    import deepspeed

    t = cfg.train
    conf = deepspeed_config(cfg, world_size)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, t.warmup_steps, t.steps, t.min_lr_ratio))

    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=conf,
                                           lr_scheduler=scheduler)
    return engine
