"""Resume a checkpoint at another world size (N ranks wrote it, M ranks resume).

- The global batch is kept: data.batch_size becomes B*N/M. A change where
  B*N is not a multiple of M is refused before any work.
- ZeRO 1-3: the checkpoint is converted once with DeepSpeed's universal
  checkpoint (deepspeed.checkpoint.ds_to_universal) into step-N/universal/
  and loaded with `checkpoint.load_universal`, which slices every
  parameter's fp32 weights and Adam moments for the new partitioning: the
  optimizer state is resharded, not reset.
- ZeRO 0: every rank already holds the whole model and optimizer state, so the
  normal files load at any world size.
- Data: the position is counted in global batches (data/sharding.py), so
  rank 0's saved position continues the same global order on M ranks.
- RNG: N per-rank streams cannot map onto M ranks; each rank is reseeded
  deterministically from (seed, rank, step).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mi_scale.config import Config
from mi_scale.errors import UserError
from mi_scale.train.ckpt_files import META, complete_checkpoints, safe_deepspeed_loads
from mi_scale.train.dist_env import barrier

UNIVERSAL = "universal"


@dataclass
class Reshard:
    old_world: int
    new_world: int
    old_batch: int
    new_batch: int
    step: int

    def message(self) -> str:
        return (f"[mi-scale] resuming a {self.old_world}-rank checkpoint (step {self.step}) on {self.new_world} "
                f"ranks: data.batch_size {self.old_batch} -> {self.new_batch} per rank keeps the global batch "
                f"of {self.old_batch * self.old_world}; ZeRO state resharded")


def plan(cfg: Config, world: int) -> Reshard | None:
    """The reshard the newest checkpoint needs on `world` ranks, or None when
    there is none to do. Sets cfg.data.batch_size to keep the global batch;
    raises UserError for a change that cannot keep it."""
    for ckpt in complete_checkpoints(cfg.run_dir()):
        try:
            meta = json.loads((ckpt / META).read_text())
        except (OSError, ValueError):
            continue  # checkpoint.load_latest skips it with a warning
        old_world = meta.get("world_size")
        if old_world in (None, world):
            return None
        old_batch = meta.get("training_keys", {}).get("data.batch_size", cfg.data.batch_size)
        ds = cfg.deepspeed
        if "nvme" in (ds.offload_optimizer, ds.offload_params):
            raise UserError(
                f"cluster.num_workers: invalid value {world}: checkpoint {ckpt} was written by {old_world} ranks "
                f"with NVMe offload, whose optimizer state DeepSpeed cannot reshard; resume with "
                f"cluster.num_workers={old_world}")
        global_batch = old_batch * old_world
        if global_batch % world:
            fits = [m for m in range(1, global_batch + 1) if global_batch % m == 0 and m <= 64]
            raise UserError(
                f"cluster.num_workers: invalid value {world}: checkpoint {ckpt} was trained with a global batch "
                f"of {global_batch} (data.batch_size={old_batch} x {old_world} ranks), which {world} ranks cannot "
                f"split evenly; resume with a world size that divides {global_batch} "
                f"(e.g. cluster.num_workers in {fits[-6:]}), or start a new run")
        cfg.data.batch_size = global_batch // world
        return Reshard(old_world, world, old_batch, cfg.data.batch_size, int(meta["step"]))
    return None


def deepspeed_config(ds_conf: dict, cfg: Config) -> dict:
    """Load through the universal format at ZeRO 1-3."""
    if cfg.deepspeed.zero_stage > 0:
        ds_conf = {**ds_conf, "checkpoint": {**ds_conf.get("checkpoint", {}), "load_universal": True}}
    return ds_conf


def universal_tag(ckpt: Path, rank: int) -> str:
    """Collective: rank 0 converts `ckpt` once into ckpt/universal/ (kept
    for later resumes); returns the tag to load (relative to ckpt)."""
    out = ckpt / UNIVERSAL
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        partial = ckpt / f".partial-{UNIVERSAL}"
        shutil.rmtree(partial, ignore_errors=True)
        log = ckpt.parent.parent / "logs" / "reshard.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        args = Namespace(input_folder=str(ckpt), output_folder=str(partial), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        # its progress chatter goes to the run's log, not the console
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), \
                safe_deepspeed_loads():
            ds_to_universal.main(args)
        partial.rename(out)
    barrier()
    return f"{ckpt.name}/{UNIVERSAL}"


def reseed(seed: int, rank: int, step: int) -> None:
    """Per-rank RNG streams after a reshard: a function of (seed, rank, step) only."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
