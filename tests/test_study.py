"""The study behind docs/paper-report: the matched-gradient control, the
estimator's ceiling, steps-to-threshold / saturation numbers recomputed from
metrics.jsonl, and a micro depth grid through `sweep` rendering every plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mi_scale.config import ConfigError, load
from mi_scale.mi import MIRegularizer
from mi_scale.mi.estimators import GaussianMI, gaussian_ceiling
from mi_scale.models.mlp import DeepMLP
from mi_scale.train.control import DeepSupervision

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _hooked_outputs(model, names):
    acts = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o)) for n in names]
    return acts, handles


def _grad_norm(loss, tensors) -> float:
    grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


@pytest.mark.parametrize("weight", [0.01, 1.0])
def test_control_gradient_norm_matches_the_mi_term(weight):
    """The probes' gradient at the hooked layers has the MI term's norm
    (within 10%), measured here independently of the control's own numbers."""
    torch.manual_seed(0)
    model = DeepMLP(in_dim=40, num_classes=10, depth=6, width=32, activation="tanh")
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    reg = MIRegularizer(model, ["blocks.*"], sketch_dim=8, tokens_per_sample=1, weight=weight, seed=0)
    reg.discover(x[:2])
    widths = DeepSupervision.widths(model, reg.layer_names, x[:2])
    control = DeepSupervision(widths, num_classes=10, every=1)
    control.attach(model)
    acts, handles = _hooked_outputs(model, reg.layer_names)
    for step in (1, 2):
        reg.set_step(step)
        model(x)
        mi_term, _ = reg.loss(step)
        target = _grad_norm(mi_term, list(acts.values()))  # what the raise-MI arm delivers
        aux, info = control.loss(y, mi_term, step)
        got = _grad_norm(aux, list(acts.values()))
        assert target > 0
        assert abs(got - target) <= 0.1 * target, (got, target)
        assert info["mi_grad_norm"] == pytest.approx(target, rel=1e-6)
        # the probes really are trained by it
        aux.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in control.probes.parameters())
        control.zero_grad()
    for h in handles:
        h.remove()


