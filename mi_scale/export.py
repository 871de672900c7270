"""`mi-scale export RUN_DIR --out DIR`: a run's checkpoint as a Hugging Face model dir.

    DIR/config.json                      GPT2Config (built-in GPT) or the hf model's own config
    DIR/model-0000i-of-0000n.safetensors tensors, at most --max-shard-size bytes per file
    DIR/model.safetensors.index.json     tensor name -> file
    DIR/tokenizer files                  when the run used a Hugging Face tokenizer
    DIR/mi_scale_export.json             where it came from (run, step, tokenizer, checksum)

`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it: the
built-in GPT as GPT2LMHeadModel, an hf model as its own architecture. Tied
weights are written once (transformers ties them again on load).

Streaming: tensors are read one at a time from the memory-mapped
checkpoint (train/ckpt_reader.py) and written one at a time into each
shard, whose header is computed beforehand from the shapes; the checkpoint
files are unmapped every RELEASE_EVERY bytes read. The peak is about one
tensor plus those pages, whatever the shard size. The export is written into a
temporary dir beside --out and renamed into place when complete: a failure
leaves nothing in --out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from mi_scale import config as config_mod
from mi_scale import console
from mi_scale.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INDEX = "model.safetensors.index.json"
MANIFEST = "mi_scale_export.json"
RELEASE_EVERY = 256 * 2**20  # bytes of checkpoint read between unmappings of its files
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2e9 (decimal units as in transformers; KiB/MiB/GiB binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-shard-size: invalid value {text!r}: use a size like 2GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def run_config(run_dir: Path) -> config_mod.Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"RUN_DIR: invalid value {str(run_dir)!r}: it has no config.yaml; pass the folder "
                        f"of a mi-scale run (runs/<name>)")
    return config_mod.load(path)


def plan_names(cfg: config_mod.Config, shapes: dict) -> tuple[list[tuple[str, str, bool]], object]:
    """[(checkpoint name, exported name, transpose)] and the HF config, from the
    run's config and the checkpoint's tensor shapes (no data needed)."""
    prefix = "model."
    if cfg.model.kind == "gpt":
        from mi_scale.models import build_gpt
        from mi_scale.models.gpt2_format import gpt2_config, to_gpt2_name

        vocab, width = shapes[prefix + "tok_emb.weight"]
        seq_len = shapes[prefix + "pos_emb.weight"][0]
        twin = build_gpt(cfg.model.preset, vocab_size=vocab, seq_len=seq_len, device="meta")
        names = [(prefix + n, *to_gpt2_name(n)) for n, _ in twin.named_parameters()]
        return names, gpt2_config(twin.cfg)
    if cfg.model.kind == "hf":
        from mi_scale.models import build_hf
        from mi_scale.models.hf import load_hf_config

        hf_config = load_hf_config(cfg.model.hf_name_or_path)
        twin = build_hf(cfg.model.hf_name_or_path, device="meta")
        hf_config.architectures = [type(twin.hf_model).__name__]
        # named_parameters lists a tied weight once: it is written once
        names = [n for n, _ in twin.named_parameters()] + [n for n, _ in _persistent_buffers(twin)]
        return [(prefix + n, n, False) for n in names], hf_config
    raise UserError(f"model.kind: invalid value {cfg.model.kind!r}: export writes language models "
                    f"(model.kind gpt or hf); an mlp run has no Hugging Face format")


def _persistent_buffers(module: torch.nn.Module):
    for mod_name, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive tensors packed into files of at most max_bytes (a larger
    tensor gets a file of its own)."""
    shards: list[list[int]] = []
    used = max_bytes
    for i, size in enumerate(sizes):
        if used + size > max_bytes and (not shards or shards[-1]):
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def export(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
           max_shard_size: str = "2GB") -> dict:
    from mi_scale.models.weights import write_safetensors
    from mi_scale.train.ckpt_reader import CheckpointReader, pick_checkpoint

    t0 = time.perf_counter()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it fell back to CPU
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: invalid value {dtype!r}: use bf16 or fp32")
    max_bytes = parse_size(max_shard_size)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out: invalid value {str(out)!r}: it exists and is not an empty directory; "
                        f"export never overwrites: pass a new directory")
    cfg = run_config(run_dir)
    ckpt = pick_checkpoint(run_dir, step)
    reader = CheckpointReader(ckpt)  # checks that every rank's file is there before anything is written
    names, hf_config = plan_names(cfg, reader.shapes)
    missing = [src for src, _, _ in names if src not in reader.shapes]
    if missing:
        raise UserError(f"checkpoint {ckpt} lacks {len(missing)} of the model's tensors ({', '.join(missing[:5])}): "
                        f"it was not written by this run's model; export another run or step")
    out_dtype = DTYPES[dtype]
    sizes = [reader.shapes[src].numel() * out_dtype.itemsize for src, _, _ in names]
    shards = plan_shards(sizes, max_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    tmp = out.parent / f".partial-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        digest = hashlib.sha256()
        weight_map = {}
        read_since_release = 0

        def tensors(shard):
            nonlocal read_since_release
            for i in shard:
                src, dst, transpose = names[i]
                t = reader.tensor(src)
                t = (t.t() if transpose else t).to(out_dtype).contiguous()
                digest.update(dst.encode())
                digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                yield t
                read_since_release += reader.shapes[src].numel() * 4
                if read_since_release > RELEASE_EVERY:  # unmap: the pages read so far leave memory
                    reader.release()
                    read_since_release = 0

        for k, (shard, fname) in enumerate(zip(shards, files)):
            specs = []
            for i in shard:
                src, dst, transpose = names[i]
                shape = reader.shapes[src]
                specs.append((dst, out_dtype, torch.Size(reversed(shape)) if transpose else shape))
                weight_map[dst] = fname
            write_safetensors(tmp / fname, specs, tensors(shard), metadata={"format": "pt"})
            console.say(f"[mi-scale] export: {fname} ({sum(sizes[i] for i in shard) / 1e9:.2f} GB, "
                        f"shard {k + 1}/{len(shards)})")
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                                            indent=2))
        hf_config.dtype = str(out_dtype).replace("torch.", "")
        hf_config.save_pretrained(str(tmp))
        tokenizer = _write_tokenizer(cfg, tmp)
        manifest = {"run_dir": str(run_dir.resolve()), "checkpoint": ckpt.name, "step": int(ckpt.name.split("-")[1]),
                    "kind": cfg.model.kind, "tokenizer": tokenizer, "dtype": dtype, "tensors": len(names),
                    "bytes": sum(sizes), "sha256": digest.hexdigest(), "world_size": reader.world,
                    "zero_stage": reader.stage}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():  # an empty dir: replaced
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    console.say(f"[mi-scale] exported {ckpt.name} of {run_dir} to {out}: {len(names)} tensors, "
                f"{sum(sizes) / 1e9:.3f} GB {dtype} in {len(files)} file(s), {seconds:.1f} s, "
                f"peak RSS {peak / 2**30:.2f} GiB")
    return {**manifest, "out": str(out), "seconds": seconds, "peak_rss_bytes": peak}


def _write_tokenizer(cfg: config_mod.Config, out: Path) -> str:
    """The run's tokenizer files beside the weights; 'byte' needs none."""
    if cfg.data.tokenizer == "byte":
        return "byte"
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(cfg.data.tokenizer).save_pretrained(str(out))
    return "hf"


def log_model(tracker, run_dir: Path) -> Path:
    """tracking.log_model: the newest checkpoint exported to RUN_DIR/export/<step>/
    and logged as a wandb model artifact."""
    from mi_scale.train.ckpt_reader import pick_checkpoint

    ckpt = pick_checkpoint(Path(run_dir))
    out = Path(run_dir) / "export" / ckpt.name
    shutil.rmtree(out, ignore_errors=True)  # our own earlier export of this step (a re-run)
    summary = export(run_dir, out)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{Path(run_dir).name}-model")
    tracker.log_model(out, name, aliases=[ckpt.name, "latest"],
                      metadata={k: summary[k] for k in ("step", "kind", "dtype", "tensors", "bytes", "sha256")})
    return out
