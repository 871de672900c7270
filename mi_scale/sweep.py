"""`mi-scale sweep GRID`: every (arm, seed) of a grid as a parallel Ray trial.

Each trial is one Ray task (1 CPU) running `mi-scale train --launcher local
--resume` in a fresh process, so DeepSpeed and process-group state never
leak between trials, an interrupted sweep re-run continues where it stopped,
and finished trials are skipped. Trial logs go to RUN_DIR/train.log. When all
trials are done the report is written to OUTPUT_DIR/report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mi_scale.config import ConfigError, load


def _finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    last = [json.loads(line) for line in path.read_text().splitlines()[-3:]]
    return any(r.get("step") == steps and r.get("split") == "eval" for r in last)


def _trial(overrides: list[str], run_dir: str) -> tuple[int, float, float]:
    """Runs inside a Ray task: one training run in a fresh process.
    Returns (exit code, wall seconds, CPU seconds of the run's processes).
    CPU seconds hardly depend on what else the machine runs, so their sum
    over trials / cores estimates the sweep's wall time on an idle machine."""
    import resource

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("WANDB_MODE", "offline")
    args = [sys.executable, "-m", "mi_scale.cli", "train", "--launcher", "local", "--resume"]
    for ov in overrides:
        args += ["--set", ov]
    def cpu() -> float:
        u = resource.getrusage(resource.RUSAGE_CHILDREN)
        return u.ru_utime + u.ru_stime

    t0, c0 = time.perf_counter(), cpu()
    with open(Path(run_dir) / "train.log", "a") as log:
        rc = subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.perf_counter() - t0, cpu() - c0


def run_grid(grid: str | list[str], output_dir: str = "runs/sweep", address: str | None = None,
             parallel: int | None = None, overrides: list[str] | None = None, verbose: bool = False) -> int:
    """Run every trial of one grid or several (their trials share one queue,
    in the order given; run names must not repeat across grids)."""
    import sys

    if not address and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # as orchestrate.run: no token warning
    import ray

    from mi_scale.report import expand_grid, write_report

    grids = [grid] if isinstance(grid, str) else list(grid)
    runs, seen = [], {}
    for g in grids:
        for name, group, ov in expand_grid(g):
            if name in seen:
                raise ConfigError(f"{g}: run {name!r} is also in {seen[name]}: rename the arm in one grid")
            seen[name] = g
            ov = ov + [f"run.output_dir={output_dir}"] + list(overrides or [])
            cfg = load(None, ov)  # validated here: a bad override fails before anything starts
            runs.append((name, ov, cfg.run_dir(), cfg.train.steps))
    todo = [r for r in runs if not _finished(r[2], r[3])]
    print(f"[mi-scale] sweep {' '.join(grids)}: {len(runs)} trials, {len(runs) - len(todo)} already finished",
          flush=True)

    if todo:
        cpus = os.cpu_count() or 1
        # trials write their own train.log; nothing of theirs or Ray's belongs on
        # the console unless --verbose (as orchestrate.start_ray)
        quiet = {"logging_level": "WARNING", "log_to_driver": verbose,
                 "logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")}
        if address:
            ray.init(address=address, **quiet)
        else:
            if parallel is not None and parallel < 1:
                raise ConfigError(f"--parallel: invalid value {parallel}: use at least 1")
            ray.init(num_cpus=min(parallel or cpus, cpus), include_dashboard=False,
                     _temp_dir=f"/tmp/ray-mi-sweep-{os.getpid()}", **quiet)
        task = ray.remote(num_cpus=1)(_trial)
        t0 = time.perf_counter()
        pending = {task.remote(ov, str(run_dir)): (name, run_dir) for name, ov, run_dir, _ in todo}
        failed = []
        done, cpu_total = 0, 0.0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                name, run_dir = pending.pop(ready[0])
                rc, secs, cpu_s = ray.get(ready[0])
                done += 1
                cpu_total += cpu_s
                status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {run_dir / 'train.log'})"
                eta = (time.perf_counter() - t0) / done * len(pending)
                print(f"[{done}/{len(todo)}] {name}: {status} in {secs:.0f} s (cpu {cpu_s:.0f} s) | "
                      f"ETA {eta:.0f} s", flush=True)
                if rc != 0:
                    failed.append(name)
        finally:
            ray.shutdown()
        slots = min(parallel or os.cpu_count() or 1, os.cpu_count() or 1)
        print(f"[mi-scale] {done} trial(s) in {time.perf_counter() - t0:.0f} s wall, {cpu_total:.0f} CPU s: "
              f"about {cpu_total / slots:.0f} s on {slots} idle core(s)", flush=True)
        if failed:
            print(f"[mi-scale] {len(failed)} trial(s) failed: {', '.join(failed)}; the report covers the rest",
                  flush=True)
    ok = [str(r[2]) for r in runs if _finished(r[2], r[3])]
    if not ok:
        print("error: no trial finished; nothing to report", file=sys.stderr)
        return 1
    report = write_report(ok, Path(output_dir) / "report")
    print(f"wrote {report}", flush=True)
    return 0 if len(ok) == len(runs) else 1
