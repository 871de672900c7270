"""Checkpoints through Ray Train's storage (cluster.storage_path: a folder, or
s3:// / gs://), on the workers and in the driver.

Which ranks share a run dir is found at start (train/shared_dir.py):
- One run dir for all ranks (shared filesystem): the run dir's checkpoints are
  the truth. Rank 0 reports each one and Ray Train copies it to storage.
- A run dir on each node's own disk (allowed only with storage_path): storage
  is the truth. Each node's first rank reports the files its node's ranks
  wrote (left under checkpoints/.partial-step-N/, which no resume reads),
  and Ray Train uploads them all into one checkpoint folder; rank 0 adds
  metrics.jsonl and config.yaml. Once uploaded, the node's part is deleted:
  a run dir only ever holds whole checkpoints.
On every start (restart, resume, elastic) each run dir's first rank
downloads Ray's latest stored checkpoint where it is newer than the run dir's
newest complete one, and the worker resumes from it as usual; rank 0 takes
the run's metrics.jsonl from it.
At the end the driver copies the final stored checkpoint and the run's files
into its own run dir if they are not there, so `mi-scale export RUN_DIR`
works on the host you launched from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from mi_scale.train.ckpt_files import META, checkpoint_dir, complete_checkpoints
from mi_scale.train.shared_dir import RunDirView

RUN_FILES = ("metrics.jsonl", "config.yaml")  # what a run dir needs besides checkpoints (rank 0 writes them)


def copy_in(stored, run_dir: Path, who: str) -> Path:
    """Ray's stored checkpoint as RUN_DIR/checkpoints/<its step tag>: downloaded
    aside, then renamed into place (a crash midway leaves no half checkpoint)."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    partial = root / f".partial-restore-{who}"
    shutil.rmtree(partial, ignore_errors=True)
    stored.to_directory(str(partial))
    dst = root / json.loads((partial / META).read_text())["tag"]
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(partial, dst)
    return dst


def take_run_files(ckpt: Path, run_dir: Path) -> None:
    """The run's files carried in a stored checkpoint: its config.yaml (the
    resolved config that wrote it), and its metrics.jsonl where the run dir's
    is missing or shorter."""
    if (ckpt / "config.yaml").is_file():
        shutil.copyfile(ckpt / "config.yaml", run_dir / "config.yaml")
    src, dst = ckpt / "metrics.jsonl", run_dir / "metrics.jsonl"
    if src.is_file() and (not dst.is_file() or _lines(dst) < _lines(src)):
        shutil.copyfile(src, dst)


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def _stored_step(stored) -> int:
    """The step of Ray's stored checkpoint, from its mi_scale.json alone (not the shards)."""
    with stored.filesystem.open_input_stream(f"{stored.path}/{META}") as f:
        return json.loads(f.read())["step"]


def _newest_step(run_dir: Path) -> int:
    found = complete_checkpoints(run_dir)
    return int(found[0].name.split("-")[1]) if found else -1


def restore(run_dir: Path, rank: int, view: RunDirView) -> bool:
    """On every worker, before it builds: where Ray's latest stored checkpoint
    is newer than the run dir's newest complete one, download it there
    (module docstring). A collective; returns whether Ray had a checkpoint."""
    import ray.train

    stored = ray.train.get_checkpoint()
    if stored is not None and rank == view.leader and _stored_step(stored) > _newest_step(run_dir):
        ckpt = copy_in(stored, run_dir, f"rank{rank}")
        if rank == 0:  # metrics.jsonl stays whole when rank 0 moved to another host
            take_run_files(ckpt, run_dir)
    dist.barrier()
    return stored is not None


def report(path: Path, run_dir: Path, step: int, metrics: dict, rank: int, view: RunDirView) -> None:
    """On every worker after each checkpoint (Ray Train synchronizes reports):
    the ranks that lead a run dir attach their folder of the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    uploads = rank == view.leader
    if uploads and rank == 0 and not view.shared:
        for name in RUN_FILES:
            shutil.copyfile(run_dir / name, path / name)
    headline = {k: metrics[k] for k in ("loss", "task_loss", "mi_mean", "eval_loss", "eval_accuracy") if k in metrics}
    ray.train.report({"step": step, **headline}, checkpoint=Checkpoint.from_directory(str(path)) if uploads else None)
    if uploads and not view.shared:
        shutil.rmtree(path.parent)  # .partial-step-N, uploaded (reports are synchronous): storage holds it now


def bring_home(stored, run_dir: Path) -> None:
    """In the driver, after the run: the final stored checkpoint and the run's
    files, where the driver's run dir lacks them (a run dir on each node's disk)."""
    if stored is None or _stored_step(stored) <= _newest_step(run_dir):
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    take_run_files(copy_in(stored, run_dir, "driver"), run_dir)
