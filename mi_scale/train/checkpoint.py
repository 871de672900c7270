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
import pickle
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mi_scale.train.ckpt_files import (META, CheckpointError, UnsafeCheckpointError, checkpoint_dir,
                                      complete_checkpoints, load_rank_state, safe_deepspeed_loads, unsafe_message)
from mi_scale.train.dist_env import barrier, device
from mi_scale.train.reshard import universal_tag
from mi_scale.train.shared_dir import RunDirView


def rng_state() -> dict:
    """Tensors and plain types only, so rank files load with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
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
         kill_at: int | None = None, view: RunDirView = RunDirView(leader=0, shared=True)) -> Path:
    """Collective: every rank calls it. Returns the checkpoint's folder.
    `view`: which ranks share this rank's run dir (train/shared_dir.py). Its
    leader renames the files of the ranks that see the folder into place.
    A run dir that is not shared holds only its node's files: they stay under
    the .partial- name, which no resume reads, for the caller to upload to
    storage and delete (mi_scale/ckpt_storage.py); only rank 0's part gets
    mi_scale.json. `kill_at` (test-only, fault.kill_during_checkpoint) ends
    the process abruptly after the DeepSpeed files of that step are half-way
    written."""
    rank = dist.get_rank()
    lead = rank == view.leader
    root = checkpoint_dir(run_dir)
    tag = f"step-{step:08d}"
    partial = root / f".partial-{tag}"
    if lead:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / tag).mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(partial), tag=tag, save_latest=False)
    torch.save(rank_state, partial / tag / f"rank-{rank:04d}.pt")
    if kill_at == step:
        os._exit(137)
    barrier()
    final = root / tag
    if rank == 0:
        _write_json_durably(partial / tag / META, {**meta, "step": step, "tag": tag})
    if lead and view.shared:
        if final.exists():  # a re-save of the same step (e.g. after a restart)
            shutil.rmtree(final)
        os.replace(partial / tag, final)
        shutil.rmtree(partial, ignore_errors=True)
    if lead:  # a node-local run dir holds only whole checkpoints downloaded from storage
        for old in complete_checkpoints(run_dir)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final if view.shared else partial / tag


def check_compatible(meta: dict, world_size: int, ckpt: Path, training_keys: dict, elastic: bool = False) -> None:
    """Refuse, before any training, a checkpoint this run cannot continue.
    `elastic`: a change of world size is resharded (train/reshard.py); the
    per-rank batch may then differ as long as the global batch is the same."""
    old = meta.get("training_keys", {})
    diff = sorted(k for k in set(old) | set(training_keys) if old.get(k) != training_keys.get(k))
    if elastic and diff == ["data.batch_size"] and \
            old["data.batch_size"] * meta.get("world_size") == training_keys["data.batch_size"] * world_size:
        diff = []
    if diff:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by a different configuration (differs in: "
            f"{', '.join(diff)}); resume with the run's own config.yaml, or start a new "
            f"run with another run.name")
    if meta.get("world_size") != world_size and not elastic:
        raise CheckpointError(
            f"checkpoint {ckpt} was written by {meta.get('world_size')} ranks but this run has {world_size}; "
            f"resume with cluster.num_workers={meta.get('world_size')} (ZeRO partitions optimizer state "
            f"per rank, and the data order is per-rank)")


def restore_nvme_optimizer_state(engine, ckpt: Path, rank: int) -> None:
    """With the optimizer offloaded to NVMe, DeepSpeed's (0.19.8)
    load_checkpoint skips the ZeRO optimizer file and only copies the swap
    files back; a new process's swapper does not know those files hold Adam
    moments (it registers state tensors at the first step), so Adam restarted
    from zero moments at step 1, and at the initial lr (the param groups' lr
    comes back only with the optimizer file). Put the saved state back: the
    param groups' hyperparameters and per sub-group the Adam step (and any
    resident tensor) from this rank's optim_states file, the master and
    moments of swapped sub-groups from the checkpoint's swap files, then let
    DeepSpeed swap them out so its swapper tracks them."""
    zero = engine.optimizer
    files = sorted(ckpt.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
    if len(files) != 1:
        raise RuntimeError(f"expected one ZeRO optimizer file for rank {rank} in {ckpt}, found {len(files)}")
    saved = torch.load(files[0], map_location="cpu", weights_only=True)["optimizer_state_dict"]
    inner = saved["optimizer_state_dict"]
    # Saved state ids follow param_groups order; ZeRO-3 appends its sub-groups'
    # fp32 partitions to their param group in sub-group order when saving.
    sub_groups = [s for g in range(len(zero.optimizer.param_groups))
                  for s, gid in sorted(zero.sub_group_to_group_id.items()) if gid == g]
    saved_ids = [i for g in inner["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(sub_groups):
        raise RuntimeError(f"{files[0]} has {len(saved_ids)} optimizer sub-groups, this model has {len(sub_groups)}")
    # the param groups' live hyperparameters (the scheduled lr above all)
    for group, saved_group in zip(zero.optimizer.param_groups, inner["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    swap_dir = ckpt / "offloaded_tensors" / f"rank{rank:02d}"
    # swap files are named by the fp32 partition's ds_id "<first>_<last>" param
    # ids; a process that built other models first numbers them higher, so
    # match by order, not by name
    swap_ids = sorted((p.name.split(".")[0] for p in swap_dir.glob("*.tensor.swp") if "-" not in p.name),
                      key=lambda i: int(i.split("_")[0]))
    swappable = [s for s in range(len(zero.fp16_groups)) if zero._swappable_optimizer_subgroup(s)]
    if len(swap_ids) != len(swappable):
        raise RuntimeError(f"{swap_dir} has {len(swap_ids)} swapped sub-groups, this model has {len(swappable)}")
    swap_id_of = dict(zip(swappable, swap_ids))
    timers: set = set()
    for sub_group, saved_id in zip(sub_groups, saved_ids):
        fp32 = zero.fp32_partitioned_groups_flat[sub_group]
        saved_state = inner["state"].get(saved_id, {})
        if sub_group in swap_id_of:
            numel = zero.fp16_partitioned_groups_flat_numel[sub_group]

            def swapped(prefix: str) -> torch.Tensor:
                raw = np.fromfile(swap_dir / f"{prefix}{swap_id_of[sub_group]}.tensor.swp", dtype=np.float32, count=numel)
                return torch.from_numpy(raw).to(fp32.dtype)

            zero._prepare_sub_group(sub_group, timers)  # swap buffers in
            fp32.data.view(-1)[:numel].copy_(swapped(""))
            zero.optimizer.state[fp32] = {
                key: swapped(f"{key}-") if torch.is_tensor(value) and value.numel() == 0
                else value.clone() if torch.is_tensor(value) else value for key, value in saved_state.items()}  # empty tensors stand for swapped ones
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)  # the model's partitions from the master
            zero._release_sub_group(sub_group, timers)  # swaps master and moments out, now tracked
            continue
        zero.optimizer.state[fp32] = {k: v.clone() if torch.is_tensor(v) else v for k, v in saved_state.items()}
        master = saved["fp32_flat_groups"][sub_group]
        fp32.data.copy_(master)
        zero.fp16_partitioned_groups_flat[sub_group].data.copy_(master)
        params = zero.fp16_partitioned_groups[sub_group]
        for param, value in zip(params, zero.unflatten(zero.fp16_partitioned_groups_flat[sub_group], params)):
            param.data = value.data


def _load_deepspeed(engine, ckpt: Path, rank: int) -> None:
    """DeepSpeed's files of `ckpt`, through the universal format when the
    engine was built to reshard (train/reshard.py)."""
    tag = ckpt.name
    if engine.load_universal_checkpoint():
        tag = universal_tag(ckpt, rank)
    with safe_deepspeed_loads():
        path, _ = engine.load_checkpoint(str(ckpt.parent), tag=tag, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError("DeepSpeed found no model states")
        if engine.zero_nvme_offload_optimizer():
            restore_nvme_optimizer_state(engine, ckpt, rank)


def load_latest(engine, run_dir: Path, world_size: int, training_keys: dict, elastic: bool = False):
    """Load the newest checkpoint every rank can read; returns (meta, rank_state)
    or (None, None) when there is none. Corrupt checkpoints are skipped with
    a warning; incompatible or unsafe ones raise CheckpointError. `elastic`:
    the checkpoint may come from another world size (train/reshard.py); every
    rank then reads rank 0's file (the data position is global)."""
    rank = dist.get_rank()
    for ckpt in complete_checkpoints(run_dir):
        try:
            meta = json.loads((ckpt / META).read_text())
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping checkpoint {ckpt}: unreadable {META} ({e})")
            continue
        resharded = meta.get("world_size") != world_size
        check_compatible(meta, world_size, ckpt, training_keys, elastic=elastic)
        status, rank_state, unsafe = 0, None, None
        try:  # our own file first: a planted payload is refused before DeepSpeed reads anything
            rank_state = load_rank_state(ckpt / f"rank-{0 if resharded else rank:04d}.pt")
            _load_deepspeed(engine, ckpt, rank)
        except (UnsafeCheckpointError, pickle.UnpicklingError) as e:
            status, unsafe = 2, e
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
            warnings.warn(f"skipping checkpoint {ckpt}: failed to load ({type(e).__name__}: {e})")
            status = 1
        # Every rank must agree, or ranks would resume from different steps.
        flag = torch.tensor([status], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag) == 2:
            if isinstance(unsafe, UnsafeCheckpointError):
                raise unsafe
            raise UnsafeCheckpointError(unsafe_message(ckpt, unsafe) if unsafe else
                                        f"checkpoint {ckpt} holds a file another rank refused to unpickle "
                                        f"(see that rank's error); resume from a checkpoint you trust")
        if int(flag) == 0:
            return meta, rank_state
    return None, None
