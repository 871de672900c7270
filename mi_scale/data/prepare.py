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

How the text becomes tokens, in pieces and in bounded memory: encode_corpus.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mi_scale import __version__

from . import sources
from .encode_corpus import SPLITS, build, load_source, text_field, train_bpe_on_source
from .errors import DataError
from .hub import load_hub
from .tokens import load_tokenizer

FORMAT_VERSION = 1


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
        return {"name": "files", "format": fmt, "text_field": text_field(cfg, fmt), "files": stats}
    if cfg.name == "hub":
        return {"name": "hub", "path": cfg.path, "text_field": cfg.text_field}
    raise DataError(f"data.name={cfg.name}: not a language-model source (use text, files or hub)")


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
    raw, fmt = sources.local_files(cfg.path, cfg.format) if cfg.name == "files" else (load_hub(cfg.path), None)
    columns = raw["train"].column_names if "train" in raw else []
    return text_field(cfg, fmt) in columns


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
    source = load_source(cfg)
    if train_tokenizer is not None and not Path(tokenizer_spec).is_dir():
        with _file_lock(root / f".{Path(tokenizer_spec).name}.lock"):
            if not Path(tokenizer_spec).is_dir():
                partial = Path(f"{tokenizer_spec}.partial-{os.getpid()}")
                train_bpe_on_source(source, cfg, train_tokenizer, partial, say)
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
            meta = build(source, cfg, tokenizer_spec, partial, num_proc, say)
            meta = {"format_version": FORMAT_VERSION, "identity": ident, **meta, "mi_scale_version": __version__}
            (partial / "meta.json").write_text(json.dumps(meta, indent=1))  # last: its presence means complete
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


