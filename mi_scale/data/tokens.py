"""Tokenizers and next-token chunking for language-model data.

A tokenizer here is anything with `vocab_size`, `separator` (ids placed
between documents), `encode(text) -> list/array of ids` and `decode(ids)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, nothing to download or train."""

    vocab_size = 256

    def __init__(self) -> None:
        self.separator = self.encode("\n\n")

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer; documents are separated by its EOS token."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)  # includes added tokens, unlike tok.vocab_size
        eos = tok.eos_token_id
        self.separator = np.array([eos] if eos is not None else self.encode("\n\n"), dtype=np.int64)

    def encode(self, text: str) -> np.ndarray:
        # verbose=False: long documents exceed model_max_length on purpose; we chunk later
        ids = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str):
    """`"byte"` or a local directory holding a Hugging Face tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).exists():
        raise DataError(
            f"data.tokenizer: {spec!r} is neither 'byte' nor an existing local path: "
            f"use data.tokenizer=byte or point it at a directory saved with "
            f"tokenizer.save_pretrained(...)")
    try:
        from transformers import AutoTokenizer  # heavy import, only when asked for
    except ImportError:
        raise DataError(
            f"data.tokenizer={spec!r} needs the transformers package, which is not installed: "
            f"pip install transformers, or use data.tokenizer=byte") from None
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(
            f"data.tokenizer: cannot load a tokenizer from {spec!r} ({e}): point it at a "
            f"directory saved with tokenizer.save_pretrained(...), or use data.tokenizer=byte"
        ) from None
    return HFTokenizer(tok)


def encode_documents(texts: Sequence[str], tokenizer) -> np.ndarray:
    """One token stream: documents joined by the tokenizer's separator.
    Empty rows (common in line-split corpora) are skipped."""
    pieces: list[np.ndarray] = []
    for i, text in enumerate(t for t in texts if t):
        if i:
            pieces.append(np.asarray(tokenizer.separator, dtype=np.int64))
        pieces.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def chunk_for_lm(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping chunks of seq_len+1 tokens -> (x, y) with y = x shifted by one.

    The tail that does not fill a chunk is dropped.
    """
    n = len(tokens) // (seq_len + 1)
    chunks = tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)
    return chunks[:, :-1].copy(), chunks[:, 1:].copy()
