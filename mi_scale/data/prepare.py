"""Tokenize a language-model source once into a flat token file on disk.

    <data.prepared_dir>/<source>-<key>/
        meta.json        what made it (identity) and what it holds; written last
        train.bin        token ids (uint16 when the tokenizer has <= 65,535 ids, else
        test.bin         uint32): the split's documents joined by the tokenizer's separator
        train.idx        int64: where each document starts in the .bin, then the end
        test.idx
        tokenizer/       the Hugging Face tokenizer that made it (not for `byte`)

The directory's name is a hash of everything that decides its bytes (source
fingerprints, tokenizer files, held-out split, format version), so a changed
source or tokenizer maps to a new directory: prepared data is never reused for
something else. One process builds it, under a file lock, into a partial
directory that is renamed into place; others wait and then read it. Training
memory-maps the .bin (`windows.py`), so no rank ever holds the corpus.

The source is read through `datasets`' memory-mapped Arrow cache in pieces of
about PIECE_BYTES of text; each piece is tokenized by `datasets.map(batched,
num_proc)` into an Arrow file in the partial directory, appended to the .bin
and deleted. Peak memory is a piece, not the corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import sources
from .errors import DataError
from .hub import load_hub
from .tokens import load_tokenizer, train_bpe

FORMAT_VERSION = 1
PIECE_BYTES = 64 * 2**20  # text tokenized per datasets.map call (bounds memory and disk)
TEST_SPLITS = ("test", "validation", "valid")
SPLITS = ("train", "test")


@dataclass
class Prepared:
    """A prepared directory, checked against its meta.json."""

    path: Path
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]

    def tokenizer_spec(self) -> str:
        return str(self.path / "tokenizer") if (self.path / "tokenizer").is_dir() else "byte"

    @classmethod
    def open(cls, path: Path) -> "Prepared":
        """Read meta.json and check every file's size against it: a truncated or
        missing file is named with the fix, before any rank reads a window."""
        fix = f"delete {path} and run `mi-scale prepare` again (or `mi-scale train`, which prepares it)"
        try:
            meta = json.loads((path / "meta.json").read_text())
            itemsize = np.dtype(meta["dtype"]).itemsize
            expected = {f"{s}.bin": meta["splits"][s]["tokens"] * itemsize for s in SPLITS}
            expected.update({f"{s}.idx": (meta["splits"][s]["documents"] + 1) * 8 for s in SPLITS})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"prepared data {path / 'meta.json'} is unreadable ({type(e).__name__}: {e}): "
                            f"{fix}") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"prepared data {path} has format version {meta.get('format_version')}, this "
                            f"mi-scale reads version {FORMAT_VERSION}: {fix}")
        for name, size in expected.items():
            file = path / name
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                what = "is missing" if actual is None else f"has {actual} bytes, meta.json says {size}"
                raise DataError(f"prepared data {file} {what} (truncated or corrupt): {fix}")
        return cls(path, meta)


# ----------------------------------------------------------------------------
# identity: what decides the prepared bytes, computed without reading the corpus


def _sha256_files(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root) if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
    return h.hexdigest()


def tokenizer_identity(spec: str) -> dict:
    """`byte`, or the hash of a tokenizer directory's files (not its path: a
    moved tokenizer is the same tokenizer)."""
    if spec == "byte":
        return {"kind": "byte"}
    root = Path(spec)
    if not root.is_dir():
        load_tokenizer(spec)  # raises the error line for a bad path
        raise DataError(f"data.tokenizer: {spec!r} is not a directory: point it at a directory saved "
                        f"with tokenizer.save_pretrained(...)")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {"kind": "hf", "sha256": _sha256_files(files, root)}


def source_identity(cfg) -> dict:
    """cfg: DataConfig. Files are fingerprinted by path, size and mtime (as
    `datasets` does for its own cache), so a start-up costs a stat per file."""
    if cfg.name == "text":
        return {"name": "text", "sha256": _sha256_files([sources.CORPUS_PATH])}
    if cfg.name == "files":
        files, fmt = sources.resolve_files(cfg.path, cfg.format)
        stats = [[str(Path(f).resolve()), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
        return {"name": "files", "format": fmt, "text_field": _text_field(cfg, fmt), "files": stats}
    if cfg.name == "hub":
        return {"name": "hub", "path": cfg.path, "text_field": cfg.text_field}
    raise DataError(f"data.name={cfg.name}: not a language-model source (use text, files or hub)")


def _text_field(cfg, fmt: str | None) -> str:
    return "text" if fmt == "text" else cfg.text_field  # the text builder names its column "text"


def identity(cfg, tokenizer_spec: str | None = None) -> dict:
    return {"format_version": FORMAT_VERSION, "source": source_identity(cfg),
            "tokenizer": tokenizer_identity(tokenizer_spec or cfg.tokenizer),
            "held_out": {"test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed}}


def prepared_root(cfg) -> Path:
    return Path(cfg.prepared_dir).expanduser() if cfg.prepared_dir else sources.cache_dir() / "prepared"


def prepared_path(cfg, ident: dict) -> Path:
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    name = Path(cfg.path).stem.replace("*", "") if cfg.path and cfg.name == "files" else cfg.name
    return prepared_root(cfg) / f"{cfg.name}-{name or 'files'}-{key}".replace("/", "_")


def find_prepared(cfg) -> Prepared | None:
    """The prepared directory for this config, if it exists (checked)."""
    path = prepared_path(cfg, identity(cfg))
    return Prepared.open(path) if (path / "meta.json").exists() else None


# ----------------------------------------------------------------------------
# building


def prepare_for_run(cfg, say) -> None:
    """Before the ranks start: prepare language-model text here, with progress on
    the console, so that every rank only opens it. Classification sources are
    left to the ranks (small, in memory)."""
    if cfg.name == "text" or (cfg.name in ("files", "hub") and find_prepared(cfg) is None
                              and _is_text_source(cfg)):
        ensure_prepared(cfg, say=say)


def _is_text_source(cfg) -> bool:
    raw = sources.local_files(cfg.path, cfg.format)[0] if cfg.name == "files" else load_hub(cfg.path)
    columns = raw["train"].column_names if "train" in raw else []
    return _text_field(cfg, sources.resolve_files(cfg.path, cfg.format)[1] if cfg.name == "files"
                       else None) in columns


def run_cli(cfg, num_proc: int | None, train_tokenizer: int | None) -> Prepared:
    """`mi-scale prepare`: build (or find) the prepared data and say how to use it."""
    if num_proc is not None and num_proc < 1:
        raise DataError(f"--num-proc {num_proc}: use 1 or more processes")
    if cfg.name in ("mnist1d", "digits"):
        raise DataError(f"data.name={cfg.name}: a small in-memory classification source has nothing to "
                        f"prepare: `prepare` is for language-model text (text, files, hub)")
    prepared = ensure_prepared(cfg, num_proc=num_proc, train_tokenizer=train_tokenizer)
    m = prepared.meta
    print(f"[mi-scale] data: ready: {prepared.path} ({m['splits']['train']['tokens']:,} train tokens, "
          f"{m['splits']['test']['tokens']:,} held out, {m['dtype']}, vocab {m['vocab_size']})")
    if train_tokenizer is not None:
        print(f"[mi-scale] data: train on it with --set data.tokenizer={prepared.path / 'tokenizer'}")
    return prepared


def ensure_prepared(cfg, num_proc: int | None = None, train_tokenizer: int | None = None,
                    say=print) -> Prepared:
    """The prepared data for cfg (DataConfig), built here if missing. With
    `train_tokenizer=V`, first train a byte-level BPE of V ids on the train
    split and tokenize with it (its files land in the directory's tokenizer/)."""
    root = prepared_root(cfg)
    tokenizer_spec = cfg.tokenizer if train_tokenizer is None else str(_trained_tokenizer_path(cfg, train_tokenizer))
    if train_tokenizer is None or Path(tokenizer_spec).is_dir():  # (a bad data.tokenizer fails here)
        path = prepared_path(cfg, identity(cfg, tokenizer_spec))
        if (path / "meta.json").exists():
            return Prepared.open(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"data.prepared_dir: cannot create {root} ({e.strerror}): point "
                        f"data.prepared_dir at a writable directory (shared by all nodes)") from None
    source = _load_source(cfg)
    if train_tokenizer is not None and not Path(tokenizer_spec).is_dir():
        with _file_lock(root / f".{Path(tokenizer_spec).name}.lock"):
            if not Path(tokenizer_spec).is_dir():
                partial = Path(f"{tokenizer_spec}.partial-{os.getpid()}")
                _train_tokenizer(source, cfg, train_tokenizer, partial, say)
                os.rename(partial, tokenizer_spec)
    ident = identity(cfg, tokenizer_spec)
    path = prepared_path(cfg, ident)
    with _file_lock(root / f".{path.name}.lock"):
        if (path / "meta.json").exists():  # built by another process while we waited
            say(f"[mi-scale] data: prepared by another process: {path}")
            return Prepared.open(path)
        _explain_rebuild(root, cfg.name, ident, say)
        for stale in root.glob(f".{path.name}.partial-*"):  # a builder that died
            shutil.rmtree(stale, ignore_errors=True)
        partial = root / f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}"
        partial.mkdir()
        try:
            _build(source, cfg, ident, tokenizer_spec, partial, num_proc, say)
            os.rename(partial, path)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    say(f"[mi-scale] data: prepared {path}")
    return Prepared.open(path)


