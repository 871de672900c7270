"""Deterministic, resumable, data-parallel batches.

Order contract (other components and tests rely on it):
  - B = batch_size (per rank), W = world_size, G = B * W (the global batch).
  - Epoch e visits the samples in the order perm_e = torch.randperm(N) drawn
    from torch.Generator().manual_seed(seed + e) (identity when shuffle=False).
  - Global batch b of the epoch is perm_e[b*G : (b+1)*G]; rank r takes the
    slice [r*B : (r+1)*B] of it. One rank with batch G therefore sees exactly
    the W ranks' batches concatenated in rank order.
  - drop_last=True skips the last incomplete global batch; with drop_last=False
    it is served, so some ranks' final batches are short (or empty).
  - Epochs roll over forever. The position is counted in global batches, so a
    checkpoint resumes on any world size with the same global batch G.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping

import datasets
import torch

from .errors import DataError
from .windows import TensorColumns, TokenWindows


def as_source(dataset) -> TensorColumns | TokenWindows:
    """What `ShardedBatches` reads from: token windows on disk as they are; a
    `datasets.Dataset` or a dict of arrays as in-memory columns. Indexing a
    torch-formatted Dataset per batch costs a row-wise Arrow conversion; one
    conversion up front is cheap for the small sources held in memory."""
    if isinstance(dataset, (TokenWindows, TensorColumns)):
        return dataset
    if isinstance(dataset, datasets.Dataset):
        return TensorColumns(dataset.with_format("torch")[:])
    if isinstance(dataset, Mapping):
        return TensorColumns(dataset)
    raise TypeError(f"expected token windows, a datasets.Dataset or a dict of tensors, got {type(dataset).__name__}")


class ShardedBatches:
    """This rank's share of every global batch, as dicts of stacked tensors."""

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size}: use batch_size >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.source = as_source(dataset)
        self.num_samples = len(self.source)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        if self.batches_per_epoch < 1:
            raise DataError(
                f"data.batch_size={batch_size}: a global batch of {self.global_batch_size} "
                f"samples ({batch_size} x {world_size} ranks) is larger than the "
                f"{self.num_samples} samples of the dataset: lower data.batch_size")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm_epoch, self._perm = None, None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (every rank takes one share of each)."""
        div = self.num_samples / self.global_batch_size
        return int(div) if self.drop_last else math.ceil(div)

    @property
    def _index_dtype(self) -> torch.dtype:
        # int32 halves the order's memory (4 B per sample: 57 MB for 1 GB of bytes at
        # seq_len 64); torch.randperm draws the same permutation in either dtype
        return torch.int32 if self.num_samples < 2**31 else torch.int64

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:  # one permutation per epoch, computed once
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.num_samples, generator=g, dtype=self._index_dtype)
            else:
                self._perm = torch.arange(self.num_samples, dtype=self._index_dtype)
            self._perm_epoch = epoch
        return self._perm

    def peek_indices(self) -> torch.Tensor:
        """Dataset indices of this rank's next batch, without advancing."""
        start = self.batch_in_epoch * self.global_batch_size + self.rank * self.batch_size
        return self._order(self.epoch)[start:start + self.batch_size].long()  # short at the very end

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.peek_indices()
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        return self.source.take(idx)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "num_samples": self.num_samples}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at the saved position. The world size may differ as long as the
        global batch is the same: the position in samples is then identical."""
        saved_global = sd["batch_size"] * sd["world_size"]
        if saved_global != self.global_batch_size:
            w = self.world_size
            example = (f"data.batch_size={saved_global // w} on {w} ranks" if saved_global % w == 0
                       else f"data.batch_size={sd['batch_size']} on {sd['world_size']} ranks")
            raise DataError(
                f"data.batch_size: the checkpoint's data position was saved with a global batch "
                f"of {sd['batch_size']} x {sd['world_size']} ranks = {saved_global} samples, but "
                f"this run uses {self.batch_size} x {w} ranks = {self.global_batch_size}, so the "
                f"saved position would point at different samples. Fix: keep data.batch_size x "
                f"world size = {saved_global} (e.g. {example}), or start a new run")
        saved_n = sd.get("num_samples", self.num_samples)
        if saved_n != self.num_samples:
            raise DataError(
                f"data: the checkpoint was saved on a dataset of {saved_n} samples, but this one "
                f"has {self.num_samples}: resume with the same data settings and files")
        self.seed = sd["seed"]  # the saved seed defines the saved order
        self.epoch, self.batch_in_epoch = sd["epoch"], sd["batch_in_epoch"]
        self._perm_epoch = None
