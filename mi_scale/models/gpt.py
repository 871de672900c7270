"""A GPT-style decoder, nanoGPT-sized and nanoGPT-clear.

Pre-LayerNorm blocks, causal self-attention through
F.scaled_dot_product_attention, a GELU MLP, learned positional embeddings and
an lm head tied to the token embedding.

Module names the MI regularizer hooks:
    tok_emb, pos_emb   embeddings
    blocks.i           output = residual stream after block i, shape (N, T, D)
    ln_f, lm_head      final norm and tied output projection

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
    "gpt-1.3b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=24, n_head=16, d_model=2048),
    "gpt-7b": GPTConfig(vocab_size=50304, seq_len=2048, n_layer=32, n_head=32, d_model=4096),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
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
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
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
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tok_emb.weight = self.lm_head.weight  # weight tying
        self.activation_checkpointing = False  # recompute each block in backward when True

        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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
