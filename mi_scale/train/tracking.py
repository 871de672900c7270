"""Rank-0 tracking: metrics.jsonl (always), wandb (online/offline/disabled),
a periodic console progress line, and the per-layer MI heatmap PNG.

Metric names: `mi/<layerA>-><layerB>` is sketched MI in nats between the
k-dim sketches of two adjacent hooked layers (a lower bound-like proxy of the
layer MI; k = mi.sketch_dim). `mi_mean` is their mean.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from pathlib import Path

METRICS = "metrics.jsonl"
WANDB_ID = "wandb_id.txt"


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so every step
    appears exactly once in metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= after_step:
                keep.append(line)
        except (ValueError, KeyError):
            continue  # a torn last line from a crash
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def wandb_mode(requested: str) -> str:
    """online needs an API key; without one we fall back to offline."""
    if requested == "online" and not os.environ.get("WANDB_API_KEY"):
        print("[mi-scale] tracking.wandb=online but WANDB_API_KEY is not set: logging offline "
              "(sync later with `wandb sync RUN_DIR/wandb/offline-run-*`)", flush=True)
        return "offline"
    return requested


class Tracker:
    """Only rank 0 builds one; other ranks get `None` and log nothing."""

    def __init__(self, run_dir: Path, cfg_dict: dict, total_steps: int, start_step: int,
                 wandb_setting: str, project: str, group: str | None, heatmap_every: int):
        self.run_dir = Path(run_dir)
        self.metrics = open(self.run_dir / METRICS, "a")
        self.total_steps, self.start_step = total_steps, start_step
        self.heatmap_every = heatmap_every
        self.t0 = time.perf_counter()
        self.mi_history: dict[int, dict[str, float]] = {}
        for line in (self.run_dir / METRICS).read_text().splitlines():  # earlier segments of a resumed run
            row = json.loads(line)
            mi = {k[3:]: v for k, v in row.items() if k.startswith("mi/")}
            if mi:
                self.mi_history[row["step"]] = mi
        self.wandb = None
        self.mode = mode = wandb_mode(wandb_setting)
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / WANDB_ID
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=project, id=run_id, resume="allow", mode=mode,
                                    dir=str(self.run_dir), config=cfg_dict, group=group,
                                    name=cfg_dict["run"]["name"], settings=wandb.Settings(silent=True, console="off"))

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, step: int, row: dict) -> None:
        row = {"step": step, **row}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k not in ("step", "split")}, step=step)
        mi = {k[3:]: v for k, v in row.items() if k.startswith("mi/")}
        if mi:
            self.mi_history[step] = mi

    def progress(self, step: int, row: dict) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        mi = f" | MI {row['mi_mean']:.3f}" if "mi_mean" in row else ""
        mfu = f" | MFU {100 * row['mfu']:.1f}%" if "mfu" in row else ""
        from mi_scale.console import say
        say(f"step {step:>6}/{self.total_steps} | loss {row['loss']:.4f} | task {row['task_loss']:.4f}{mi} | "
            f"{row['samples_per_s']:.0f} samples/s{mfu} | ETA {_hms(eta)}")

    def heatmap(self, step: int, force: bool = False) -> Path | None:
        if not self.mi_history or (not force and step % self.heatmap_every):
            return None
        from mi_scale.plots import mi_heatmap

        steps = sorted(self.mi_history)
        pairs = list(self.mi_history[steps[-1]])
        values = [[self.mi_history[s].get(p, math.nan) for s in steps] for p in pairs]
        path = mi_heatmap(pairs, steps, values, self.run_dir / "plots" / "mi_heatmap.png",
                          title=f"sketched MI per adjacent layer pair (nats), step {step}")
        if self.wandb is not None:
            import wandb
            self.wandb.log({"mi_heatmap": wandb.Image(str(path))}, step=step)
        return path

    def log_model(self, path: Path, name: str, aliases: list[str], metadata: dict) -> None:
        """An exported model dir as a wandb model artifact: offline, a reference
        to the local files (wandb records their checksums, copies nothing);
        online, the files themselves."""
        if self.wandb is None:
            return
        import wandb

        art = wandb.Artifact(name, type="model", metadata=metadata)
        if self.mode == "offline":
            art.add_reference(f"file://{Path(path).resolve()}")
        else:
            art.add_dir(str(path))
        self.wandb.log_artifact(art, aliases=aliases)

    def close(self) -> None:
        self.metrics.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            # finish() returns once the run is marked done; the service may still be
            # writing run-<id>.wandb. teardown() waits for it to flush and stop, so the
            # file is complete when the worker returns (in-process callers read it).
            wandb.teardown()


def _hms(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
