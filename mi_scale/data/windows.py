"""Training samples read from a prepared token file, and in-memory columns,
behind one interface for `ShardedBatches`: `len(source)` and
`source.take(indices) -> {"x": ..., "y": ...}`.

Token windows: with T = seq_len, sample i is tokens[i*(T+1) : (i+1)*(T+1)],
x its first T tokens and y its last T (the next tokens). These are the
non-overlapping chunks of T+1 tokens the in-memory path always cut, so a
prepared corpus trains on exactly the samples of the same token stream. The
file is memory-mapped read-only: a rank holds one batch, the kernel's page
cache (shared by the ranks of a node) holds the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .errors import DataError


class TokenWindows:
    """Next-token samples of length seq_len from one split's token file."""

    def __init__(self, path: Path, dtype: np.dtype, n_tokens: int, seq_len: int, vocab_size: int):
        self.path, self.seq_len, self.vocab_size = Path(path), seq_len, vocab_size
        self.num_samples = n_tokens // (seq_len + 1)
        if self.num_samples < 1:
            raise DataError(f"data.seq_len={seq_len}: {self.path} holds {n_tokens} tokens, fewer than "
                            f"seq_len+1, so no sample fits: lower data.seq_len, add text, or raise "
                            f"data.test_fraction (for the held-out split)")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r", shape=(n_tokens,))

    def __len__(self) -> int:
        return self.num_samples

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        width = self.seq_len + 1
        offsets = np.asarray(idx, dtype=np.int64)[:, None] * width + np.arange(width)
        rows = torch.from_numpy(self.tokens[offsets].astype(np.int64))  # int64 for this batch only
        if rows.numel() and int(rows.max()) >= self.vocab_size:
            raise DataError(f"prepared data {self.path}: token id {int(rows.max())} is outside the "
                            f"tokenizer's {self.vocab_size} ids, so the file is corrupt: delete "
                            f"{self.path.parent} and run `mi-scale prepare` again")
        return {"x": rows[:, :-1].contiguous(), "y": rows[:, 1:].contiguous()}

    def __getitem__(self, key: slice) -> dict[str, torch.Tensor]:
        return self.take(torch.arange(self.num_samples)[key])


def batch_bytes(batch: int, seq_len: int, itemsize: int) -> int:
    """Memory of one batch from `TokenWindows.take`: the gathered windows, their
    int64 copy, and contiguous x and y."""
    return batch * (seq_len + 1) * (itemsize + 8) + 2 * batch * seq_len * 8


class TensorColumns:
    """Equal-length columns held in memory (the small classification sources)."""

    def __init__(self, columns: Mapping):
        self.columns = {k: torch.as_tensor(v) for k, v in columns.items()}
        sizes = {len(v) for v in self.columns.values()}
        if len(sizes) != 1:
            raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in self.columns.items()} }")
        self.num_samples = sizes.pop()

    def __len__(self) -> int:
        return self.num_samples

    def take(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.columns.items()}

    def __getitem__(self, key: slice) -> dict[str, torch.Tensor]:
        return {k: v[key] for k, v in self.columns.items()}
