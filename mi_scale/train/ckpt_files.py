"""A checkpoint's files on disk: where the complete ones are, their client-state
file's name, the error a checkpoint that cannot resume raises, and loading
DeepSpeed's and our own files weights-only (a planted pickle payload raises
instead of running). Below checkpoint.py (save/resume), reshard.py and
ckpt_reader.py, which all read these files.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import torch

from mi_scale.errors import UserFixableError

META = "mi_scale.json"


class CheckpointError(UserFixableError, RuntimeError):
    """A checkpoint that cannot resume this run; the message says what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holding objects that would run code when unpickled."""


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed (0.19) pickles into its checkpoint files,
    allow-listed one by one for weights_only loading."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def safe_deepspeed_loads():
    """Every torch.load inside, DeepSpeed's own included (they pass
    weights_only=False), runs as weights_only=True with only DeepSpeed's
    types allowed: a planted pickle payload raises instead of running."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_rank_state(path: Path) -> dict:
    """Our own rank file: tensors and plain types only (weights_only=True)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(unsafe_message(path, e)) from None


def unsafe_message(path: Path, e: Exception) -> str:
    first = str(e).strip().splitlines()
    detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
    return (f"checkpoint file {path} holds objects other than tensors and plain types ({detail.strip()}); "
            f"refusing to load it, because unpickling them could run code. Resume from a checkpoint you trust "
            f"(delete this step's folder to fall back to the previous one)")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first (partial ones have no mi_scale.json
    and live under a .partial- name)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)
