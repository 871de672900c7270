"""model.init_from: start training from existing weights. Only the weights
are loaded; the optimizer and the schedule start fresh.

Sources, by what the path holds:
- a mi-scale run dir (config.yaml + checkpoints/): its newest checkpoint's
  model weights, read like `mi-scale export` reads them (any ZeRO stage,
  any world size): continued pre-training with a new optimizer;
- a Hugging Face model dir (safetensors, sharded or not, or
  pytorch_model.bin): for model.kind=hf its own tensor names; for the
  built-in GPT a GPT-2 format dir (what `mi-scale export` writes, or any
  GPT2LMHeadModel of the same shape), mapped by models/gpt2_format.py.

Every tensor is accounted for before anything is copied: missing,
unexpected and shape-mismatched tensors make one error naming them. Files
are read one at a time, tensors one at a time. A partitioned (ZeRO-3)
parameter is gathered alone, filled on rank 0 and re-partitioned
(GatheredParameters), so only rank 0 reads the files and no rank ever holds
more than one full tensor of them. The checksum is a sha256 over the
loaded tensors (model names, model dtype and layout), so two runs can check
that they started from the same weights, whatever the source's format.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from mi_scale.models.errors import invalid
from mi_scale.models.weights import FIELD, open_hf_dir


@dataclass
class Planned:
    file: str
    source_name: str
    target: str
    transpose: bool
    tensor: torch.Tensor  # the parameter or buffer to fill


class _RunDirSource:
    """A run's newest checkpoint as one 'file'; its model's tensors only."""

    def __init__(self, run_dir: Path):
        from mi_scale.train.ckpt_reader import CheckpointReader, pick_checkpoint

        self.reader = CheckpointReader(pick_checkpoint(run_dir))
        self.files = [str(self.reader.ckpt)]
        self.names = {self.files[0]: list(self.reader.shapes)}
        self.shapes = self.reader.shapes

    def read(self, file: str, name: str) -> torch.Tensor:
        return self.reader.tensor(name)

    def release(self) -> None:
        self.reader.release()


def open_source(path: str):
    p = Path(path)
    if not p.is_dir():
        raise invalid(FIELD, path, "not a directory: pass a mi-scale run dir, a dir written by `mi-scale "
                                   "export`, or a local Hugging Face model dir")
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return _RunDirSource(p)
    src = open_hf_dir(p)
    if src is None:
        raise invalid(FIELD, path, "holds no weights (model.safetensors[.index.json], pytorch_model.bin"
                                   "[.index.json]) and is not a mi-scale run dir with checkpoints/")
    return src


def _targets(model: nn.Module) -> tuple[dict[str, int], list[tuple[list[str], torch.Tensor]]]:
    """Name -> index into [(alias names, tensor)]: a tied parameter is one entry."""
    entries: list[tuple[list[str], torch.Tensor]] = []
    by_id: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in by_id:
            by_id[id(p)] = len(entries)
            entries.append(([], p))
        entries[by_id[id(p)]][0].append(name)
    for mod_name, mod in model.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                entries.append(([f"{mod_name}.{name}" if mod_name else name], b))
    return {n: i for i, (names, _) in enumerate(entries) for n in names}, entries


def _full_shape(t: torch.Tensor) -> torch.Size:
    return t.ds_shape if hasattr(t, "ds_shape") else t.shape  # a ZeRO-3 partition knows its whole shape


def _mapper(kind: str, source, model: nn.Module):
    """(source name -> (target name, transpose), is_ignorable(source name)): an
    ignorable name is not a weight of this model but known to be harmless
    (buffers of older checkpoints; the objective's non-model parts)."""
    if isinstance(source, _RunDirSource):  # our own names, behind the objective's "model."
        return (lambda n: (n[len("model."):], False)), (lambda n: not n.startswith("model."))
    if kind == "gpt":
        from mi_scale.models.gpt2_format import GPT2_IGNORED, from_gpt2_name

        cfg_file = source.root / "config.json"
        hf_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if hf_cfg.get("tie_word_embeddings", True) is False:
            raise invalid(FIELD, str(source.root), "its GPT-2 has an untied lm_head; the built-in GPT ties the "
                                                   "head to the token embedding: use model.kind=hf for it")
        # causal-mask buffers of older GPT-2 files; the tied head (the embedding again)
        return (lambda n: from_gpt2_name(n) or from_gpt2_name("transformer." + n) or (n, False)), \
            (lambda n: bool(GPT2_IGNORED.search(n)) or n == "lm_head.weight")
    hf_model = getattr(model, "hf_model", model)
    ignore = [re.compile(p) for p in (getattr(hf_model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    return (lambda n: (n, False)), (lambda n: any(p.search(n) for p in ignore))


def plan(kind: str, source, model: nn.Module, path: str) -> list[Planned]:
    """What goes where; one error listing every missing, unexpected and
    shape-mismatched tensor."""
    index, entries = _targets(model)
    to_target, ignorable = _mapper(kind, source, model)
    planned, filled, unexpected, mismatched = [], set(), [], []
    for file in source.files:
        for name in source.names[file]:
            target, transpose = to_target(name)
            if target not in index:
                if not ignorable(name):
                    unexpected.append(name)
                continue
            i = index[target]
            if i in filled:  # a second name of a tied weight
                continue
            shape = source.shapes[name]
            shape = torch.Size(reversed(shape)) if transpose else shape
            want = _full_shape(entries[i][1])
            if shape != want:
                mismatched.append(f"{target} {tuple(shape)} in the file, {tuple(want)} in the model")
                continue
            filled.add(i)
            planned.append(Planned(file, name, target, transpose, entries[i][1]))
    missing = [names[0] for i, (names, _) in enumerate(entries) if i not in filled]
    missing = [n for n in missing if n not in {m.split(" ")[0] for m in mismatched}]
    if missing or unexpected or mismatched:
        def listed(what, items):
            more = f", +{len(items) - 4} more" if len(items) > 4 else ""
            return f"{what} {len(items)} ({'; '.join(items[:4])}{more})" if items else None
        parts = [x for x in (listed("missing", missing), listed("unexpected", unexpected),
                             listed("shape mismatch", mismatched)) if x]
        raise invalid(FIELD, path, f"its weights do not fit this model: {', '.join(parts)}; point init_from at "
                                   f"weights of this architecture and shape (model.preset or model.hf_name_or_path, "
                                   f"data.seq_len, data.tokenizer)")
    return planned


@torch.no_grad()
def load(model: nn.Module, kind: str, path: str) -> dict:
    """Fill `model` (whole or ZeRO-3 partitioned) from `path`. Collective
    under ZeRO-3: every rank calls it. Returns what was loaded and its sha256."""
    t0 = time.perf_counter()
    rank = dist.get_rank() if dist.is_initialized() else 0
    source = open_source(path)
    planned = plan(kind, source, model, path)
    digests, values = {}, 0
    for file in source.files:
        for item in (p for p in planned if p.file == file):
            if hasattr(item.tensor, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([item.tensor], modifier_rank=0):
                    if rank == 0:  # broadcast to the others and re-partitioned on leaving
                        digests[item.target] = _copy(source, item)
            else:
                digests[item.target] = _copy(source, item)
            values += _full_shape(item.tensor).numel()
        source.release()
    sha = hashlib.sha256("\n".join(f"{k} {digests[k]}" for k in sorted(digests)).encode()).hexdigest()
    return {"path": path, "tensors": len(planned), "values": values, "sha256": sha if rank == 0 else None,
            "seconds": time.perf_counter() - t0}


def _copy(source, item: Planned) -> str:
    t = source.read(item.file, item.source_name)
    t = (t.t() if item.transpose else t).to(item.tensor.dtype).contiguous()
    item.tensor.data.copy_(t)
    return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()
