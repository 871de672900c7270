"""Is the run dir one folder for every rank? Each rank's checkpoint shard goes
there and a resume (on any host) reads them all, so a run dir that each node
keeps on its own disk would lose shards silently. At start every rank writes
a probe file and lists the probes it sees: the ranks that see each other's
files share a run dir, and the lowest of them leads its checkpoints (renames
them into place, uploads them). A run dir that is not shared is refused,
unless cluster.storage_path carries the checkpoints (mi_scale/ckpt_storage.py).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from mi_scale.errors import UserError


@dataclass(frozen=True)
class RunDirView:
    leader: int  # the lowest rank that sees this rank's run dir: it leads the checkpoints written there
    shared: bool  # one run dir for all ranks (every leader is rank 0)


def check_shared(run_dir: Path, rank: int, world: int, token: str, storage_path: str | None = None) -> RunDirView:
    """A collective. Raises UserError on every rank when rank 0 misses another
    rank's probe and no storage_path is set."""
    if world == 1:
        return RunDirView(leader=0, shared=True)
    probes = run_dir / "logs"
    probes.mkdir(parents=True, exist_ok=True)
    mine = probes / f".probe-{token}-rank{rank}"
    mine.write_text(socket.gethostname())
    hosts = [None] * world
    dist.all_gather_object(hosts, _node_ip())  # also the barrier: every probe is written
    seen = [r for r in range(world) if (probes / f".probe-{token}-rank{r}").exists()]
    views = [None] * world
    dist.all_gather_object(views, seen)  # also the barrier: every rank has looked
    mine.unlink(missing_ok=True)
    missing = [r for r in range(world) if r not in views[0]]
    view = RunDirView(leader=min(views[rank]), shared=not missing)
    if view.shared or storage_path:
        if missing and rank == 0:
            from mi_scale import console
            console.say(f"[mi-scale] run.output_dir is not shared between nodes (rank 0 on {hosts[0]} does not "
                        f"see the files of {_where(missing, hosts)}): each node keeps its own run dir, and "
                        f"checkpoints go through cluster.storage_path={storage_path}")
        return view
    raise UserError(
        f"run.output_dir: {run_dir.parent} is not shared between nodes: rank 0 on {hosts[0]} does not see "
        f"the files of {_where(missing, hosts)}, so checkpoint shards would stay on each node; set "
        f"run.output_dir to a filesystem every node mounts at the same path (NFS, Lustre, a cloud file store), "
        f"or set cluster.storage_path (a folder every node sees, or s3:// / gs://) to carry the checkpoints")


def _where(ranks: list[int], hosts: list) -> str:
    return ", ".join(f"rank {r} on {hosts[r]}" for r in ranks)


def _node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return os.environ.get("HOSTNAME") or socket.gethostname()
