"""A transformers causal LM, built from its config (random init), as a plain module.

`HFCausalLM(hf_model)` registers the Hugging Face model's children as its
own, so module names and state_dict keys are the Hugging Face ones
("transformer.h.0", "model.layers.3", ...) and forward(idx_NT) returns the
logits tensor (N, T, V) instead of a ModelOutput.

transformers is imported only when an hf model is built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.nn as nn

from mi_scale.models.errors import invalid

FIELD = "model.hf_name_or_path"


def load_hf_config(name_or_path: Optional[str]) -> Any:
    """transformers.AutoConfig for a local directory (offline) or a hub name."""
    if not name_or_path:
        raise invalid(FIELD, name_or_path, "model.kind=hf needs a transformers config name or "
                      "a local directory holding config.json")
    try:
        import transformers
    except ImportError:
        raise invalid(FIELD, name_or_path, "model.kind=hf needs the transformers package: "
                      "pip install 'transformers>=4.40'") from None
    try:
        return transformers.AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise invalid(FIELD, name_or_path, "not a loadable transformers config: pass a local "
                      "directory holding config.json, or a hub name with network access "
                      f"({first})") from None


class HFCausalLM(nn.Module):
    """forward(idx_NT) -> logits_NTV for any transformers causal LM."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        own = list(hf_model.named_parameters(recurse=False)) + list(hf_model.named_buffers(recurse=False))
        if own:
            raise ValueError(f"{type(hf_model).__name__} holds tensors on its root module "
                             f"({[n for n, _ in own]}); HFCausalLM cannot adopt it")
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self.__dict__["hf_model"] = hf_model  # not registered: its children are ours
        self.config = hf_model.config

    def forward(self, idx_NT: torch.Tensor) -> torch.Tensor:
        if idx_NT.is_meta:
            # Shape discovery on the meta device: transformers' (5.x) causal-mask
            # code reads tensor values (.item()), which meta tensors lack; a 4-D
            # mask, taken as given, skips it. Real inputs never come here.
            N, T = idx_NT.shape
            mask = torch.zeros(N, 1, T, T, device="meta")
            return self.hf_model(input_ids=idx_NT, attention_mask=mask, use_cache=False).logits
        return self.hf_model(input_ids=idx_NT, use_cache=False).logits

    def train(self, mode: bool = True) -> "HFCausalLM":
        super().train(mode)
        self.hf_model.training = mode
        return self

    @property
    def activation_checkpointing(self) -> bool:
        """Recompute each decoder layer in backward (transformers' own mechanism)."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.modules())

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        m = self.hf_model
        if on and hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5
            m.activation_checkpointing_enable({"use_reentrant": False})
        elif on:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(m, "activation_checkpointing_disable"):
            m.activation_checkpointing_disable()
        else:
            m.gradient_checkpointing_disable()


def build_hf(name_or_path: Optional[str], vocab_size: Optional[int] = None,
             seq_len: Optional[int] = None, device: Optional[str | torch.device] = None) -> HFCausalLM:
    """AutoModelForCausalLM.from_config (random init), checked against the data's
    vocab_size and seq_len. Dropout and every other setting come from the HF config."""
    cfg = load_hf_config(name_or_path)
    import transformers
    model_vocab = getattr(cfg, "vocab_size", None)
    if vocab_size is not None and model_vocab is not None and vocab_size > model_vocab:
        raise invalid(FIELD, name_or_path, f"its vocab_size {model_vocab} is smaller than the "
                      f"tokenizer's {vocab_size}: pick a matching data.tokenizer or model config")
    max_pos = next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings")
                    if isinstance(getattr(cfg, k, None), int)), None)
    if seq_len is not None and max_pos is not None and seq_len > max_pos:
        raise invalid("data.seq_len", seq_len, f"the model {name_or_path!r} takes at most "
                      f"{max_pos} positions: use data.seq_len <= {max_pos}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        hf_model = transformers.AutoModelForCausalLM.from_config(cfg)
    return HFCausalLM(hf_model)


def find_block_list(model: nn.Module) -> str:
    """Name of the decoder-block ModuleList: the one of same-type modules holding
    the most parameters (ties: the first)."""
    best, best_n = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_n = name, n
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to hook: "
                         "set mi.layers to explicit module names")
    return best
