"""Measuring a plan against a real run on this machine: the peak RSS of the
largest rank, and the README's validation table (`python -m mi_scale.plan`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from mi_scale import config as config_mod
from mi_scale.config import Config
from mi_scale.errors import UserError
from mi_scale.plan.planner import plan, with_overrides
from mi_scale.plan.units import fmt_bytes, fmt_count


def measure(cfg: Config, timeout: float = 3600, env: Optional[dict] = None, max_steps: int = 4) -> dict:
    """Run `cfg` for real on this machine (cluster.num_workers ranks under
    torchrun, CPU; at most `max_steps` steps and one eval batch: the peak is
    reached by the second step) and return the peak RSS of the largest rank:
    each rank's own peak RSS (VmHWM), max over ranks, as the worker logs it on every
    train row (`peak_mem_mb_max_rank`). Read from the ranks themselves, not
    from the process tree, so that no other descendant (a compiler building
    a DeepSpeed op, say) can count. The run writes to a temporary directory,
    wandb disabled."""
    from mi_scale.train.dist_env import free_port

    W = cfg.cluster.num_workers
    with tempfile.TemporaryDirectory(prefix="mi-scale-plan-") as tmp:
        run_cfg = with_overrides(cfg, [f"run.output_dir={tmp}", "tracking.wandb=disabled", "cluster.use_gpu=false",
                              f"train.steps={min(max_steps, cfg.train.steps)}", "train.eval_batches=1"])
        path = Path(tmp) / "config.yaml"
        config_mod.save(run_cfg, path)
        e = {**os.environ, **(env or {})}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        e.setdefault("OMP_NUM_THREADS", "1")
        log = Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(W),
               "--master_port", str(free_port()), "-m", "mi_scale.train.worker", str(path)]
        t0 = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=e)
            try:
                while True:
                    pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        break
                    if time.monotonic() - t0 > timeout:
                        raise TimeoutError
                    time.sleep(0.2)
            except BaseException:  # timeout or Ctrl-C: torchrun passes SIGTERM on to its ranks
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise UserError(f"the measured run failed (exit {proc.returncode}): {tail}")
        rows = [json.loads(x) for x in (Path(tmp) / run_cfg.run.name / "metrics.jsonl").read_text().splitlines()]
        peak_mb = max(r["peak_mem_mb_max_rank"] for r in rows if r.get("split") == "train")
    return {"peak_bytes": int(peak_mb * 2**20), "wall_s": wall, "world_size": W}


# The README's validation table: (label, config, overrides); run one at a time.
VALIDATION = [
    ("gpt-1m  ZeRO-2 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-1m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=2"]),
    ("gpt-5m  ZeRO-2 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=2"]),
    ("gpt-5m  ZeRO-3 B8 T64", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=8", "data.seq_len=64", "deepspeed.zero_stage=3"]),
    ("gpt-5m  ZeRO-2 B32 T256", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=32", "data.seq_len=256", "deepspeed.zero_stage=2"]),
    ("gpt-125m ZeRO-2 B8 T128", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=8", "data.seq_len=128", "deepspeed.zero_stage=2"]),
    ("gpt-125m ZeRO-3 B4 T128", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=4", "data.seq_len=128", "deepspeed.zero_stage=3",
      "mi.sketch_dim=16"]),
    ("gpt-5m  ZeRO-2 B32 T256 ckpt", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-5m", "data.batch_size=32", "data.seq_len=256", "deepspeed.zero_stage=2",
      "train.activation_checkpointing=true"]),
    ("gpt-125m ZeRO-3 B8 T128 ckpt", "configs/tiny-gpt-text.yaml",
     ["model.preset=gpt-125m", "data.batch_size=8", "data.seq_len=128", "deepspeed.zero_stage=3",
      "train.activation_checkpointing=true"]),
]
VALIDATION_COMMON = ["train.steps=4", "train.eval_batches=1", "train.log_every=1", "tracking.wandb=disabled"]


def validate(cases=None, repo: Optional[Path] = None, env: Optional[dict] = None, out=sys.stdout) -> list[dict]:
    """Predicted vs measured for each case, one run at a time, as a markdown table."""
    repo = repo or Path(__file__).resolve().parents[2]
    rows = []
    print("| run | params | predicted | measured | error |", file=out)
    print("|---|---|---|---|---|", file=out)
    for label, path, overrides in cases or VALIDATION:
        cfg = config_mod.load(repo / path, overrides + VALIDATION_COMMON)
        pl = plan(cfg, advise=False)
        got = measure(cfg, env=env)
        err = pl.per_rank_peak_bytes / got["peak_bytes"] - 1
        rows.append({"run": label, "params": pl.params, "predicted_bytes": pl.per_rank_peak_bytes,
                     "measured_bytes": got["peak_bytes"], "error": err})
        print(f"| {label} | {fmt_count(pl.params)} | {fmt_bytes(pl.per_rank_peak_bytes)} | {fmt_bytes(got['peak_bytes'])} "
              f"| {100 * err:+.1f}% |", file=out, flush=True)
    return rows
