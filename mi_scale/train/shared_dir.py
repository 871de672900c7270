"""Is the run dir one folder for every rank? Each rank's checkpoint shard goes
there and a resume (on any host) reads them all, so a run dir that each node
keeps on its own disk would lose shards silently. At start every rank writes
a probe file; rank 0 checks that it sees all of them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

from mi_scale.errors import UserError


def check_shared(run_dir: Path, rank: int, world: int, token: str) -> None:
    """Raises UserError on every rank when rank 0 misses another rank's probe. A collective."""
    if world == 1:
        return
    probes = run_dir / "logs"
    probes.mkdir(parents=True, exist_ok=True)
    mine = probes / f".probe-{token}-rank{rank}"
    mine.write_text(socket.gethostname())
    hosts = [None] * world
    dist.all_gather_object(hosts, _node_ip())  # also the barrier: every probe is written
    missing = [r for r in range(world) if not (probes / f".probe-{token}-rank{r}").exists()] if rank == 0 else []
    verdict = [missing]
    dist.broadcast_object_list(verdict, src=0)
    mine.unlink(missing_ok=True)
    missing = verdict[0]
    if missing:
        where = ", ".join(f"rank {r} on {hosts[r]}" for r in missing)
        raise UserError(
            f"run.output_dir: {run_dir.parent} is not shared between nodes: rank 0 on {hosts[0]} does not see "
            f"the files of {where}, so checkpoint shards would stay on each node; set run.output_dir to a "
            f"filesystem every node mounts at the same path (NFS, Lustre, a cloud file store)")


def _node_ip() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return os.environ.get("HOSTNAME") or socket.gethostname()
