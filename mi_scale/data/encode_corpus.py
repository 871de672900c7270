"""Tokenize a language-model source into token files: the "how" of prepare.py.

The source is read through `datasets`' memory-mapped Arrow cache in pieces of
about PIECE_BYTES of text; each piece is tokenized by `datasets.map(batched,
num_proc)` into an Arrow file in the partial directory, appended to the split's
.bin (and its document starts to the .idx) and deleted. Peak memory is a piece
and the processes, not the corpus: what grows with it is ~9 bytes per document
(text lengths and held-out flags).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import sources
from .errors import DataError
from .hub import load_hub
from .tokens import load_tokenizer, train_bpe

PIECE_BYTES = 64 * 2**20  # text tokenized per datasets.map call (bounds memory and disk)
TEST_SPLITS = ("test", "validation", "valid")
SPLITS = ("train", "test")


def text_field(cfg, fmt: str | None) -> str:
    return "text" if fmt == "text" else cfg.text_field  # the text builder names its column "text"


def load_source(cfg) -> dict[str, datasets.Dataset]:
    """Splits of the source ('train', and 'test' when the source has its own)."""
    if cfg.name == "text":
        raw, field = {"train": sources.corpus_paragraphs()}, "text"
    elif cfg.name == "files":
        raw, fmt = sources.local_files(cfg.path, cfg.format)
        field = text_field(cfg, fmt)
    elif cfg.name == "hub":
        raw, field = load_hub(cfg.path), cfg.text_field
    else:
        raise DataError(f"data.name={cfg.name}: not a language-model source (use text, files or hub)")
    if "train" not in raw:
        raise DataError(f"data.path={cfg.path!r}: the dataset has splits {list(raw)}, none named 'train': "
                        f"use a dataset (or files) with a train split")
    test_name = next((s for s in TEST_SPLITS if s in raw), None)
    out = {"train": raw["train"]} | ({"test": raw[test_name]} if test_name else {})
    for split, ds in out.items():
        if field not in ds.column_names:
            raise DataError(f"data.text_field={field!r}: no such column in {cfg.path or cfg.name!r} "
                            f"(columns: {ds.column_names}): set data.text_field to the text column")
        if not pa.types.is_string(ds.features[field].pa_type) and \
                not pa.types.is_large_string(ds.features[field].pa_type):
            raise DataError(f"data.text_field={field!r}: the column holds {ds.features[field]}, not text: "
                            f"set data.text_field to a text column")
        out[split] = ds.flatten_indices() if ds._indices is not None else ds
    return {"field": field, **out}


def text_bytes(ds: datasets.Dataset, field: str) -> np.ndarray:
    """UTF-8 bytes of every row's text (0 for empty or missing), without Python strings."""
    lengths = pc.binary_length(ds.data.column(field))
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def held_out_rows(n_bytes: np.ndarray, cfg) -> np.ndarray:
    """Rows of whole documents held out from train: ceil(test_fraction x documents),
    drawn by data.split_seed among the non-empty rows."""
    docs = np.flatnonzero(n_bytes > 0)
    n_test = int(np.ceil(len(docs) * cfg.test_fraction))
    if n_test < 1 or len(docs) - n_test < 1:
        raise DataError(f"data.test_fraction={cfg.test_fraction} leaves an empty split of {len(docs)} "
                        f"documents: use a source with more documents (a text file is split at blank "
                        f"lines), or one with its own test split")
    held = np.zeros(len(n_bytes), dtype=bool)
    held[docs[np.random.default_rng(cfg.split_seed).permutation(len(docs))[:n_test]]] = True
    return held


def train_bpe_on_source(source: dict, cfg, vocab: int, out: Path, say) -> None:
    ds, field = source["train"], source["field"]
    keep = ~held_out_rows(text_bytes(ds, field), cfg) if "test" not in source else None

    def texts():
        for start in range(0, len(ds), 10_000):
            batch = ds.data.slice(start, 10_000).column(field).to_pylist()  # 10k documents at a time
            yield [t for i, t in enumerate(batch) if t and (keep is None or keep[start + i])]

    t0 = time.perf_counter()
    train_bpe(texts(), vocab, out)
    say(f"[mi-scale] data: trained a byte-level BPE tokenizer of {vocab} ids in {time.perf_counter() - t0:.1f} s")


class _Encode:
    """datasets.map function: a batch of documents (an Arrow table) -> token ids,
    each document followed by the separator (the stream's final one is cut when
    writing); empty rows give no tokens. Builds the Arrow list column with numpy
    rather than row by row. A class, so that num_proc workers can pickle it."""

    def __init__(self, tokenizer, field: str, dtype: np.dtype):
        self.tokenizer, self.field, self.dtype = tokenizer, field, dtype
        self.separator = np.asarray(tokenizer.separator, dtype=dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [t or "" for t in batch.column(self.field).to_pylist()]
        ids = self.tokenizer.encode_batch(texts)
        n_ids = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        n_sep = np.where(np.fromiter((bool(t) for t in texts), dtype=bool, count=len(texts)), len(self.separator), 0)
        offsets = np.concatenate([[0], np.cumsum(n_ids + n_sep)])
        is_sep = np.zeros(offsets[-1], dtype=bool)  # the separator's places: the last n_sep of each row
        ends = offsets[1:][n_sep > 0]
        for j in range(1, len(self.separator) + 1):
            is_sep[ends - j] = True
        flat = np.empty(offsets[-1], dtype=self.dtype)
        if ids and isinstance(ids[0], np.ndarray):  # byte tokenizer: one concatenation, one cast
            flat[~is_sep] = np.concatenate(ids)
        else:  # lists of ints (Hugging Face tokenizers)
            flat[~is_sep] = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(n_ids.sum()))
        flat[is_sep] = np.tile(self.separator, len(ends))
        column = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()).cast(pa.int32()), pa.array(flat))
        return pa.table({"ids": column})


