"""Models the MI regularizer hooks by module name.

    model = build_model(cfg.model, input_dim=40, num_classes=10)       # kind=mlp
    model = build_model(cfg.model, vocab_size=256, seq_len=64)         # kind=gpt | hf
    layers = default_hook_patterns(cfg.model)                          # ["blocks.*"]

Every model is a plain nn.Module whose forward returns a logits tensor and
which has a settable `activation_checkpointing` flag.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn as nn

from mi_scale.models.errors import ModelError, invalid, unknown_choice
from mi_scale.models.gpt import GPT, PRESETS, GPTConfig, build_gpt
from mi_scale.models.hf import HFCausalLM, build_hf, find_block_list
from mi_scale.models.mlp import DeepMLP

KINDS = ("mlp", "gpt", "hf")

__all__ = ["ModelError", "DeepMLP", "GPT", "GPTConfig", "PRESETS", "HFCausalLM", "build_gpt",
           "build_hf", "build_model", "default_hook_patterns", "count_params"]


def build_model(model_cfg: Any, *, input_dim: Optional[int] = None,
                num_classes: Optional[int] = None, vocab_size: Optional[int] = None,
                seq_len: Optional[int] = None,
                device: Optional[str | torch.device] = None) -> nn.Module:
    """The model `model_cfg` (a config.ModelConfig) names, sized by the data:
    mlp needs input_dim and num_classes; gpt and hf take vocab_size and seq_len."""
    kind = model_cfg.kind
    if kind == "mlp":
        if input_dim is None or num_classes is None:
            raise invalid("model.kind", kind, "an mlp needs classification data with input_dim "
                          "and num_classes (data.name=mnist1d or digits)")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return DeepMLP(input_dim, num_classes, depth=model_cfg.depth, width=model_cfg.width,
                           activation=model_cfg.activation, residual=model_cfg.residual,
                           norm=model_cfg.norm, dropout=model_cfg.dropout)
    if kind == "gpt":
        return build_gpt(model_cfg.preset, vocab_size=vocab_size, seq_len=seq_len,
                         dropout=model_cfg.dropout, device=device)
    if kind == "hf":
        return build_hf(model_cfg.hf_name_or_path, vocab_size=vocab_size, seq_len=seq_len,
                        device=device)
    raise unknown_choice("model.kind", kind, KINDS)


def default_hook_patterns(model_cfg: Any, model: Optional[nn.Module] = None) -> list[str]:
    """Module-name globs of the layers whose outputs the MI term compares.

    mlp and gpt: ["blocks.*"]. hf: the decoder-block list of `model`, or of the
    model built on the meta device (no memory) when `model` is not given.
    """
    if model_cfg.kind in ("mlp", "gpt"):
        return ["blocks.*"]
    if model_cfg.kind == "hf":
        if model is None:
            model = build_hf(model_cfg.hf_name_or_path, device="meta")
        return [find_block_list(model) + ".*"]
    raise unknown_choice("model.kind", model_cfg.kind, KINDS)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
