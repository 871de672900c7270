"""Sketches of layer activations: token subsample + feature projection.

Shape legend: N samples, T tokens, D features, P sampled tokens per sample,
K sketch dims.

A sketch has two independent parts:
  - token positions, drawn from (seed, step) and identical for every sample,
    every layer and every rank, so the rows of two layers' sketches stay
    aligned sample-for-sample and token-for-token;
  - a feature projection D -> K: `random` (a fixed Gaussian matrix drawn from
    (seed, D), shared by every layer of width D and regenerated identically in
    every process, never trained or checkpointed) or `learned` (a trainable
    K x D matrix per layer).

Sketching only loses information (data-processing inequality), so MI measured
on sketches is a lower bound-like proxy of the layer MI.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def as_tokens(h: torch.Tensor) -> torch.Tensor:
    """View an activation as (N, T, D): (N, D) has one token; (N, T, D) is
    kept; (N, C, H, W) has H*W spatial tokens of C features."""
    if h.dim() == 2:
        return h.unsqueeze(1)
    if h.dim() == 3:
        return h
    if h.dim() == 4:
        n, c = h.shape[:2]
        return h.reshape(n, c, -1).transpose(1, 2)
    raise ValueError(f"cannot sketch an activation of shape {tuple(h.shape)}: expected (N, D), "
                     "(N, T, D) or (N, C, H, W)")


def _generator(*keys: int) -> torch.Generator:
    # A stable 63-bit seed from integer keys; identical in every process.
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def token_fractions(seed: int, step: int, tokens_per_sample: int) -> torch.Tensor:
    """P stratified positions in [0, 1): one per stratum [j/P, (j+1)/P).

    Layers with T tokens take floor(u * T), so layers of equal T share exact
    positions and layers of different T (e.g. pooled conv maps) take the same
    relative positions."""
    p = tokens_per_sample
    u = torch.rand(p, generator=_generator(seed, step, 7919), dtype=torch.float64)
    return (torch.arange(p, dtype=torch.float64) + u) / p


def select_tokens(h_NTK: torch.Tensor, fractions_P: torch.Tensor) -> torch.Tensor:
    """Rows of the sketch: (N*P, K), sample-major. A single-token layer keeps its one row."""
    n, t, k = h_NTK.shape
    if t == 1:
        return h_NTK[:, 0, :]
    pos_P = (fractions_P * t).floor().long().clamp_(max=t - 1).to(h_NTK.device)
    return h_NTK[:, pos_P, :].reshape(n * len(pos_P), k)


def random_projection(seed: int, width: int, k: int, device=None, dtype=None) -> torch.Tensor:
    """The shared (D, K) Gaussian projection for layers of width D, scaled by
    1/sqrt(K) so squared distances are preserved in expectation (JL)."""
    r_DK = torch.randn(width, k, generator=_generator(seed, width, 104729), dtype=torch.float32)
    r_DK = r_DK / math.sqrt(k)
    return r_DK.to(device=device, dtype=dtype)


class Sketcher(nn.Module):
    """Projects the feature axis of hooked activations to K dims.

    random: projections live in a cache keyed by (width, device, dtype), not in
    the state dict. learned: one trainable nn.Linear(D, K, bias=False) per
    layer, created by `add_layer` before the optimizer is built; initialised
    from the shared random projection so training starts where `random` is."""

    def __init__(self, kind: str, k: int, seed: int):
        super().__init__()
        if kind not in ("random", "learned"):
            raise ValueError(f"mi.sketch: invalid value {kind!r}: use 'random' or 'learned'")
        self.kind, self.k, self.seed = kind, k, seed
        self.learned = nn.ModuleDict()
        self._cache: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _key(layer: str) -> str:
        return layer.replace(".", "__")  # ModuleDict keys may not contain '.'

    def add_layer(self, layer: str, width: int, device=None) -> None:
        if self.kind == "learned" and self._key(layer) not in self.learned:
            lin = nn.Linear(width, self.k, bias=False, device=device)
            with torch.no_grad():
                lin.weight.copy_(random_projection(self.seed, width, self.k).T)
            self.learned[self._key(layer)] = lin

    def project(self, layer: str, h_NTD: torch.Tensor) -> torch.Tensor:
        if self.kind == "learned":
            key = self._key(layer)
            if key not in self.learned:
                raise RuntimeError(f"learned sketch for layer {layer!r} was not created: call "
                                   "MIRegularizer.discover(example_input) before building the optimizer")
            lin = self.learned[key]
            return lin(h_NTD.to(lin.weight.dtype))
        width = h_NTD.shape[-1]
        ck = (width, h_NTD.device, h_NTD.dtype)
        if ck not in self._cache:
            self._cache[ck] = random_projection(self.seed, width, self.k, h_NTD.device, h_NTD.dtype)
        return h_NTD @ self._cache[ck]
