"""Raw sources that load without a network: MNIST-1D, scikit-learn digits,
the bundled text corpus and local files. Each returns `datasets` objects;
turning them into model inputs is `build.py`'s job.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import random
import tempfile
from pathlib import Path

import datasets
import numpy as np

from .errors import DataError

CORPUS_PATH = Path(__file__).parent / "corpus" / "stdlib_docstrings.txt"

# data.format (or a file suffix) -> datasets builder name
BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet", "text": "text"}
SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet",
            ".txt": "text", ".text": "text", ".md": "text"}


def cache_dir() -> Path:
    root = os.environ.get("MI_SCALE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mi-scale")
    return Path(root)


def _features_dataset(x: np.ndarray, y: np.ndarray) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"x": x.astype(np.float32), "y": y.astype(np.int64)})


def mnist1d() -> tuple[datasets.Dataset, datasets.Dataset]:
    """The standard MNIST-1D split (package defaults: 4000 train / 1000 test, 40 dims)."""
    # The split is the package's default arguments, fixed per mnist1d version:
    # the version is the key, so a cache hit skips importing mnist1d (scipy and
    # matplotlib, 1.5 s per rank).
    key = json.dumps({"version": importlib.metadata.version("mnist1d"), "args": "defaults"}, sort_keys=True)
    path = cache_dir() / f"mnist1d-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    arrays = _load_cached(path)
    if arrays is None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        # make_dataset reseeds the global random/numpy RNGs; keep the caller's streams intact
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            raw = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        arrays = {"x": raw["x"].astype(np.float32), "y": raw["y"].astype(np.int64),
                  "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int64)}
        _save_atomic(path, arrays)
    return (_features_dataset(arrays["x"], arrays["y"]),
            _features_dataset(arrays["x_test"], arrays["y_test"]))


def _load_cached(path: Path) -> dict | None:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in ("x", "y", "x_test", "y_test")}
    except (OSError, KeyError, ValueError):  # absent or unreadable: regenerate
        return None


def _save_atomic(path: Path, arrays: dict) -> None:
    """Write via a temp file + rename so ranks generating at once never read half a file.
    The cache is an optimization: an unwritable cache dir is not an error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass


def digits() -> datasets.Dataset:
    """scikit-learn's bundled 8x8 digits (1797 samples, 64 features scaled to [0, 1])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _features_dataset(d.data / 16.0, d.target)  # pixel intensities are 0..16


def corpus_paragraphs() -> datasets.Dataset:
    """The bundled corpus, one document per paragraph (split at blank lines): whole
    documents can then be held out. With the byte tokenizer, whose separator is a
    blank line, the joined stream is the file's text."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    return datasets.Dataset.from_dict({"text": [p for p in text.split("\n\n") if p]})


def resolve_files(path: str, fmt: str | None) -> tuple[list[str], str]:
    """The file(s) a path or glob names, and their format (data.format or the suffix)."""
    matches = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    missing = [p for p in matches if not Path(p).is_file()]
    if not matches or missing:
        what = "matches no file" if not matches else (
            "is a directory" if Path(missing[0]).is_dir() else "does not exist")
        raise DataError(
            f"data.path: {path!r} {what}: point data.path at an existing json/jsonl/csv/"
            f"parquet/text file or a glob such as 'dir/*.jsonl' (relative paths are resolved "
            f"from {os.getcwd()!r})")
    if fmt is None:
        suffix = Path(matches[0]).suffix.lower()
        fmt = SUFFIXES.get(suffix)
        if fmt is None:
            raise DataError(
                f"data.format: cannot infer the format of {path!r} from its suffix {suffix!r}: "
                f"set data.format to one of {', '.join(sorted(BUILDERS))}")
    return matches, fmt


def local_files(path: str, fmt: str | None) -> tuple[datasets.DatasetDict, str]:
    """json/jsonl/csv/parquet/text file(s) (a path or a glob) via `datasets.load_dataset`
    (an Arrow cache, memory-mapped). Returns the splits (just "train") and the format used."""
    matches, fmt = resolve_files(path, fmt)
    builder = BUILDERS[fmt]
    # text files: one document per paragraph (blank-line separated, line breaks kept), so
    # that whole documents can be held out and the LM sees the real text
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=matches, **kwargs), fmt
    except Exception as e:  # parser errors come in many types; all mean "bad file"
        raise DataError(
            f"data.path: {path!r} could not be read as {fmt} ({type(e).__name__}: {e}): "
            f"check the file, or set data.format to its real format") from None
