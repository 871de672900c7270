"""`build_data`: a `DataConfig` and a seed -> train/test splits plus task facts.

Every split serves {"x", "y"} batches to `ShardedBatches`:
  classify: x float32 (input_dim,), y int64 class id; in memory (small sources)
  lm:       x int64 (seq_len,),    y int64 (seq_len,) = next tokens of x; windows
            of a prepared token file on disk (prepare.py, windows.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import datasets
import numpy as np

from . import prepare, sources
from .errors import DataError
from .hub import load_hub
from .encode_corpus import TEST_SPLITS
from .tokens import load_tokenizer
from .windows import TokenWindows


@dataclass
class DataBundle:
    train: Any  # datasets.Dataset (classify) or TokenWindows (lm)
    test: Any
    task: Literal["classify", "lm"]
    input_dim: Optional[int] = None  # classify
    num_classes: Optional[int] = None  # classify
    vocab_size: Optional[int] = None  # lm
    seq_len: Optional[int] = None  # lm
    tokenizer: Any = None  # lm: encode/decode, e.g. for printing samples


def build_data(cfg, seed: int, say: Callable[[str], None] = print) -> DataBundle:
    """cfg: mi_scale.config.DataConfig. The seed only picks the held-out split of
    classification tables; language-model text is held out by whole documents
    drawn with data.split_seed (prepare.py), and sources with their own test
    split (mnist1d, most hub sets) use it. `say` gets the data preparation's lines."""
    if cfg.name in ("mnist1d", "digits", "text") and cfg.path is not None:
        raise DataError(f"data.path: {cfg.path!r} is not used by data.name={cfg.name}: "
                        f"remove data.path, or use data.name=files data.path={cfg.path}")
    if cfg.name == "mnist1d":
        train, test = sources.mnist1d()
        return _classify_bundle(train, test, num_classes=10)
    if cfg.name == "digits":
        train, test = _split(sources.digits(), cfg, seed)
        return _classify_bundle(train, test, num_classes=10)
    if cfg.name == "text":
        return _lm_bundle(cfg, say)
    if cfg.name in ("files", "hub") and prepare.find_prepared(cfg) is not None:
        return _lm_bundle(cfg, say)  # prepared already: the source is not read at all
    if cfg.name == "files":
        raw, fmt = sources.local_files(cfg.path, cfg.format)
        # the text builder always names its column "text"
        return _table_bundle(raw, "text" if fmt == "text" else cfg.text_field, cfg, seed, say)
    if cfg.name == "hub":
        return _table_bundle(load_hub(cfg.path), cfg.text_field, cfg, seed, say)
    raise DataError(f"data.name: unknown source {cfg.name!r}: use mnist1d, digits, text, files or hub")


# ----------------------------------------------------------------------------
# splits and bundles


