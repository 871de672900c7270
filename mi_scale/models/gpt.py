"""A GPT-style decoder, nanoGPT-sized and nanoGPT-clear.

Pre-LayerNorm blocks, causal self-attention through
F.scaled_dot_product_attention, a GELU MLP, learned positional embeddings and
an lm head tied to the token embedding.

Module names the MI regularizer hooks:
    tok_emb, pos_emb   embeddings
    blocks.i           output = residual stream after block i, shape (N, T, D)
    ln_f               final norm; `lm_head(x)` is the tied output projection

Every layer initializes itself in its constructor (GPT-2 init: N(0, 0.02),
residual projections N(0, 0.02 / sqrt(2 n_layer)), zero biases). No pass over
the finished model is needed, so the model can be built under DeepSpeed's
partitioned initialization (`deepspeed.zero.Init`): each layer is drawn in
full, sharded, and freed before the next one exists, and no rank ever holds
the whole model. The seeded weights are the same with or without it.

Shape legend: N batch, T time (tokens), D model width, H heads,
C head width (D / H), V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mi_scale.models.errors import invalid, unknown_choice


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0


# Small presets are for tests and CPU runs: their vocab and seq_len are
# defaults that the data overrides. The large ones follow GPT-2 / GPT-3 shapes.
PRESETS: dict[str, GPTConfig] = {
    "gpt-1m": GPTConfig(vocab_size=256, seq_len=256, n_layer=4, n_head=4, d_model=128),
    "gpt-5m": GPTConfig(vocab_size=256, seq_len=256, n_layer=6, n_head=8, d_model=256),
    "gpt-125m": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=12, n_head=12, d_model=768),
    "gpt-350m": GPTConfig(vocab_size=50304, seq_len=1024, n_layer=24, n_head=16, d_model=1024),
    # 20 x 12 d^2 = 1.007B in the blocks alone: >= 1.0B with any vocabulary
    "gpt-1b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=20, n_head=16, d_model=2048),
    "gpt-1.3b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=24, n_head=16, d_model=2048),
    "gpt-7b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=32, n_head=32, d_model=4096),
}


INIT_STD = 0.02


def residual_std(cfg: GPTConfig) -> float:
    """GPT-2: projections into the residual stream shrink with depth."""
    return INIT_STD / math.sqrt(2 * cfg.n_layer)


class Linear(nn.Linear):
    """nn.Linear drawn N(0, std) with a zero bias in its own constructor."""

    def __init__(self, d_in: int, d_out: int, std: float = INIT_STD, bias: bool = True):
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(d_in, d_out, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding drawn N(0, 0.02) in its own constructor."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = Linear(cfg.d_model, cfg.d_model, std=residual_std(cfg))
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        N, T, D = x_NTD.shape
        H, C = self.n_head, D // self.n_head
        q_NTD, k_NTD, v_NTD = self.qkv(x_NTD).split(D, dim=2)
        q_NHTC = q_NTD.view(N, T, H, C).transpose(1, 2)
        k_NHTC = k_NTD.view(N, T, H, C).transpose(1, 2)
        v_NHTC = v_NTD.view(N, T, H, C).transpose(1, 2)
        y_NHTC = F.scaled_dot_product_attention(
            q_NHTC, k_NHTC, v_NHTC, is_causal=True,
            dropout_p=self.dropout if self.training else 0.0)
        y_NTD = y_NHTC.transpose(1, 2).contiguous().view(N, T, D)
        return self.resid_drop(self.proj(y_NTD))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = Linear(4 * cfg.d_model, cfg.d_model, std=residual_std(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x_NTD))))


class Block(nn.Module):
    """Pre-LN transformer block; its output is the residual stream."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x_NTD: torch.Tensor) -> torch.Tensor:
        x_NTD = x_NTD + self.attn(self.ln_1(x_NTD))
        return x_NTD + self.mlp(self.ln_2(x_NTD))


class GPT(nn.Module):
    """forward(idx_NT) -> logits_NTV."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = Embedding(cfg.vocab_size, cfg.d_model)  # also the lm head (tied)
        self.pos_emb = Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.activation_checkpointing = False  # recompute each block in backward when True
        if hasattr(self.tok_emb.weight, "ds_id"):
            # Built partitioned (ZeRO-3): forward reads the embedding outside
            # tok_emb's own forward (the tied head), so DeepSpeed must gather it
            # for this module too.
            import deepspeed
            deepspeed.zero.register_external_parameter(self, self.tok_emb.weight)

    def lm_head(self, x_NTD: torch.Tensor) -> torch.Tensor:
        """The output projection, tied to the token embedding."""
        return F.linear(x_NTD, self.tok_emb.weight)

    def forward(self, idx_NT: torch.Tensor) -> torch.Tensor:
        N, T = idx_NT.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's seq_len {self.cfg.seq_len}")
        pos_T = torch.arange(T, device=idx_NT.device)
        x_NTD = self.drop(self.tok_emb(idx_NT) + self.pos_emb(pos_T))
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x_NTD = checkpoint(block, x_NTD, use_reentrant=False) if ckpt else block(x_NTD)
        return self.lm_head(self.ln_f(x_NTD))


def build_gpt(preset: str, vocab_size: Optional[int] = None, seq_len: Optional[int] = None,
              dropout: float = 0.0, device: Optional[str | torch.device] = None) -> GPT:
    """A GPT from a preset; vocab_size / seq_len, when given, replace the preset's.

    device="meta" builds the shapes without allocating memory (for counting parameters).
    """
    if preset not in PRESETS:
        raise unknown_choice("model.preset", preset, PRESETS)
    changes = {"dropout": dropout}
    if vocab_size is not None:
        changes["vocab_size"] = vocab_size
    if seq_len is not None:
        changes["seq_len"] = seq_len
    cfg = dataclasses.replace(PRESETS[preset], **changes)
    if cfg.vocab_size < 1:
        raise invalid("data.tokenizer", cfg.vocab_size, "the tokenizer must have a vocab_size >= 1")
    if cfg.seq_len < 1:
        raise invalid("data.seq_len", cfg.seq_len, "use seq_len >= 1")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return GPT(cfg)
