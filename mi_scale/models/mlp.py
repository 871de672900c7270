"""A deep MLP: the "hard to train" testbed and its easy (residual, normed) variants.

A plain deep tanh/relu stack with PyTorch's default init and no residual or
norm trains poorly as depth grows; that is the point, so nothing here makes it
easier behind the user's back.

Module names the MI regularizer hooks:
    stem       Linear(in_dim, width) + activation
    blocks.i   output = hidden state after block i, shape (N, W)
    head       Linear(width, num_classes)

Shape legend: N batch, I input features, W width, K classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mi_scale.models.errors import unknown_choice

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
NORMS = ("none", "layernorm")


class MLPBlock(nn.Module):
    """[LayerNorm] -> Linear(W, W) -> act -> dropout, plus the input when residual."""

    def __init__(self, width: int, activation: str, residual: bool, norm: str, dropout: float):
        super().__init__()
        self.residual = residual
        self.norm = nn.LayerNorm(width) if norm == "layernorm" else nn.Identity()
        self.fc = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)

    def f(self, x_NW: torch.Tensor) -> torch.Tensor:
        """The block's branch: what is added to x when residual."""
        return self.drop(self.act(self.fc(self.norm(x_NW))))

    def forward(self, x_NW: torch.Tensor) -> torch.Tensor:
        return x_NW + self.f(x_NW) if self.residual else self.f(x_NW)


class DeepMLP(nn.Module):
    """stem -> depth x MLPBlock -> head. forward(x_NI) -> logits_NK."""

    def __init__(self, in_dim: int, num_classes: int, depth: int, width: int,
                 activation: str = "relu", residual: bool = False, norm: str = "none",
                 dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise unknown_choice("model.activation", activation, ACTIVATIONS)
        if norm not in NORMS:
            raise unknown_choice("model.norm", norm, NORMS)
        self.stem = nn.Sequential(nn.Linear(in_dim, width), ACTIVATIONS[activation]())
        self.blocks = nn.ModuleList(
            MLPBlock(width, activation, residual, norm, dropout) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)
        self.activation_checkpointing = False  # recompute each block in backward when True

    def forward(self, x_NI: torch.Tensor) -> torch.Tensor:
        h_NW = self.stem(x_NI.flatten(1))
        ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            h_NW = checkpoint(block, h_NW, use_reentrant=False) if ckpt else block(h_NW)
        return self.head(h_NW)