def _split(ds: datasets.Dataset, cfg, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    n_test = int(np.ceil(len(ds) * cfg.test_fraction))
    if n_test < 1 or len(ds) - n_test < 1:
        raise DataError(f"data.test_fraction={cfg.test_fraction} leaves an empty split of "
                        f"{len(ds)} examples: use more data or a test_fraction that keeps "
                        f"both splits non-empty")
    parts = ds.train_test_split(test_size=n_test, seed=seed, keep_in_memory=True)
    return parts["train"], parts["test"]


def _train_test(raw: dict, cfg, seed: int, convert) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Convert the source's own train/test splits, or split its train set by test_fraction."""
    if "train" not in raw:
        raise DataError(f"data.path={cfg.path!r}: the dataset has splits {list(raw)}, none "
                        f"named 'train': use a dataset (or files) with a train split")
    test_name = next((s for s in TEST_SPLITS if s in raw), None)
    if test_name is None:
        return _split(convert(raw["train"]), cfg, seed)
    return convert(raw["train"]), convert(raw[test_name])


def _classify_bundle(train, test, num_classes: int) -> DataBundle:
    return DataBundle(train=train.with_format("torch"), test=test.with_format("torch"),
                      task="classify", input_dim=len(train[0]["x"]), num_classes=num_classes)


def _lm_bundle(cfg, say) -> DataBundle:
    prepared = prepare.ensure_prepared(cfg, say=say)
    vocab = prepared.meta["vocab_size"]
    train, test = (TokenWindows(prepared.path / f"{split}.bin", prepared.dtype, prepared.tokens(split),
                                cfg.seq_len, vocab) for split in ("train", "test"))
    return DataBundle(train=train, test=test, task="lm", vocab_size=vocab, seq_len=cfg.seq_len,
                      tokenizer=load_tokenizer(cfg.tokenizer))


# ----------------------------------------------------------------------------
# tables from files or the hub: a text column -> lm, a label column -> classify


def _table_bundle(raw: datasets.DatasetDict, text_field: str, cfg, seed: int, say) -> DataBundle:
    columns = raw["train"].column_names if "train" in raw else []
    if text_field in columns:
        return _lm_bundle(cfg, say)
    if cfg.label_field in columns:
        labels = _label_encoder(raw, cfg.label_field)

        def convert(ds: datasets.Dataset) -> datasets.Dataset:
            return datasets.Dataset.from_dict({"x": _numeric_features(ds, cfg),
                                               "y": labels(ds[cfg.label_field][:])})

        train, test = _train_test(raw, cfg, seed, convert)
        return _classify_bundle(train, test, num_classes=labels.num_classes)
    raise DataError(
        f"data.text_field={text_field!r} / data.label_field={cfg.label_field!r}: neither "
        f"column is in {cfg.path!r} (columns: {columns}): set data.text_field to the text "
        f"column (language modelling) or data.label_field to the label column (classification)")


class _LabelEncoder:
    """Labels -> int64 class ids, consistent across splits. Integer labels keep
    their values (0..max); strings are numbered in sorted order."""

    def __init__(self, values: list, field: str, feature=None):
        if isinstance(feature, datasets.ClassLabel):  # hub sets declare their classes
            self.names, self.num_classes = None, feature.num_classes
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise DataError(f"data.label_field={field!r}: labels must be >= 0, found "
                                f"{min(values)}: renumber the classes from 0")
            self.names = None
            self.num_classes = int(max(values)) + 1
        elif all(isinstance(v, str) for v in values):
            self.names = sorted(set(values))
            self.num_classes = len(self.names)
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise DataError(f"data.label_field={field!r}: labels must be all integers or all "
                            f"strings, found {kinds}: point data.label_field at a class column")

    def __call__(self, values: list) -> np.ndarray:
        if self.names is None:
            return np.asarray(values, dtype=np.int64)
        index = {name: i for i, name in enumerate(self.names)}
        return np.asarray([index[v] for v in values], dtype=np.int64)


def _label_encoder(raw: datasets.DatasetDict, field: str) -> _LabelEncoder:
    values = [v for split in raw.values() for v in split[field][:]]
    if not values:
        raise DataError(f"data.label_field={field!r}: the dataset has no rows: check data.path")
    return _LabelEncoder(values, field, next(iter(raw.values())).features.get(field))


def _is_numeric(feature) -> bool:
    # scalar Value or a (possibly nested) list of numeric Values
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return _is_numeric(inner)
    dtype = getattr(feature, "dtype", "")
    return isinstance(feature, datasets.Value) and (
        dtype.startswith(("int", "uint", "float")) or dtype == "bool")


def _numeric_features(ds: datasets.Dataset, cfg) -> np.ndarray:
    """All numeric columns but the label, concatenated in column order -> (N, D) float32."""
    names = [c for c, f in ds.features.items() if c != cfg.label_field and _is_numeric(f)]
    if not names:
        raise DataError(f"data.path={cfg.path!r}: no numeric feature columns besides "
                        f"data.label_field={cfg.label_field!r} (columns: {ds.column_names}): "
                        f"add numeric feature columns, or set data.text_field for text")
    table = ds.with_format("numpy", columns=names)[:]
    blocks = []
    for name in names:
        col = np.asarray(table[name])
        if col.dtype == object:
            raise DataError(f"data.path={cfg.path!r}: column {name!r} holds lists of different "
                            f"lengths: give every row the same number of features")
        blocks.append(col.reshape(len(ds), -1).astype(np.float32))
    x = np.concatenate(blocks, axis=1)
    if np.isnan(x).any():
        raise DataError(f"data.path={cfg.path!r}: feature columns {names} have missing values: "
                        f"fill or drop those rows")
    return x
