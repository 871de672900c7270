"""The user-facing tools on real data: mi-check, bench, and a sweep of a
2x2 micro-grid through a real local Ray whose report numbers are recomputed
here from the runs' metrics.jsonl."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RAY_ADDRESS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "mi_scale.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_mi_check_prints_table_and_writes_plot(tmp_path):
    r = run_cli("mi-check", "--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0].split() == ["task", "estimator", "true", "estimate", "bias", "time_s"]
    rows = json.loads((tmp_path / "mi_check.json").read_text())
    gauss = [row for row in rows if row["estimator"] == "gaussian"]
    assert len(gauss) == 5
    for row in gauss:  # the table's numbers are the estimator's, within its tested accuracy
        assert abs(row["estimate"] - row["true_mi"]) <= 0.05 * row["true_mi"], row
        assert f"{row['estimate']:9.3f}" in r.stdout
    stair = [row for row in rows if row["task"].startswith("staircase")]
    assert all(row["estimate"] <= row["log_n"] + 1e-6 for row in stair)
    png = (tmp_path / "mi_check.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


@pytest.mark.slow
def test_bench_reports_ratios_and_gather_bytes(tmp_path):
    from mi_scale import bench

    rows = bench.mi_overhead(steps=2, ranks=[1], out_dir=str(tmp_path), log=lambda *a: None)
    by_case = {r["case"]: r for r in rows}
    # MLP: 256 samples x 1 token, 8 layers; GPT-5m: 32 samples x P=8 tokens, 6 layers of width 256.
    assert by_case["mlp"]["sketch_bytes_per_step"] == 256 * 64 * 8 * 4
    assert by_case["mlp"]["raw_bytes_per_step"] == 256 * 128 * 8 * 4
    assert by_case["gpt-5m"]["sketch_bytes_per_step"] == 32 * 8 * 64 * 6 * 4
    assert by_case["gpt-5m"]["raw_bytes_per_step"] == 32 * 8 * 256 * 6 * 4
    for r in rows:
        # the medians are the raw timed steps' (2 per variant); no bound on the ratio
        # itself: a timing on a shared machine is not a test
        with_ms, without_ms = r["step_ms_with"], r["step_ms_without"]
        assert len(with_ms) == len(without_ms) == 2 and min(with_ms + without_ms) > 0
        assert r["median_ms_with"] == pytest.approx((with_ms[0] + with_ms[1]) / 2, rel=1e-12)
        assert r["median_ms_without"] == pytest.approx((without_ms[0] + without_ms[1]) / 2, rel=1e-12)
        assert r["ratio_of_medians"] == pytest.approx(sum(with_ms) / sum(without_ms), rel=1e-12)
        paired = sorted(a / b for a, b in zip(with_ms, without_ms))
        assert r["median_of_paired_ratios"] == pytest.approx((paired[0] + paired[1]) / 2, rel=1e-12)
    assert json.loads((tmp_path / "bench.json").read_text()) == rows


def _final(path: Path, key: str, split: str):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split and key in r][-1][key]


@pytest.mark.slow
def test_sweep_micro_grid_through_ray_and_report_numbers(tmp_path):
    out = tmp_path / "sweep"
    r = run_cli("sweep", str(REPO / "configs/paper/micro.yaml"), "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    # the console is the sweep's own lines: header, one per trial, totals, report
    ours = (r"\[mi-scale\] .+", r"\[\d+/4\] [\w.-]+: ok in \d+ s \(cpu \d+ s\) \| ETA \d+ s", r"wrote .+report\.md")
    assert [line for line in (r.stdout + r.stderr).splitlines()
            if not any(re.fullmatch(p, line) for p in ours)] == []
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "report")
    assert runs == ["baseline-s0", "baseline-s1", "gauss-w0.1-s0", "gauss-w0.1-s1"]
    report = out / "report"
    for png in ("train_loss.png", "test_accuracy.png", "mi_pairs.png", "mi_heatmap.png", "final_mi_by_arm.png"):
        data = (report / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, png
    summary = json.loads((report / "summary.json").read_text())
    md = (report / "report.md").read_text()
    for arm in ("baseline", "gauss-w0.1"):
        accs = [_final(out / f"{arm}-s{s}", "eval_accuracy", "eval") for s in (0, 1)]
        a = summary["arms"][arm]
        assert a["final_metric_per_seed"] == accs
        assert a["final_metric_mean"] == pytest.approx(statistics.mean(accs))
        assert a["final_metric_std"] == pytest.approx(statistics.stdev(accs))
        mis = []
        for s in (0, 1):
            last = [json.loads(x) for x in (out / f"{arm}-s{s}" / "metrics.jsonl").read_text().splitlines()
                    if '"mi/' in x][-1]
            vals = [v for k, v in last.items() if k.startswith("mi/") and math.isfinite(v)]
            mis.append(sum(vals) / len(vals))
        assert a["final_mi_mean"] == pytest.approx(statistics.mean(mis))
        assert f"{statistics.mean(accs):.3f}" in md
    # re-running a finished sweep skips every trial and rewrites the same report
    again = run_cli("sweep", str(REPO / "configs/paper/micro.yaml"), "--output-dir", str(out))
    assert again.returncode == 0 and "4 trials, 4 already finished" in again.stdout
