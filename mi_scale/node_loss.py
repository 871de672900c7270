"""Losing a node during a Ray run: say so at once, then stop or carry on.

The workers report where each rank runs (network.py's backend puts a
"placement" event on the console queue). While the run goes, a thread of the
driver asks Ray every second which nodes are alive and prints one line as
soon as Ray marks a node that holds ranks dead.

When the run then fails:
- without cluster.elastic: one error line with the node, its ranks and the
  exact `mi-scale resume RUN_DIR --set cluster.num_workers=M` command (exit 1);
- with cluster.elastic: true, the driver does that resume itself, from the
  latest complete checkpoint, at the largest world size M >=
  cluster.min_workers that the nodes left can hold and that divides the global
  batch (the global batch is kept; train/reshard.py).

A node that comes back is not used by the run in progress: the run finishes
at the smaller size. To grow again, stop it (Ctrl-C writes a checkpoint) and
resume with the larger cluster.num_workers.
"""

from __future__ import annotations

import threading
import time

from mi_scale import console
from mi_scale.config import Config

POLL_S = 1.0
NODE_DEAD_WAIT_S = 30.0  # Ray's health checks mark a node dead within about this (GCS defaults)


class NodeWatch:
    """A driver thread that reports nodes holding ranks that Ray marks dead."""

    def __init__(self, relay):
        self.relay = relay  # relay.placement: [[node_id, ip], ...] by rank, once the group started
        self.lost: dict[str, str] = {}  # node id -> ip, in the order they were lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mi-scale-node-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.check()
            except Exception:  # Ray went away with the run: nothing more to watch
                return

    def check(self) -> None:
        import ray

        placement = self.relay.placement
        if not placement:
            return
        dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
        for node_id, ip in placement:
            if node_id in dead and node_id not in self.lost:
                self.lost[node_id] = ip
                console.say(f"[mi-scale] node {ip} lost (Ray marked it dead): it held {self.ranks_line(node_id)}")

    def ranks_of(self, node_id: str) -> list[int]:
        return [r for r, (n, _) in enumerate(self.relay.placement or []) if n == node_id]

    def ranks_line(self, node_id: str) -> str:
        ranks = self.ranks_of(node_id)
        return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {len(self.relay.placement)}"

    def wait_for_loss(self, seconds: float) -> bool:
        """After a failure: give Ray a few seconds to mark a lost node dead."""
        deadline = time.time() + seconds
        while not self.lost and time.time() < deadline:
            try:
                self.check()
            except Exception:
                return False
            time.sleep(POLL_S / 2)
        return bool(self.lost)

    def close(self) -> None:
        self._stop.set()

    def describe(self) -> str:
        return "; ".join(f"node {ip} lost with {self.ranks_line(n)}" for n, ip in self.lost.items())


def workers_that_fit(cfg: Config) -> int:
    """The largest world size M <= cluster.num_workers that the alive nodes can
    hold and that divides the global batch (0 when none >= cluster.min_workers)."""
    import ray

    c = cfg.cluster
    totals = ray.cluster_resources()  # alive nodes only
    fit = int(totals.get("CPU", 0) // c.cpus_per_worker)
    if c.use_gpu:
        fit = min(fit, int(totals.get("GPU", 0)))
    global_batch = cfg.data.batch_size * c.num_workers
    for m in range(min(fit, c.num_workers), c.min_workers - 1, -1):
        if m >= 1 and global_batch % m == 0:
            return m
    return 0


def after_failure(cfg: Config, run_dir, watch: NodeWatch, error: BaseException, process_lost: bool) -> int | None:
    """None when no node was lost (the caller reports the failure as usual);
    else the world size to continue on (cluster.elastic), or RunFailed."""
    from mi_scale.errors import RunFailed

    # a lost node shows first as workers whose process is gone; Ray marks the node dead soon after
    several_nodes = len({node for node, _ in watch.relay.placement or []}) > 1
    if not watch.lost and not (process_lost and several_nodes and watch.wait_for_loss(NODE_DEAD_WAIT_S)):
        return None
    c = cfg.cluster
    m = workers_that_fit(cfg)
    if c.elastic and m:
        return m
    if not m:
        raise RunFailed(f"{watch.describe()}: the run stopped; the nodes left cannot hold cluster.min_workers="
                        f"{c.min_workers} worker(s) that divide the global batch: add nodes, then "
                        f"`mi-scale resume {run_dir}`") from error
    hint = "" if c.elastic else ", or set cluster.elastic: true to do so automatically"
    raise RunFailed(f"{watch.describe()}: the run stopped; continue on the workers left with "
                    f"`mi-scale resume {run_dir} --set cluster.num_workers={m}` (the global batch is kept){hint}"
                    ) from error


def elastic_config(cfg: Config, run_dir, m: int) -> Config:
    """The config `mi-scale resume RUN_DIR --set cluster.num_workers=M` runs; the
    orchestrator resumes it in this driver. Built from the run's own config in
    memory, not RUN_DIR/config.yaml: with a run dir on each node's disk
    (ckpt_storage.py), the driver's copy may predate a resume's overrides."""
    from mi_scale.config import from_dict

    console.say(f"[mi-scale] elastic: continuing on {m} of {cfg.cluster.num_workers} workers from the latest "
                f"complete checkpoint, as `mi-scale resume {run_dir} --set cluster.num_workers={m}`")
    resumed = from_dict(cfg.to_dict())
    resumed.cluster.num_workers = m
    return resumed
