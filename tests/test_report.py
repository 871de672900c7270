"""Report and grid tests on fabricated run directories with known numbers.

Every expected number is recomputed here straight from the metrics.jsonl the
test wrote, independently of mi_scale.report's own aggregation.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats

from mi_scale import config, plots
from mi_scale.report import ReportError, expand_grid, load_run, write_report

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["blocks.0->blocks.1", "blocks.1->blocks.2", "blocks.2->blocks.3"]
PNGS = ["train_loss.png", "test_accuracy.png", "mi_pairs.png", "mi_heatmap.png", "final_mi_by_arm.png"]
EVAL_STEPS = list(range(25, 201, 25))


def make_run(root: Path, arm: str, seed: int, final_acc: float, tau: float, mi_level: float,
             weight: float = 0.0, lm: bool = False) -> Path:
    """A run dir as the trainer writes it: accuracy rising as
    final_acc * (1 - exp(-step / tau)), MI per pair around mi_level, MI
    logged every 20 steps, one NaN MI value in the last MI row."""
    name = f"{arm}-s{seed}"
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = config.load(None, [f"run.name={name}", f"run.group={arm}", f"run.seed={seed}",
                             f"mi.weight={weight}", "model.depth=4"])
    config.save(cfg, run_dir / "config.yaml")
    rng = np.random.default_rng(seed + 100 * int(final_acc * 100))
    lines = []
    for step in range(0, 201, 5):
        if step % 10 == 0:
            task = 2.3 * math.exp(-step / 80) + 0.1 * rng.random()
            row = {"step": step, "split": "train", "loss": task - weight, "task_loss": task,
                   "mi_loss": -weight, "lr": 1e-3, "grad_norm": 1.0, "samples_per_s": 1000.0,
                   "step_time_s": 0.01 + 0.001 * rng.random()}
            if step % 20 == 0:
                for i, p in enumerate(PAIRS):
                    row[f"mi/{p}"] = mi_level * (1 + 0.1 * i) + 0.05 * rng.random()
                if step == 200:
                    row[f"mi/{PAIRS[1]}"] = float("nan")  # final MI must skip it
            lines.append(row)
        if step in EVAL_STEPS:
            acc = final_acc * (1 - math.exp(-step / tau))
            ev = {"step": step, "split": "eval", "eval_loss": 2.0 - acc}
            ev.update({"eval_ppl": math.exp(2.0 - acc)} if lm else {"eval_accuracy": acc})
            lines.append(ev)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def run_eval(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if r["split"] == "eval"), key=lambda r: r["step"])


def recompute(run_dirs: list[Path]) -> dict:
    """Per-arm numbers straight from the jsonl files."""
    per_run = {}
    for d in run_dirs:
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        arm = yaml.safe_load((d / "config.yaml").read_text())["run"]["group"]
        ev = sorted((r for r in rows if r["split"] == "eval"), key=lambda r: r["step"])
        mi = {}
        for p in PAIRS:
            vals = [r[f"mi/{p}"] for r in rows if r["split"] == "train" and f"mi/{p}" in r]
            mi[p] = [v for v in vals if math.isfinite(v)][-1]
        per_run[d] = dict(arm=arm, eval=ev, final=ev[-1]["eval_accuracy"], mi=mi,
                          mean_mi=statistics.fmean(mi.values()))
    arms = {}
    for r in per_run.values():
        arms.setdefault(r["arm"], []).append(r)
    target = 0.9 * max(statistics.fmean(r["final"] for r in rs) for rs in arms.values())
    out = {}
    for arm, rs in arms.items():
        finals = [r["final"] for r in rs]
        steps = [next((e["step"] for e in r["eval"] if e["eval_accuracy"] >= target), None) for r in rs]
        reached = [s for s in steps if s is not None]
        out[arm] = dict(
            finals=finals, mean=statistics.fmean(finals), std=statistics.stdev(finals),
            steps_mean=statistics.fmean(reached) if reached else None, n_reached=len(reached),
            mi_mean=statistics.fmean(r["mean_mi"] for r in rs),
            mi_std=statistics.stdev(r["mean_mi"] for r in rs),
            mi_pair={p: statistics.fmean(r["mi"][p] for r in rs) for p in PAIRS})
    return {"target": target, "arms": out}


@pytest.fixture
def two_arms(tmp_path):
    """baseline (~0.61 final, slow) vs gauss-w0.1 (~0.81 final, fast), 3 seeds each."""
    dirs = [make_run(tmp_path / "runs", "baseline", s, acc, 90.0, 0.5)
            for s, acc in enumerate([0.60, 0.62, 0.61])]
    dirs += [make_run(tmp_path / "runs", "gauss-w0.1", s, acc, 30.0, 1.5, weight=0.1)
             for s, acc in enumerate([0.80, 0.83, 0.81])]
    return dirs


@pytest.fixture
def saved_figures(monkeypatch):
    """{png name: the matplotlib figure written to it}: every plot goes through
    plots._save, which still writes the file."""
    figures = {}
    real_save = plots._save

    def spy(fig, path):
        figures[Path(path).name] = fig
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return figures


def test_report_numbers_plots_and_verdict(two_arms, tmp_path, saved_figures):
    out = tmp_path / "report"
    report = write_report(two_arms, out)
    assert report == out / "report.md"
    assert sorted(saved_figures) == sorted(PNGS)
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    summary = json.loads((out / "summary.json").read_text())
    expect = recompute(two_arms)
    # what the plots draw: each arm's mean eval curve over seeds, its mean MI per
    # pair and logged step (the NaN of the last row grey), its final MI per pair
    (ax,) = saved_figures["test_accuracy.png"].axes
    curves = {line.get_label(): line for line in ax.lines}
    assert sorted(curves) == ["baseline", "gauss-w0.1"]
    for arm, line in curves.items():
        assert list(line.get_xdata()) == EVAL_STEPS
        mean_curve = np.mean([[e["eval_accuracy"] for e in run_eval(d)] for d in two_arms
                              if d.name.startswith(arm + "-s")], axis=0)
        np.testing.assert_allclose(line.get_ydata(), mean_curve, rtol=1e-12)
    heat_axes = [a for a in saved_figures["mi_heatmap.png"].axes if a.get_title()]  # not the colorbar
    assert [a.get_title() for a in heat_axes] == ["baseline", "gauss-w0.1"]
    for a in heat_axes:
        v_PS = a.collections[0].get_array()
        assert v_PS.shape == (len(PAIRS), 11)  # MI logged every 20 steps, 0..200
        assert list(np.flatnonzero(np.ma.getmaskarray(v_PS))) == [1 * 11 + 10]  # pair 1 at step 200
        arm_runs = [d for d in two_arms if d.name.startswith(a.get_title() + "-s")]
        first = np.mean([[json.loads(r)[f"mi/{p}"] for p in PAIRS]
                         for d in arm_runs for r in (d / "metrics.jsonl").read_text().splitlines()[:1]], axis=0)
        np.testing.assert_allclose(v_PS[:, 0], first, rtol=1e-12)  # step 0 column
    bars = [p.get_height() for p in saved_figures["final_mi_by_arm.png"].axes[0].patches]
    np.testing.assert_allclose(sorted(bars), sorted(v for arm in ("baseline", "gauss-w0.1")
                                                    for v in expect["arms"][arm]["mi_pair"].values()), rtol=1e-9)
    assert summary["baseline"] == "baseline"
    assert summary["metric"] == {"key": "eval_accuracy", "higher_is_better": True}
    assert summary["target"]["value"] == pytest.approx(expect["target"])
    md = report.read_text()
    for arm, e in expect["arms"].items():
        s = summary["arms"][arm]
        assert s["n_seeds"] == 3
        assert s["final_metric_mean"] == pytest.approx(e["mean"])
        assert s["final_metric_std"] == pytest.approx(e["std"])
        assert s["steps_to_target_mean"] == (
            None if e["steps_mean"] is None else pytest.approx(e["steps_mean"]))
        assert s["n_reached"] == e["n_reached"]
        assert s["final_mi_mean"] == pytest.approx(e["mi_mean"])
        assert s["final_mi_std"] == pytest.approx(e["mi_std"])
        assert s["final_mi_per_pair"] == pytest.approx(e["mi_pair"])
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm}"))
        assert f"{e['mean']:.4f} ± {e['std']:.4f}" in row
        assert f"{e['mi_mean']:.4f} ± {e['mi_std']:.4f}" in row
        steps = "–" if e["steps_mean"] is None else f"{e['steps_mean']:.0f}"
        assert f"| {steps} | {e['n_reached']}/3 reached" in row
    # The synthetic baseline never reaches 0.9 x 0.813; the good arm always does.
    assert expect["arms"]["baseline"]["n_reached"] == 0
    assert expect["arms"]["gauss-w0.1"]["n_reached"] == 3

    c = summary["comparisons"]["gauss-w0.1"]
    good, base = expect["arms"]["gauss-w0.1"]["finals"], expect["arms"]["baseline"]["finals"]
    ci = stats.ttest_ind(good, base, equal_var=False).confidence_interval(0.95)
    assert c["diff"] == pytest.approx(statistics.fmean(good) - statistics.fmean(base))
    assert c["ci95"] == pytest.approx([ci.low, ci.high])
    pooled = math.sqrt((statistics.variance(good) + statistics.variance(base)) / 2)
    assert c["cohens_d"] == pytest.approx(c["diff"] / pooled)
    assert c["verdict"] == "helped"
    verdict = next(line for line in md.splitlines() if line.startswith("- gauss-w0.1:"))
    assert "helped" in verdict and "higher" in verdict
    assert "sketched" in md and "nats" in md
    assert "`mi.weight`: 0.0 → 0.1" in md
    assert "No arm with 'shallow'" in md


def test_same_numbers_are_inconclusive(tmp_path):
    dirs = [make_run(tmp_path / "runs", arm, s, acc, 50.0, 1.0)
            for arm in ("baseline", "copy") for s, acc in enumerate([0.60, 0.66, 0.63])]
    write_report(dirs, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    c = summary["comparisons"]["copy"]
    assert c["diff"] == pytest.approx(0.0, abs=1e-12)
    assert c["ci95"][0] < 0 < c["ci95"][1]
    assert c["verdict"] == "inconclusive"
    md = (tmp_path / "out" / "report.md").read_text()
    verdict = next(line for line in md.splitlines() if line.startswith("- copy:"))
    assert "inconclusive" in verdict and "contains 0" in verdict


def test_worse_arm_hurt_and_shallow_anchor(tmp_path):
    dirs = [make_run(tmp_path, "baseline", s, a, 50.0, 1.0) for s, a in enumerate([0.60, 0.62, 0.61])]
    dirs += [make_run(tmp_path, "shallow-mlp", s, a, 50.0, 1.0) for s, a in enumerate([0.40, 0.41, 0.43])]
    write_report([tmp_path], tmp_path / "out")  # a folder of runs stands for its runs
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # shallow-mlp also has weight 0 and no residual; the arm named baseline wins.
    assert summary["baseline"] == "baseline"
    assert summary["comparisons"]["shallow-mlp"]["verdict"] == "hurt"
    md = (tmp_path / "out" / "report.md").read_text()
    anchor = md[md.index("## Sanity anchor"):]
    assert "68%" in anchor and "32%" in anchor
    finals = [a * (1 - math.exp(-200 / 50.0)) for a in (0.40, 0.41, 0.43)]
    assert f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}" in anchor


def test_language_model_runs_use_eval_loss(tmp_path):
    dirs = [make_run(tmp_path, "baseline", s, a, 50.0, 1.0, lm=True) for s, a in enumerate([0.5, 0.52])]
    dirs += [make_run(tmp_path, "gauss", s, a, 50.0, 1.0, weight=0.1, lm=True)
             for s, a in enumerate([0.8, 0.81])]
    write_report(dirs, tmp_path / "out", target_accuracy=1.6)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metric"] == {"key": "eval_loss", "higher_is_better": False}
    # eval_loss = 2 - acc; the first eval step at or below 1.6 for each seed.
    for arm, accs in (("baseline", [0.5, 0.52]), ("gauss", [0.8, 0.81])):
        firsts = [next((t for t in EVAL_STEPS if 2.0 - a * (1 - math.exp(-t / 50.0)) <= 1.6), None)
                  for a in accs]
        reached = [f for f in firsts if f is not None]
        assert summary["arms"][arm]["n_reached"] == len(reached)
        assert summary["arms"][arm]["steps_to_target_mean"] == (
            pytest.approx(statistics.fmean(reached)) if reached else None)
        assert summary["arms"][arm]["final_metric_mean"] == pytest.approx(
            statistics.fmean(2.0 - a * (1 - math.exp(-200 / 50.0)) for a in accs))
    assert summary["comparisons"]["gauss"]["diff"] < 0
    assert summary["comparisons"]["gauss"]["verdict"] == "helped"  # lower loss is better


def test_corrupt_or_missing_files_name_the_path(tmp_path):
    d = make_run(tmp_path, "baseline", 0, 0.6, 50.0, 1.0)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:15]  # a truncated write
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=re.escape(f"{d / 'metrics.jsonl'}:3: corrupt line")):
        load_run(d)
    (d / "config.yaml").unlink()
    with pytest.raises(ReportError, match=re.escape(str(d / "config.yaml"))):
        load_run(d)


def test_expand_grid_yields_valid_configs():
    grid = ROOT / "configs" / "paper" / "grid.yaml"
    spec = yaml.safe_load(grid.read_text())
    runs = expand_grid(grid)
    assert len(runs) == len(spec["arms"]) * len(spec["seeds"])
    assert len({name for name, _, _ in runs}) == len(runs)
    assert {"baseline", "residual", "shallow-mlp"} <= {group for _, group, _ in runs}
    for name, group, overrides in runs:
        cfg = config.load(None, overrides)
        assert (cfg.run.name, cfg.run.group) == (name, group)
        assert name == f"{group}-s{cfg.run.seed}" and cfg.run.seed in spec["seeds"]
        assert cfg.data.name == spec["base"]["data"]["name"]
        assert cfg.model.depth == (spec["arms"][group] or {}).get("model.depth",
                                                                   spec["base"]["model"]["depth"])
        for key, value in (spec["arms"][group] or {}).items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value, (name, key)
    for other in ("grid-digits.yaml", "micro.yaml"):
        assert expand_grid(grid.parent / other)


def test_expand_grid_rejects_bad_key(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("seeds: [0]\narms:\n  a: {mi.wieght: 0.1}\n")
    with pytest.raises(config.ConfigError, match=r"arm 'a'.*wieght.*did you mean 'weight'"):
        expand_grid(bad)


def test_mi_heatmap_handles_nan_and_checks_shape(tmp_path, saved_figures):
    v_PS = np.arange(12, dtype=float).reshape(3, 4)
    v_PS[1, 2] = np.nan
    for values in (v_PS, np.full((3, 4), np.nan)):
        p = plots.mi_heatmap(PAIRS, [0, 10, 20, 30], values, tmp_path / "h.png", "t")
        assert p.read_bytes()[:4] == b"\x89PNG"
        mesh = saved_figures["h.png"].axes[0].collections[0]
        drawn = mesh.get_array()
        assert drawn.shape == (3, 4)  # pairs x steps
        assert np.array_equal(np.ma.getmaskarray(drawn), np.isnan(values))  # NaN cells masked (grey)
        assert np.array_equal(drawn.filled(-1), np.nan_to_num(values, nan=-1))
        # cells centered on their steps: edges halfway between them
        xs = np.unique(mesh.get_coordinates()[..., 0])
        assert list(xs) == [-5, 5, 15, 25, 35]
        assert [t.get_text() for t in saved_figures["h.png"].axes[0].get_yticklabels()] == PAIRS
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        plots.mi_heatmap(PAIRS, [0, 10, 20, 30], np.zeros((4, 3)), tmp_path / "bad.png")


def test_direction_control_compares_raise_and_lower_arms(tmp_path):
    runs = []
    for seed in range(3):
        runs.append(make_run(tmp_path, "baseline", seed, 0.40 + 0.01 * seed, 60, 1.0))
        runs.append(make_run(tmp_path, "up", seed, 0.70 + 0.01 * seed, 60, 3.0, weight=0.1))
        runs.append(make_run(tmp_path, "down", seed, 0.70 + 0.01 * seed, 60, 0.5, weight=-0.1))
    md = write_report(runs, tmp_path / "report").read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    (c,) = summary["direction_controls"]
    assert (c["raise_arm"], c["lower_arm"], c["weight"]) == ("up", "down", 0.1)
    assert c["diff"] == pytest.approx(0.0, abs=1e-12) and c["verdict"] == "no difference detected"
    assert summary["comparisons"]["up"]["verdict"] == summary["comparisons"]["down"]["verdict"] == "helped"
    assert "- up vs down (|weight| 0.1): **no difference detected**" in md