def _trained_tokenizer_path(cfg, vocab: int) -> Path:
    """Where `--train-tokenizer VOCAB` keeps the BPE it trained on this source's
    train split: keyed like prepared data, so it is trained once."""
    ident = {"format_version": FORMAT_VERSION, "source": source_identity(cfg), "bpe_vocab": vocab,
             "held_out": {"test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed}}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return prepared_root(cfg) / f"tokenizer-bpe{vocab}-{key}"


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _explain_rebuild(root: Path, name: str, ident: dict, say) -> None:
    """Say why an earlier prepared directory of the same source is not reused."""
    for meta_file in sorted(root.glob(f"{name}-*/meta.json")):
        try:
            old = json.loads(meta_file.read_text())["identity"]
        except (OSError, ValueError, KeyError):
            continue
        same_source = {k: v for k, v in old["source"].items() if k != "files"} == \
            {k: v for k, v in ident["source"].items() if k != "files"}
        if name == "files":
            same_source &= [f[0] for f in old["source"]["files"]] == [f[0] for f in ident["source"]["files"]]
        if not same_source:
            continue
        changed = [what for what, key in (("source files changed (size or modification time)", "source"),
                                          ("tokenizer changed", "tokenizer"),
                                          ("held-out split changed", "held_out"),
                                          ("format version changed", "format_version"))
                   if old.get(key) != ident[key]]
        if changed:
            say(f"[mi-scale] data: not reusing {meta_file.parent} ({'; '.join(changed)}): preparing anew "
                f"(delete the old directory if no run needs it)")


def _load_source(cfg) -> dict[str, datasets.Dataset]:
    """Splits of the source ('train', and 'test' when the source has its own)."""
    if cfg.name == "text":
        raw, field = {"train": sources.corpus_paragraphs()}, "text"
    elif cfg.name == "files":
        raw, fmt = sources.local_files(cfg.path, cfg.format)
        field = _text_field(cfg, fmt)
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


def _text_bytes(ds: datasets.Dataset, field: str) -> np.ndarray:
    """UTF-8 bytes of every row's text (0 for empty or missing), without Python strings."""
    lengths = pc.binary_length(ds.data.column(field))
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _held_out_rows(n_bytes: np.ndarray, cfg) -> np.ndarray:
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


def _train_tokenizer(source: dict, cfg, vocab: int, out: Path, say) -> None:
    ds, field = source["train"], source["field"]
    keep = ~_held_out_rows(_text_bytes(ds, field), cfg) if "test" not in source else None

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


def _build(source: dict, cfg, ident: dict, tokenizer_spec: str, out: Path, num_proc: int | None,
           say) -> None:
    from tqdm import tqdm

    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65_535 else np.uint32)
    field = source["field"]
    splits = {name: source[name] for name in SPLITS if name in source}
    n_bytes = {name: _text_bytes(ds, field) for name, ds in splits.items()}
    held = None if "test" in splits else _held_out_rows(n_bytes["train"], cfg)
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
    meta = {"format_version": FORMAT_VERSION, "identity": ident, "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size, "separator": [int(i) for i in encode.separator],
            "splits": counts, "text_bytes": total, "held_out": "source split" if held is None else
            f"{cfg.test_fraction} of documents (data.split_seed={cfg.split_seed})",
            "prepare_seconds": round(seconds, 2), "num_proc": num_proc,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "mi_scale_version": _version()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence means complete
    tokens = sum(c["tokens"] for c in counts.values())
    say(f"[mi-scale] data: {tokens:,} tokens ({counts['train']['tokens']:,} train, {counts['test']['tokens']:,} "
        f"held out) in {seconds:.1f} s: {total / 2**20 / max(seconds, 1e-9):.1f} MB/s, "
        f"{tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s")


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


def _version() -> str:
    from mi_scale import __version__
    return __version__