def test_control_is_refused_at_zero3_and_without_a_weight():
    with pytest.raises(ConfigError, match=r"^mi\.control: invalid value 'deep_supervision': the matched-gradient "
                                          r"control cannot run at deepspeed\.zero_stage=3"):
        load(None, ["mi.control=deep_supervision", "mi.weight=0.1", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"^mi\.weight: invalid value 0\.0: mi\.control=deep_supervision"):
        load(None, ["mi.control=deep_supervision", "mi.weight=0"])
    with pytest.raises(ConfigError, match=r"mi\.control: invalid value 'deep'"):
        load(None, ["mi.control=deep"])


def test_gaussian_ceiling_is_the_estimators_maximum():
    assert gaussian_ceiling(16, 0.1) == pytest.approx(13.2858, abs=1e-4)
    x = torch.randn(20000, 16, dtype=torch.float64)
    est = GaussianMI(shrinkage=0.1, bias_correction=False)
    assert float(est(x, x)) == pytest.approx(gaussian_ceiling(16, 0.1), rel=2e-3)
    # any other dependence reports less
    assert float(est(x, x + 0.3 * torch.randn_like(x))) < gaussian_ceiling(16, 0.1)


# ----------------------------------------------------------------------------
# Report numbers recomputed from metrics.jsonl


def _write_run(d: Path, name: str, group: str, rows: list[dict], mi: dict | None = None) -> Path:
    import yaml
    run = d / name
    run.mkdir(parents=True)
    cfg = {"run": {"name": name, "group": group, "seed": int(name[-1])},
           "model": {"kind": "mlp", "depth": 4, "activation": "tanh", "residual": False},
           "mi": {"weight": 0.1, "estimator": "gaussian", "sketch_dim": 16, "control": "none", **(mi or {})}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _recompute(run: Path, threshold: float) -> tuple[float, int | None]:
    """Saturation fraction and steps to threshold, straight from the files."""
    import yaml
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    kw = cfg["mi"].get("estimator_kwargs") or {}
    s, k = kw.get("shrinkage", 0.1), cfg["mi"]["sketch_dim"]
    ceiling = -0.5 * k * math.log(s * (2 - s))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = {}
    for r in rows:
        if r["split"] == "train":
            last.update({key: v for key, v in r.items() if key.startswith("mi/") and "->" in key
                         and isinstance(v, float) and math.isfinite(v)})
    sat = sum(v >= 0.95 * ceiling for v in last.values()) / len(last) if last else math.nan
    reached = [r["step"] for r in rows if r["split"] == "eval" and r.get("eval_accuracy", -1.0) >= threshold]
    return sat, (min(reached) if reached else None)


def test_saturation_and_steps_to_threshold_match_metrics_files(tmp_path):
    from mi_scale.report import write_report
    # ceiling(16, 0.1) = 13.2858: 0.95 x = 12.62
    rows0 = [{"step": 10, "split": "train", "mi/blocks.0->blocks.1": 13.2, "mi/blocks.1->blocks.2": 5.0},
             {"step": 20, "split": "train", "mi/blocks.0->blocks.1": 13.0, "mi/blocks.1->blocks.2": 12.7},
             {"step": 10, "split": "eval", "eval_accuracy": 0.3, "eval_loss": 2.0},
             {"step": 20, "split": "eval", "eval_accuracy": 0.55, "eval_loss": 1.0}]
    rows1 = [{"step": 10, "split": "train", "mi/blocks.0->blocks.1": 12.0, "mi/blocks.1->blocks.2": 13.0},
             {"step": 10, "split": "eval", "eval_accuracy": 0.51, "eval_loss": 2.0},
             {"step": 20, "split": "eval", "eval_accuracy": 0.6, "eval_loss": 1.0}]
    runs = [_write_run(tmp_path / "runs", "raise@tanh-d4-s0", "raise@tanh-d4", rows0),
            _write_run(tmp_path / "runs", "raise@tanh-d4-s1", "raise@tanh-d4", rows1)]
    write_report([tmp_path / "runs"], tmp_path / "rep", target_accuracy=0.5)
    arm = json.loads((tmp_path / "rep" / "summary.json").read_text())["arms"]["raise@tanh-d4"]
    expected = [_recompute(r, 0.5) for r in runs]
    assert [e[0] for e in expected] == [1.0, 0.5]  # the files say so by hand, too
    assert arm["saturation_per_seed"] == [e[0] for e in expected]
    assert arm["saturation"] == pytest.approx(0.75)
    assert arm["steps_to_threshold_per_seed"] == [e[1] for e in expected] == [20, 10]
    assert arm["ceiling"] == pytest.approx(gaussian_ceiling(16, 0.1))
    # AUC: mean height of the eval curve (trapezoid over the step span)
    assert arm["auc_per_seed"] == pytest.approx([(0.3 + 0.55) / 2, (0.51 + 0.6) / 2])


# ----------------------------------------------------------------------------
# A micro study through `mi-scale sweep`: every new plot renders


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 13 short trials: ~3 min idle, but 15+ on a machine shared 10 ways
def test_micro_study_sweep_renders_every_plot(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    grids = [str(ROOT / "configs" / "paper" / g) for g in ("micro-anchor.yaml", "micro-depth.yaml", "micro-lm.yaml")]
    out = tmp_path / "study"
    proc = subprocess.run([sys.executable, "-m", "mi_scale.cli", "sweep", *grids, "--output-dir", str(out),
                           "--parallel", "2"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "13 trials, 0 already finished" in proc.stdout
    report = out / "report"
    for name in ("dose_mi", "dose_accuracy", "depth_accuracy", "lm_eval_ppl", "lm_mi_pairs"):
        data = (report / f"{name}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 1000, name
    summary = json.loads((report / "summary.json").read_text())
    assert summary["anchor_arm"] == "anchor"
    assert summary["anchor_final_accuracy"] == summary["arms"]["anchor"]["final_per_seed"][0]
    assert {a["role"] for a in summary["arms"].values()} == {"baseline", "raise", "lower", "control", "residual"}
    assert set(summary["depth_groups"]["tanh"]["control-w1"]) == {"2", "4"}  # JSON keys
    # the control logged its matched norms, equal by construction at each re-measured step
    rows = [json.loads(line) for line in (out / "control-w1@tanh-d4-s0" / "metrics.jsonl").read_text().splitlines()]
    matched = [r for r in rows if "control_grad_norm" in r]
    assert matched and all(r["control_grad_norm"] == pytest.approx(r["mi_grad_norm"], rel=0.1) for r in matched)
    # a re-run finds every trial finished and only rewrites the report
    again = subprocess.run([sys.executable, "-m", "mi_scale.cli", "sweep", *grids, "--output-dir", str(out)],
                           env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and "13 trials, 13 already finished" in again.stdout
    # steps to threshold in the report = first eval step at/over it, read from the files
    from mi_scale.report import write_report
    write_report([out], tmp_path / "rep2", target_accuracy=0.15, target_ppl=400.0)
    s2 = json.loads((tmp_path / "rep2" / "summary.json").read_text())
    for group, arm in s2["arms"].items():
        assert len(arm["runs"]) == len(arm["steps_to_threshold_per_seed"]) == len(arm["saturation_per_seed"])
        for seed, (run_name, got) in enumerate(zip(arm["runs"], arm["steps_to_threshold_per_seed"])):
            ev = [json.loads(line) for line in (out / run_name / "metrics.jsonl").read_text().splitlines()]
            ev = [r for r in ev if r["split"] == "eval"]
            if arm["task"] == "lm":
                hit = [r["step"] for r in ev if r["eval_ppl"] <= 400.0]
            else:
                hit = [r["step"] for r in ev if r["eval_accuracy"] >= 0.15]
            assert got == (min(hit) if hit else None), (group, run_name)
            sat = _recompute(out / run_name, 0.15)[0]
            if arm["role"] in ("raise", "lower"):  # an MI arm logs MI: its saturation is a number
                assert math.isfinite(sat), (group, run_name)
            assert arm["saturation_per_seed"][seed] == pytest.approx(sat, nan_ok=True), (group, run_name)


def test_grid_cells_expand_to_arm_at_cell_groups(tmp_path):
    from mi_scale.report import expand_grid
    runs = expand_grid(ROOT / "configs" / "paper" / "depth.yaml")
    assert len(runs) == 8 * 6 * 3
    name, group, ov = next(r for r in runs if r[0] == "control-w0.01@relu-d32-s1")
    assert group == "control-w0.01@relu-d32"
    cfg = load(None, ov)
    assert (cfg.model.depth, cfg.model.activation, cfg.mi.control, cfg.mi.weight, cfg.run.seed) == \
        (32, "relu", "deep_supervision", 0.01, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms: {a: {}}\ncells:\n  - {name: x, model.depth: 2}\n  - {name: x, model.depth: 3}\n")
    with pytest.raises(ConfigError, match=r"cells: duplicate name\(s\) \['x'\]: give each cell its own name"):
        expand_grid(bad)
    bad.write_text("arms: {a: {}}\ncells:\n  - {model.depth: 2}\n")
    with pytest.raises(ConfigError, match=r"cells\[0\]: invalid value .*: use a mapping with a 'name'"):
        expand_grid(bad)


def test_sweep_refuses_a_run_name_in_two_grids():
    from mi_scale.sweep import run_grid
    grid = str(ROOT / "configs" / "paper" / "micro-lm.yaml")
    with pytest.raises(ConfigError, match=r"run 'lm-w0-s0' is also in .*micro-lm.yaml: rename the arm in one grid"):
        run_grid([grid, grid], output_dir="/nonexistent")
