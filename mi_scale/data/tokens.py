"""Tokenizers and next-token chunking for language-model data.

A tokenizer here is anything with `vocab_size`, `separator` (ids placed
between documents), `encode(text)`, `encode_batch(texts)` and `decode(ids)`.
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

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

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

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # one call for the batch: the Rust tokenizer works through it without Python per text
        return self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

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


EOS = "<|endoftext|>"  # GPT-2's document separator, also ours for trained tokenizers


def train_bpe(batches, vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE (GPT-2's scheme) of vocab_size ids on an iterator of
    lists of texts; save it in Hugging Face format in `out` (self-contained: the
    directory is all a later load needs). EOS separates documents."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise DataError(f"--train-tokenizer {vocab_size}: a byte-level BPE needs at least 258 ids "
                        f"(256 bytes, {EOS}, one merge): use a larger vocabulary, e.g. 8192")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator((t for batch in batches for t in batch), vocab_size=vocab_size,
                            special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  unk_token=EOS, model_max_length=2**31 - 1)
    tok.save_pretrained(out)
