"""Atomic, validated DeepSpeed checkpoints with client state.

Layout: RUN_DIR/checkpoints/step-00000100/ holds the DeepSpeed files, one
rank-XXXX.pt per rank (RNG and data-loader state) and mi_scale.json (client
state). A checkpoint is written under checkpoints/.partial-step-N/ and
renamed into place only after every rank finished and mi_scale.json was
fsynced: a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mi_scale.train.dist_env import barrier, device

META = "mi_scale.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot resume this run; the message says what to do."""


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


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json_durably(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, run_dir: Path, step: int, meta: dict, rank_state: dict, keep_last: int,
         kill_at: int | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path.
    `kill_at` (test-only, fault.kill_during_checkpoint) ends the process
    abruptly after the DeepSpeed files of that step are half-way written."""
    rank = dist.get_rank()
    root = checkpoint_dir(run_dir)
    tag = f"step-{step:08d}"
    partial = root / f".partial-{tag}"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
    torch.save(rank_state, partial / tag / f"rank-{rank:04d}.pt")
    if kill_at == step:
        os._exit(137)
    barrier()
    final = root / tag
    if rank == 0:
        _write_json_durably(partial / tag / META, {**meta, "step": step, "tag": tag})
        if final.exists():  # a re-save of the same step (e.g. after a restart)
            shutil.rmtree(final)
        os.replace(partial / tag, final)
        shutil.rmtree(partial, ignore_errors=True)
        for old in complete_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def check_compatible(meta: dict, world_size: int, ckpt: Path, training_keys: dict) -> None:
    """Refuse, before any training, a checkpoint this run cannot continue."""
    old = meta.get("training_keys", {})
    diff = sorted(k for k in set(old) | set(training_keys) if old.get(k) != training_keys.get(k))
    if diff:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a different configuration (differs in: "
            f"{', '.join(diff)}); resume with the run's own config.yaml, or start a new "
            f"run with another run.name")
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks but this run has {world_size}; "
            f"resume with cluster.num_workers={meta.get('world_size')} (ZeRO partitions optimizer state "
            f"per rank, and the data order is per-rank)")


def restore_nvme_resident_optimizer_state(engine, ckpt: Path, rank: int) -> None:
    """With the optimizer offloaded to NVMe, DeepSpeed's load_checkpoint only
    copies the swap files back (the fp32 master and Adam moments of swappable
    sub-groups) and skips the ZeRO optimizer file. What never lived in swap
    files would restart from scratch: each sub-group's Adam `step` (so the
    first resumed update used step-1 bias correction), and the whole state of
    sub-groups too small to swap. Restore exactly those from this rank's
    optim_states file; empty tensors there stand for swapped state."""
    zero = engine.optimizer
    files = sorted(ckpt.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
    if len(files) != 1:
        raise RuntimeError(f"expected one ZeRO optimizer file for rank {rank} in {ckpt}, found {len(files)}")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)["optimizer_state_dict"]
    inner = saved["optimizer_state_dict"]
    # Saved state ids follow param_groups order; ZeRO-3 appends its sub-groups'
    # fp32 partitions to their param group in sub-group order when saving.
    sub_groups = [s for g in range(len(zero.optimizer.param_groups))
                  for s, gid in sorted(zero.sub_group_to_group_id.items()) if gid == g]
    saved_ids = [i for g in inner["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(sub_groups):
        raise RuntimeError(f"{files[0]} has {len(saved_ids)} optimizer sub-groups, this model has {len(sub_groups)}")
    for sub_group, saved_id in zip(sub_groups, saved_ids):
        fp32 = zero.fp32_partitioned_groups_flat[sub_group]
        state = zero.optimizer.state[fp32]
        for key, value in inner["state"].get(saved_id, {}).items():
            if torch.is_tensor(value) and value.numel() == 0:
                continue  # swapped: already back from the swap files
            if torch.is_tensor(value) and torch.is_tensor(state.get(key)) and state[key].shape == value.shape:
                state[key].copy_(value)
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        master = saved["fp32_flat_groups"][sub_group]
        if master.numel() > 0 and fp32.numel() == master.numel():  # a resident (not swapped) sub-group
            fp32.data.copy_(master)
            zero.fp16_partitioned_groups_flat[sub_group].data.copy_(master)
            params = zero.fp16_partitioned_groups[sub_group]
            for param, value in zip(params, zero.unflatten(zero.fp16_partitioned_groups_flat[sub_group], params)):
                param.data = value.data


def load_latest(engine, run_dir: Path, world_size: int, training_keys: dict):
    """Load the newest checkpoint every rank can read; returns (meta, rank_state)
    or (None, None) when there is none. Corrupt checkpoints are skipped with
    a warning; incompatible ones raise CheckpointError."""
    rank = dist.get_rank()
    for ckpt in complete_checkpoints(run_dir):
        try:
            meta = json.loads((ckpt / META).read_text())
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping checkpoint {ckpt}: unreadable {META} ({e})")
            continue
        check_compatible(meta, world_size, ckpt, training_keys)
        ok, rank_state = True, None
        try:
            path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_lr_scheduler_states=True)
            if path is None:
                raise RuntimeError("DeepSpeed found no model states")
            if engine.zero_nvme_offload_optimizer():
                restore_nvme_resident_optimizer_state(engine, ckpt, rank)
            rank_state = torch.load(ckpt / f"rank-{rank:04d}.pt", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
            warnings.warn(f"skipping checkpoint {ckpt}: failed to load ({type(e).__name__}: {e})")
            ok = False
        # Every rank must agree, or ranks would resume from different steps.
        flag = torch.tensor([0 if ok else 1], device=device())
        dist.all_reduce(flag)
        if int(flag) == 0:
            return meta, rank_state
    return None, None
