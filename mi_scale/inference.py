"""A trained LM in one process, for looking at it: `mi-scale generate` and
`mi-scale eval`.

    lm = load_lm("runs/x")        # a run dir: its newest checkpoint, our model class
    lm = load_lm("export/x")      # an exported / any local HF dir: transformers' class
    logits_NTV = lm(idx_NT)

Sampling is our own loop on logits (no KV cache: these are small models, and
the same loop then serves both model classes): greedy at temperature 0,
else temperature, top-k and a torch.Generator seeded by --seed, so a seed
gives the same text every time.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mi_scale.errors import UserError


@dataclass
class LoadedLM:
    forward: Callable[[torch.Tensor], torch.Tensor]  # idx_NT -> logits_NTV
    tokenizer: object  # encode(text) / decode(ids) / separator, as mi_scale.data.tokens
    max_len: int  # positions the model takes
    source: str
    run_config: object = None  # the run's Config when loaded from a run dir

    def __call__(self, idx_NT: torch.Tensor) -> torch.Tensor:
        return self.forward(idx_NT)


def load_lm(path: str | Path) -> LoadedLM:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    p = Path(path)
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        return _from_run(p)
    if (p / "config.json").is_file():
        return _from_hf_dir(p)
    raise UserError(f"RUN_DIR|DIR: invalid value {str(path)!r}: neither a mi-scale run dir (config.yaml, "
                    f"checkpoints/) nor a model dir (config.json, from `mi-scale export`)")


def _from_run(run_dir: Path) -> LoadedLM:
    from mi_scale.data.tokens import load_tokenizer
    from mi_scale.export import run_config
    from mi_scale.models import build_gpt, build_hf
    from mi_scale.train.ckpt_reader import CheckpointReader, pick_checkpoint

    cfg = run_config(run_dir)
    ckpt = pick_checkpoint(run_dir)
    reader = CheckpointReader(ckpt)
    if cfg.model.kind == "gpt":
        vocab, _ = reader.shapes["model.tok_emb.weight"]
        seq_len = reader.shapes["model.pos_emb.weight"][0]
        model = build_gpt(cfg.model.preset, vocab_size=vocab, seq_len=seq_len)
        max_len = seq_len
    elif cfg.model.kind == "hf":
        model = build_hf(cfg.model.hf_name_or_path)
        max_len = _hf_max_len(model.config)
    else:
        raise UserError(f"model.kind: invalid value {cfg.model.kind!r}: generate and eval take language models "
                        f"(model.kind gpt or hf)")
    state = {k[len("model."):]: reader.tensor(k) for k in reader.shapes if k.startswith("model.")}
    reader.release()
    result = model.load_state_dict(state, strict=False)
    # a tied weight is one tensor in the checkpoint: its other names are not missing
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[n]) for n in state if n in params}
    bad = [n for n in result.missing_keys if id(params.get(n)) not in loaded] + result.unexpected_keys
    if bad:
        raise UserError(f"checkpoint {ckpt} does not fit the model of {run_dir / 'config.yaml'} "
                        f"({', '.join(bad[:5])}): pass the run dir that wrote it")
    model.eval()
    return LoadedLM(model, load_tokenizer(cfg.data.tokenizer), max_len, f"{ckpt}", cfg)


def _from_hf_dir(d: Path) -> LoadedLM:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Loading weights" bar is library chatter
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    manifest = json.loads((d / "mi_scale_export.json").read_text()) if (d / "mi_scale_export.json").is_file() else {}
    if manifest.get("tokenizer") == "byte":
        from mi_scale.data.tokens import ByteTokenizer
        tokenizer = ByteTokenizer()
    else:
        from mi_scale.data.tokens import load_tokenizer
        tokenizer = load_tokenizer(str(d))
    return LoadedLM(lambda idx: model(input_ids=idx, use_cache=False).logits, tokenizer,
                    _hf_max_len(model.config), str(d))


def _hf_max_len(hf_config) -> int:
    for key in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(hf_config, key, None), int):
            return getattr(hf_config, key)
    return 1 << 30


@torch.no_grad()
def generate(lm: LoadedLM, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0) -> list[int]:
    """The new tokens after `prompt_ids`; the context is the last max_len tokens."""
    if not prompt_ids:
        raise UserError("--prompt: invalid value '': give at least one character of prompt")
    g = torch.Generator().manual_seed(seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long)
    for _ in range(max_new_tokens):
        logits = lm(idx[:, -lm.max_len:])[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k > 0:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g))
        idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)
    return idx[0, len(prompt_ids):].tolist()


@torch.no_grad()
def evaluate(lm: LoadedLM, x_NT: torch.Tensor, y_NT: torch.Tensor, batch_size: int, progress: bool = True) -> dict:
    """Mean next-token loss (nats) and perplexity over all (x, y) windows."""
    from tqdm import tqdm

    total, count = 0.0, 0
    starts = range(0, len(x_NT), batch_size)
    for s in tqdm(starts, desc="eval", unit="batch", disable=not progress, file=sys.stderr):
        logits = lm(x_NT[s:s + batch_size])
        y = y_NT[s:s + batch_size]
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += y.numel()
    if count == 0:
        raise UserError("--data: invalid value: the text is shorter than one window of seq_len + 1 tokens; "
                        "give more text or a smaller --seq-len")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": count}


def text_windows(lm: LoadedLM, path: str, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A local text file as non-overlapping windows of seq_len + 1 tokens (x, and y
    shifted by one), as the training data cuts them (data/windows.py)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--data: invalid value {path!r}: not a file; pass a local text file")
    ids = np.asarray(lm.tokenizer.encode(p.read_text(encoding="utf-8", errors="replace")), dtype=np.int64)
    width = min(seq_len, lm.max_len) + 1
    rows = torch.from_numpy(ids[:len(ids) // width * width].reshape(-1, width))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