class _SplitWriter:
    """Appends one split's documents to <split>.bin and their starts to <split>.idx."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.bin, self.idx = open(folder / f"{split}.bin", "wb"), open(folder / f"{split}.idx", "wb")
        self.dtype, self.tokens, self.documents = dtype, 0, 0

    def write(self, ids: pa.ListArray) -> None:
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
        lengths = lengths[lengths > 0]
        starts = self.tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.idx.write(starts.tobytes())
        values = ids.flatten().to_numpy(zero_copy_only=False)
        self.bin.write(memoryview(np.ascontiguousarray(values, dtype=self.dtype)))  # no copy of a piece
        self.tokens += int(lengths.sum())
        self.documents += len(lengths)

    def close(self, separator_len: int) -> dict:
        """Cut the stream's final separator; the .idx ends with the stream's end."""
        if self.tokens:
            self.tokens -= separator_len
            self.bin.truncate(self.tokens * self.dtype.itemsize)
        self.idx.write(np.array([self.tokens], dtype=np.int64).tobytes())
        for f in (self.bin, self.idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"tokens": self.tokens, "documents": self.documents}


def build(source: dict, cfg, tokenizer_spec: str, out: Path, num_proc: int | None, say) -> dict:
    """Tokenize `source` (from load_source) into <split>.bin/.idx in `out`; returns
    what meta.json records about them (the caller adds the identity)."""
    from tqdm import tqdm

    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65_535 else np.uint32)
    field = source["field"]
    splits = {name: source[name] for name in SPLITS if name in source}
    n_bytes = {name: text_bytes(ds, field) for name, ds in splits.items()}
    held = None if "test" in splits else held_out_rows(n_bytes["train"], cfg)
    total = int(sum(b.sum() for b in n_bytes.values()))
    if num_proc is None:  # a pool costs more than it saves on small sources
        num_proc = cfg.num_proc or (1 if total < 32 * 2**20 else min(os.cpu_count() or 1, 8))
    writers = {name: _SplitWriter(out, name, dtype) for name in SPLITS}
    encode = _Encode(tokenizer, field, dtype)
    features = datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))})
    say(f"[mi-scale] data: tokenizing {total / 2**20:.1f} MB of text ({cfg.path or cfg.name}) with "
        f"{num_proc} process(es) into {out.parent}")
    t0 = time.perf_counter()
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # ours shows MB/s, tokens/s and ETA instead
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", mininterval=2,
               smoothing=0.1)
    try:
        for name, ds in splits.items():
            for start, stop in _pieces(n_bytes[name]):
                piece = ds.select(range(start, stop)).with_format("arrow").map(
                    encode, batched=True, batch_size=1000,
                    num_proc=num_proc if num_proc > 1 and stop - start > 1000 else None,
                    remove_columns=ds.column_names, features=features, load_from_cache_file=False,
                    cache_file_name=str(out / f"piece-{name}-{start}.arrow"), desc=None)
                _write_piece(piece, held[start:stop] if held is not None and name == "train" else None,
                             writers["test" if name == "test" else "train"], writers["test"])
                files = [c["filename"] for c in piece.cache_files]
                del piece
                for f in files:
                    os.remove(f)
                bar.update(int(n_bytes[name][start:stop].sum()))
                tokens = sum(w.tokens for w in writers.values())
                bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens, "
                                    f"{tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M tokens/s")
    finally:
        bar.close()
        if was_enabled:
            datasets.enable_progress_bars()
    counts = {name: w.close(len(encode.separator)) for name, w in writers.items()}
    for name, c in counts.items():
        if c["tokens"] == 0:
            raise DataError(f"data: the {name} split has no tokens after tokenizing {cfg.path or cfg.name!r}: "
                            f"check data.text_field and the source's text")
    if tokenizer_spec != "byte":
        shutil.copytree(tokenizer_spec, out / "tokenizer")
    seconds = time.perf_counter() - t0
    meta = {"dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size, "separator": [int(i) for i in encode.separator],
            "splits": counts, "text_bytes": total, "held_out": "source split" if held is None else
            f"{cfg.test_fraction} of documents (data.split_seed={cfg.split_seed})",
            "prepare_seconds": round(seconds, 2), "num_proc": num_proc,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tokens = sum(c["tokens"] for c in counts.values())
    say(f"[mi-scale] data: {tokens:,} tokens ({counts['train']['tokens']:,} train, {counts['test']['tokens']:,} "
        f"held out) in {seconds:.1f} s: {total / 2**20 / max(seconds, 1e-9):.1f} MB/s, "
        f"{tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s")
    return meta


def _pieces(n_bytes: np.ndarray):
    """Contiguous row ranges of about PIECE_BYTES of text each."""
    bounds = np.searchsorted(np.cumsum(n_bytes), np.arange(PIECE_BYTES, int(n_bytes.sum()), PIECE_BYTES))
    edges = sorted({0, *[int(b) + 1 for b in bounds if b + 1 < len(n_bytes)], len(n_bytes)})
    return list(zip(edges[:-1], edges[1:]))


def _write_piece(piece: datasets.Dataset, held: np.ndarray | None, train: _SplitWriter,
                 test: _SplitWriter) -> None:
    row = 0
    for chunk in piece.data.column("ids").chunks:
        if held is None:
            train.write(chunk)
        else:  # split rows by offsets: no per-row work
            mask = held[row:row + len(chunk)]
            train.write(chunk.filter(pa.array(~mask)))
            test.write(chunk.filter(pa.array(mask)))
        row += len(chunk)
