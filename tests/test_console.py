"""The console of `mi-scale train`: our lines only, each once; library output
in RUN_DIR/logs/. Plus the driver-side merge of a failure and a resume into
one recovery line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mi_scale import bench, console

REPO = Path(__file__).resolve().parents[1]

# Every console line of a run is one of ours.
OURS = [
    r"\[mi-scale\] .+",                      # phases, checkpoints, resume/recovery, start-up summary
    r"step +\d+/\d+ \| loss .+ \| ETA .+",   # progress
    r"eval +\d+/\d+ \| eval_loss .+",         # eval
    r"== mi-scale run summary ==",
    r"  final eval_\w+ +[\d.]+",
    r"  sketched MI per adjacent pair \(nats\):",
    r"    blocks\.\d+->blocks\.\d+ +[\d.]+",
    r"  (config|metrics|checkpoints|wandb files|plots) +/.+",
    r"",
]
# Lines we cannot switch off: none in a run without failures.
ALLOWED: list[str] = []


def _command_env() -> dict:
    """A user's shell: no launcher variables, no Ray address, wandb offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(k, None)
    return env


def test_main_job_console_is_ours_only(tmp_path):
    steps = 20
    env = _command_env()
    r = subprocess.run([sys.executable, "-m", "mi_scale.cli", "train", "configs/mnist1d-mlp.yaml",
                        "--set", f"run.output_dir={tmp_path}", "--set", f"train.steps={steps}",
                        "--set", "train.log_every=5", "--set", "train.eval_every=10",
                        "--set", "train.checkpoint_every=10"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=850)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    foreign = [line for line in lines
               if not any(re.fullmatch(p, line) for p in OURS + ALLOWED)]
    assert foreign == []
    for step in range(5, steps + 1, 5):
        assert sum(line.startswith(f"step {step:>6}/{steps} |") for line in lines) == 1, step
    for phase in ("ray ready", "resources requested", "worker group started", "workers set up", "first step"):
        assert sum(line.startswith(f"[mi-scale] {phase} ") for line in lines) == 1, phase
    assert sum(line.startswith("[mi-scale] start-up: ") for line in lines) == 1
    # `mi-scale bench startup` reads that line: the phases add up to the total
    startup = bench._parse_startup(r.stdout)
    assert list(startup["phases_s"]) == ["ray ready", "resources requested", "worker group started",
                                         "worker group ready", "workers set up", "first step"]
    assert sum(startup["phases_s"].values()) == pytest.approx(startup["first_step_s"], abs=0.35)
    setup = next(line for line in lines if line.startswith("[mi-scale] workers set up "))
    assert re.search(r"\(\d+\.\d s: process group [\d.]+, data [\d.]+, model [\d.]+, engine [\d.]+, "
                     r"checkpoint and tracking [\d.]+, peak FLOP/s [\d.]+\)$", setup), setup
    # The library output went to the run's log files instead.
    logs = tmp_path / "mnist1d-mlp" / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == ["driver.log", "rank-0.log", "rank-1.log"]
    assert "Reporting training result" in (logs / "rank-0.log").read_text()  # Ray Train's own line


def test_ray_floor_command_reaches_its_first_step_without_our_work(tmp_path):
    """The floor `mi-scale bench startup` compares against: the same Ray
    start and worker group, workers that only join the process group."""
    env = _command_env()
    r = subprocess.run([sys.executable, "-m", "mi_scale.bench", "startup-floor", str(tmp_path / "floor")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    startup = bench._parse_startup(r.stdout)
    assert list(startup["phases_s"]) == ["ray ready", "resources requested", "worker group started",
                                         "worker group ready", "first step"]
    assert "[mi-scale] first step" in r.stdout and "(empty loop)" in r.stdout
    assert not (tmp_path / "floor" / "metrics.jsonl").exists()  # no training happened
    assert not (tmp_path / "floor" / "checkpoints").exists()


def test_relay_merges_failure_and_resume_into_one_line(capsys):
    relay = console.Relay(None, retries=2)  # no queue: items handed in directly
    relay.handle({"event": "failure", "rank": 1, "cause": "died (its process was killed or crashed)",
                  "attempt": 1, "retries": 2})
    relay.handle({"line": "step     60/100 | ..."})
    relay.handle({"event": "resumed", "step": 50, "line": "[mi-scale] resumed from X at step 50"})
    relay.handle({"event": "resumed", "step": 70, "line": "[mi-scale] resumed from Y at step 70"})
    relay.close()
    assert capsys.readouterr().out.splitlines() == [
        "step     60/100 | ...",
        "[mi-scale] worker rank 1 died (its process was killed or crashed); restarted the group "
        "(1 of 2 retries); resumed from step 50",
        "[mi-scale] resumed from Y at step 70",
    ]
    assert relay.recoveries == [
        "[mi-scale] worker rank 1 died (its process was killed or crashed); restarted the group "
        "(1 of 2 retries); resumed from step 50"]


def test_relay_prints_each_phase_once(capsys):
    relay = console.Relay(None, retries=1)
    for _ in range(2):  # a restarted group reaches the same phases again
        relay.handle({"event": "phase", "name": "worker group started", "at": console.T0 + 12.5, "detail": ""})
    out = capsys.readouterr().out.splitlines()
    assert out == ["[mi-scale] worker group started       12.5 s"]
    assert relay.phases == {"worker group started": pytest.approx(12.5)}
