"""Experiment report: run directories in, plots + report.md + summary.json out.

Runs are grouped into arms (run.group, or run.name without its "-s<seed>"
suffix). Each arm is compared with a baseline arm on final held-out accuracy
(a Welch t interval and Cohen's d over seeds) and on steps to a target
accuracy. Every number in the report is computed here from metrics.jsonl;
summary.json holds the same numbers for machines.

This module also expands the experiment grid specs in configs/paper/ into
per-run config overrides (`expand_grid`), so the grid and its report agree on
arm names.

Definitions (summary.json and report.md use them):
- final metric of a run: its last eval row's eval_accuracy (classification)
  or eval_loss (language modelling, lower is better).
- steps to target: the first eval step at which the metric reaches the target.
- final MI of a pair: the last finite value of "mi/<a>-><b>" in the run's
  train rows; a run's final mean MI averages its pairs.
- std: sample standard deviation over seeds (ddof=1); null for one seed.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import yaml

from mi_scale import plots
from mi_scale.config import ConfigError, load as load_config
from mi_scale.errors import UserFixableError
from mi_scale.stats import finite, mean_std, stack, welch_interval

# Published MNIST-1D test accuracies (Greydanus 2020, default 4000/1000 split),
# printed next to our shallow MLP as a check on the data and training pipeline.
MNIST1D_PAPER_ACCURACY = {"MLP": 0.68, "logistic regression": 0.32}

_SEED_SUFFIX = re.compile(r"-(?:s|seed)\d+$")
# Keys that differ between seeds of one arm by design; left out of config diffs.
_PER_RUN_KEYS = ("run.name", "run.seed", "run.group", "run.output_dir")


class ReportError(UserFixableError, ValueError):
    """A user-fixable problem with a run directory; the message names the path."""


# ----------------------------------------------------------------------------
# Loading runs


@dataclass
class Run:
    path: Path
    config: dict
    train: list[dict] = field(default_factory=list)  # sorted by step
    eval: list[dict] = field(default_factory=list)  # sorted by step

    def _get(self, section: str, key: str, default: Any = None) -> Any:
        return (self.config.get(section) or {}).get(key, default)

    @property
    def name(self) -> str:
        return self._get("run", "name") or self.path.name

    @property
    def arm(self) -> str:
        return self._get("run", "group") or _SEED_SUFFIX.sub("", self.name)

    @property
    def seed(self) -> Optional[int]:
        return self._get("run", "seed")

    @property
    def pairs(self) -> list[str]:
        """Layer pairs in the order the trainer logged them."""
        keys = dict.fromkeys(k for row in self.train for k in row if _is_pair_key(k))
        return [k[len("mi/"):] for k in keys]

    def series(self, key: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows of `split` that hold a finite `key`."""
        rows = self.train if split == "train" else self.eval
        pts = [(r["step"], float(r[key])) for r in rows if finite(r.get(key))]
        return (np.array([p[0] for p in pts], dtype=float),
                np.array([p[1] for p in pts], dtype=float))


def _is_pair_key(key: str) -> bool:
    return key.startswith("mi/") and "->" in key


def load_run(run_dir: str | Path) -> Run:
    """Read RUN_DIR/config.yaml and RUN_DIR/metrics.jsonl.

    Raises ReportError naming the file (and line) when either is missing or
    unreadable. A step logged twice in one split keeps its last row.
    """
    run_dir = Path(run_dir)
    cfg_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for p in (cfg_path, metrics_path):
        if not p.is_file():
            raise ReportError(f"{p}: not found; pass a run directory written by "
                              f"`mi-scale train` (it holds config.yaml and metrics.jsonl)")
    try:
        config = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"{cfg_path}: not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{cfg_path}: expected a mapping of config sections")
    by_split: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    with metrics_path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReportError(f"{metrics_path}:{lineno}: corrupt line ({e.msg}); "
                                  f"fix or delete that line and rerun") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ReportError(f"{metrics_path}:{lineno}: expected a JSON object with an "
                                  f"integer 'step', got {line.strip()[:80]!r}")
            split = row.get("split", "train")
            by_split.setdefault(split, {})[row["step"]] = row
    return Run(run_dir, config,
               train=[by_split["train"][s] for s in sorted(by_split["train"])],
               eval=[by_split["eval"][s] for s in sorted(by_split["eval"])])


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories among `paths`: a path holding config.yaml is a run; a
    path whose subdirectories hold config.yaml (e.g. runs/) stands for them."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.yaml").is_file():
            found.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if (d / "config.yaml").is_file()) if p.is_dir() else []
        if not subs:
            raise ReportError(f"{p}: not a run directory (no config.yaml) and holds none")
        found.extend(subs)
    return list(dict.fromkeys(p.resolve() for p in found))


# ----------------------------------------------------------------------------
# Aggregation into summary.json


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _arm_config(runs: list[Run]) -> dict:
    flat = _flatten(runs[0].config)
    return {k: v for k, v in flat.items() if k not in _PER_RUN_KEYS}


def _pick_baseline(arms: dict[str, list[Run]]) -> str:
    """The arm with mi.weight == 0 and no residual; among several, one named
    'baseline', else the first that is not the shallow sanity-anchor arm;
    the first arm when none qualifies."""
    cands = [a for a, runs in arms.items()
             if float(runs[0]._get("mi", "weight", 0.0) or 0.0) == 0.0
             and not runs[0]._get("model", "residual", False)]
    named = [a for a in cands if "baseline" in a]
    deep = [a for a in cands if "shallow" not in a]
    return (named or deep or cands or list(arms))[0]


def _steps_to(run: Run, key: str, target: float, higher: bool) -> Optional[int]:
    for row in run.eval:
        v = row.get(key)
        if finite(v) and (v >= target if higher else v <= target):
            return int(row["step"])
    return None


def _final(run: Run, key: str, split: str = "eval") -> float:
    _, v = run.series(key, split)
    return float(v[-1]) if v.size else math.nan


def _final_mi(run: Run) -> dict[str, float]:
    return {p: _final(run, f"mi/{p}", "train") for p in run.pairs}


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def summarize(runs: list[Run], target_accuracy: Optional[float] = None) -> dict:
    """Every number of the report, as plain data (NaN where undefined)."""
    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    # Any run with accuracy makes this classification; a run that died before
    # its first eval must not flip the whole report to eval_loss.
    classification = any("eval_accuracy" in row for r in runs for row in r.eval)
    key, higher = ("eval_accuracy", True) if classification else ("eval_loss", False)

    per_arm: dict[str, dict] = {}
    for arm, rs in arms.items():
        finals = [_final(r, key) for r in rs]
        mi_by_run = [_final_mi(r) for r in rs]
        pairs = list(dict.fromkeys(p for m in mi_by_run for p in m))
        run_mi = [mean_std(list(m.values()))[0] for m in mi_by_run]
        per_pair = {p: mean_std([m.get(p, math.nan) for m in mi_by_run]) for p in pairs}
        task_loss = "task_loss" if any("task_loss" in row for r in rs for row in r.train) else "loss"
        step_times = [row["step_time_s"] for r in rs for row in r.train if finite(row.get("step_time_s"))]
        per_arm[arm] = {
            "runs": [r.name for r in rs],
            "seeds": [r.seed for r in rs],
            "n_seeds": len(rs),
            "final_metric_per_seed": finals,
            "final_metric_mean": mean_std(finals)[0],
            "final_metric_std": mean_std(finals)[1],
            "final_mi_per_seed": run_mi,
            "final_mi_mean": mean_std(run_mi)[0],
            "final_mi_std": mean_std(run_mi)[1],
            "final_mi_per_pair": {p: ms[0] for p, ms in per_pair.items()},
            "final_mi_per_pair_std": {p: ms[1] for p, ms in per_pair.items()},
            "final_train_loss_mean": mean_std([_final(r, task_loss, "train") for r in rs])[0],
            "median_step_time_s": statistics.median(step_times) if step_times else math.nan,
        }

    means = [a["final_metric_mean"] for a in per_arm.values() if finite(a["final_metric_mean"])]
    if target_accuracy is not None:
        target, rule = float(target_accuracy), "given"
    elif not means:
        target, rule = math.nan, "no eval rows"
    elif higher:
        target, rule = 0.9 * max(means), f"0.9 x best arm's mean final {key}"
    else:
        target, rule = 1.1 * min(means), f"1.1 x best (lowest) arm's mean final {key}"
    for arm, rs in arms.items():
        steps = [_steps_to(r, key, target, higher) if finite(target) else None for r in rs]
        reached = [s for s in steps if s is not None]
        per_arm[arm].update(steps_to_target_per_seed=steps, n_reached=len(reached),
                            steps_to_target_mean=statistics.fmean(reached) if reached else math.nan)

    baseline = _pick_baseline(arms)
    base_cfg = _arm_config(arms[baseline])
    comparisons = {}
    for arm in arms:
        cfg = _arm_config(arms[arm])
        per_arm[arm]["config_diff"] = {k: [base_cfg.get(k), cfg.get(k)]
                                       for k in sorted(set(base_cfg) | set(cfg))
                                       if base_cfg.get(k) != cfg.get(k)}
        per_arm[arm]["config_varies_within_arm"] = sorted(
            {k for r in arms[arm][1:] for k, v in _arm_config([r]).items() if cfg.get(k) != v})
        if arm == baseline:
            continue
        w = welch_interval(per_arm[arm]["final_metric_per_seed"],
                           per_arm[baseline]["final_metric_per_seed"])
        lo, hi = w["ci95"]
        better_low = lo > 0 if higher else hi < 0  # whole CI on the good side
        worse_high = hi < 0 if higher else lo > 0
        w["verdict"] = ("helped" if finite(lo) and better_low else
                        "hurt" if finite(lo) and worse_high else "inconclusive")
        comparisons[arm] = w

    # Direction controls: arms identical but for the sign of mi.weight. If
    # lowering MI helps as much as raising it, a gain over the baseline is not
    # evidence for the raise-MI mechanism (the term may just add gradient
    # signal to deep layers).
    controls = []
    cfgs = {arm: _arm_config(rs) for arm, rs in arms.items()}
    for up, cu in cfgs.items():
        w = cu.get("mi.weight")
        if not isinstance(w, (int, float)) or w <= 0:
            continue
        for down, cd in cfgs.items():
            rest_equal = {k: v for k, v in cu.items() if k != "mi.weight"} == \
                         {k: v for k, v in cd.items() if k != "mi.weight"}
            if rest_equal and cd.get("mi.weight") == -w:
                c = welch_interval(per_arm[up]["final_metric_per_seed"], per_arm[down]["final_metric_per_seed"])
                lo, hi = c["ci95"]
                raise_better = lo > 0 if higher else hi < 0
                lower_better = hi < 0 if higher else lo > 0
                c.update(raise_arm=up, lower_arm=down, weight=w,
                         verdict=("raising MI better" if finite(lo) and raise_better else
                                  "lowering MI better" if finite(lo) and lower_better else
                                  "no difference detected"))
                controls.append(c)

    anchor = {}
    for arm, rs in arms.items():
        if "shallow" in arm:
            anchor[arm] = {"final_metric_mean": per_arm[arm]["final_metric_mean"],
                           "final_metric_std": per_arm[arm]["final_metric_std"],
                           "data": rs[0]._get("data", "name")}
    return {
        "metric": {"key": key, "higher_is_better": higher},
        "target": {"value": target, "rule": rule},
        "baseline": baseline,
        "baseline_config": base_cfg,
        "arms": per_arm,
        "comparisons": comparisons,
        "direction_controls": controls,
        "sanity_anchor": {"paper_mnist1d_accuracy": MNIST1D_PAPER_ACCURACY, "arms": anchor},
    }


# ----------------------------------------------------------------------------
# Plots


def _write_plots(arms: dict[str, list[Run]], summary: dict, out: Path) -> list[Path]:
    key = summary["metric"]["key"]
    loss_key = {a: "task_loss" if any("task_loss" in row for r in rs for row in r.train) else "loss"
                for a, rs in arms.items()}
    paths = [
        plots.curves({"": {a: stack(rs, loss_key[a], "train") for a, rs in arms.items()}},
                     out / "train_loss.png", ylabel="train task loss",
                     title="Train task loss (MI term excluded); mean, band = min..max over seeds"),
        plots.curves({"": {a: stack(rs, key, "eval") for a, rs in arms.items()}},
                     out / "test_accuracy.png", ylabel=key.replace("_", " "),
                     title=f"Held-out {key}; mean, band = min..max over seeds"),
    ]
    mi = {a: {p: stack(rs, f"mi/{p}", "train")
              for p in summary["arms"][a]["final_mi_per_pair"]} for a, rs in arms.items()}
    paths.append(plots.curves(mi, out / "mi_pairs.png", ylabel=plots.MI_LABEL, sharey=True,
                              title="Sketched MI per adjacent layer pair; mean over seeds "
                              "(band = min..max, drawn for up to 8 pairs)"))
    heat = {}
    for a, per_pair in mi.items():
        steps = np.unique(np.concatenate([s for s, _ in per_pair.values()] + [np.array([])]))
        v_PS = np.full((len(per_pair), steps.size), np.nan)
        for i, (s, v_RS) in enumerate(per_pair.values()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
                v_PS[i, np.searchsorted(steps, s)] = np.nanmean(v_RS, axis=0)
        heat[a] = (list(per_pair), steps.tolist(), v_PS)
    paths.append(plots.mi_heatmaps(heat, out / "mi_heatmap.png",
                                   title="Mean sketched MI over seeds (grey = not logged)"))
    paths.append(plots.bar_by_arm(
        {a: s["final_mi_per_pair"] for a, s in summary["arms"].items()}, out / "final_mi_by_arm.png",
        errors={a: s["final_mi_per_pair_std"] for a, s in summary["arms"].items()},
        title="Final sketched MI per layer pair (mean, error bar = std over seeds)"))
    return paths


# ----------------------------------------------------------------------------
# report.md


def _f(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if finite(x) else "–"


def _pm(mean: float, std: float, spec: str = ".4f") -> str:
    return f"{_f(mean, spec)} ± {_f(std, spec)}" if finite(std) else _f(mean, spec)


def _steps(arm: dict) -> str:
    mean = _f(arm["steps_to_target_mean"], ".0f")
    reached = f"{arm['n_reached']}/{arm['n_seeds']} seeds"
    return f"{mean} steps ({reached})" if arm["n_reached"] else f"no seed ({reached})"


def _markdown(summary: dict, plot_names: list[str]) -> str:
    key, higher = summary["metric"]["key"], summary["metric"]["higher_is_better"]
    metric = "test accuracy" if key == "eval_accuracy" else "eval loss"
    base, arms, tgt = summary["baseline"], summary["arms"], summary["target"]
    L = ["# mi-scale experiment report", "",
         "The claim under test (Hodas & Stinis 2018): structure that raises mutual "
         "information between successive layers speeds training and improves accuracy. "
         "The paper's body is not available; the regularizer, the sketched MI and "
         "every test below are this project's own operationalization.", "",
         f"Baseline arm: **{base}**. Target {metric}: {_f(tgt['value'])} ({tgt['rule']}).", "",
         "MI values are *sketched* MI in nats: each layer is projected to k dims before "
         "estimation, so by the data-processing inequality they are lower-bound-like "
         "proxies of the layer MI (hsic is a dependence score, not nats). "
         "Estimator and k per arm are in the configs section.", "",
         "## Results per arm", "",
         f"| arm | seeds | final {metric} (mean ± std) | steps to target (mean over seeds reached) "
         f"| reached | final mean MI (nats, mean ± std) | final train task loss | median step time (ms) |",
         "|---|---|---|---|---|---|---|---|"]
    for arm, s in arms.items():
        L.append(f"| {arm}{' (baseline)' if arm == base and 'baseline' not in arm else ''} | {s['n_seeds']} "
                 f"| {_pm(s['final_metric_mean'], s['final_metric_std'])} "
                 f"| {_f(s['steps_to_target_mean'], '.0f')} | {s['n_reached']}/{s['n_seeds']} reached "
                 f"| {_pm(s['final_mi_mean'], s['final_mi_std'])} "
                 f"| {_f(s['final_train_loss_mean'])} | {_f(s['median_step_time_s'] * 1e3, '.1f')} |")

    pairs = list(dict.fromkeys(p for s in arms.values() for p in s["final_mi_per_pair"]))
    L += ["", "## Final sketched MI per layer pair (nats, mean over seeds)", "",
          "| pair | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for p in pairs:
        L.append(f"| {p} | " + " | ".join(_f(s["final_mi_per_pair"].get(p, math.nan))
                                          for s in arms.values()) + " |")

    L += ["", "## Verdict", "",
          f"Difference in final {metric} versus **{base}** (arm minus baseline), "
          f"95% CI (Welch t interval over seeds) and Cohen's d. "
          f"An arm helped when the whole interval lies on the "
          f"{'higher' if higher else 'lower'}-is-better side of 0; a CI containing 0 is inconclusive. "
          f"Each interval stands alone (no correction for comparing several arms), "
          f"and with few seeds intervals are wide.", ""]
    b = arms[base]
    for arm, c in summary["comparisons"].items():
        s = arms[arm]
        lo, hi = c["ci95"]
        if c["verdict"] == "inconclusive":
            why = ("the 95% CI contains 0" if finite(lo) else c["method"] or "no eval rows")
            text = f"**inconclusive**: {why}"
        else:
            direction = "higher" if c["diff"] > 0 else "lower"
            text = f"**{c['verdict']}**: final {metric} {direction} than {base}"
        speed = (f"reached the target in {_steps(s)} vs {_steps(b)} for {base}")
        L.append(f"- {arm}: {text} (diff {_f(c['diff'], '+.4f')}, 95% CI [{_f(lo, '+.4f')}, "
                 f"{_f(hi, '+.4f')}], d = {_f(c['cohens_d'], '.2f')}, {c['method'] or 'n/a'}); "
                 f"it {speed}.")
    if not summary["comparisons"]:
        L.append("- Only one arm ran: nothing to compare.")
    if summary.get("direction_controls"):
        L += ["", "### Direction control", "",
              "Arms that differ only in the sign of `mi.weight` (raising minus lowering MI). If lowering "
              "MI helps about as much as raising it, a gain over the baseline does not support the "
              "raise-MI mechanism: the term may act as extra gradient signal for deep layers.", ""]
        for c in summary["direction_controls"]:
            lo, hi = c["ci95"]
            L.append(f"- {c['raise_arm']} vs {c['lower_arm']} (|weight| {c['weight']:g}): "
                     f"**{c['verdict']}** (diff {_f(c['diff'], '+.4f')}, 95% CI [{_f(lo, '+.4f')}, "
                     f"{_f(hi, '+.4f')}], d = {_f(c['cohens_d'], '.2f')}).")

    anchor = summary["sanity_anchor"]
    paper = ", ".join(f"{k} {v:.0%}" for k, v in anchor["paper_mnist1d_accuracy"].items())
    L += ["", "## Sanity anchor", "",
          f"The MNIST-1D paper (Greydanus 2020) reports on default MNIST-1D "
          f"(4000 train / 1000 test): {paper}."]
    for arm, a in anchor["arms"].items():
        note = "" if a["data"] == "mnist1d" else \
            f" (this arm ran on data.name={a['data']}, so the figures do not apply)"
        L.append(f"- {arm}: final {metric} {_pm(a['final_metric_mean'], a['final_metric_std'])}{note}.")
    if not anchor["arms"]:
        L.append("- No arm with 'shallow' in its name ran, so there is nothing to set beside them.")

    L += ["", "## Configs that ran", "", f"Baseline **{base}**:", ""]
    bc = summary["baseline_config"]
    for k in ("data.name", "model.kind", "model.depth", "model.width", "model.activation",
              "model.residual", "model.norm", "mi.weight", "mi.estimator", "mi.sketch_dim",
              "mi.layers", "train.steps", "train.lr", "data.batch_size"):
        if k in bc:
            L.append(f"- `{k}`: {bc[k]!r}")
    L += ["", "Other arms, as differences from the baseline:", ""]
    for arm, s in arms.items():
        if arm == base:
            continue
        diff = "; ".join(f"`{k}`: {v[0]!r} → {v[1]!r}" for k, v in s["config_diff"].items())
        L.append(f"- {arm}: {diff or 'same config as the baseline'}")
        if s["config_varies_within_arm"]:
            L.append(f"  - warning: seeds of this arm differ in {', '.join(s['config_varies_within_arm'])}")
    L += ["", "## Runs", ""]
    for arm, s in arms.items():
        L.append(f"- {arm}: " + ", ".join(f"{n} (seed {sd})" for n, sd in zip(s["runs"], s["seeds"])))
    L += ["", "## Plots", ""] + [f"![{n}]({n})" for n in plot_names]
    return "\n".join(L) + "\n"


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path,
                 target_accuracy: Optional[float] = None, target_ppl: Optional[float] = None) -> Path:
    """Load the runs, write the PNGs, summary.json and report.md into
    out_dir; return the path of report.md. run_dirs may also name folders of
    runs (see find_runs). target_accuracy overrides the default target.

    Runs of the study grids (configs/paper/{anchor,depth,lm}.yaml: cells,
    LM arms, control arms) get the study report of mi_scale/study.py, with
    its fixed thresholds unless target_accuracy / target_ppl are given."""
    from mi_scale import study

    runs = [load_run(p) for p in find_runs(run_dirs)]
    if not runs:
        raise ReportError("no run directories given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if study.is_study(runs):
        summary = study.summarize(runs, target_accuracy, target_ppl)
        pngs = study.write_plots(runs, summary, out)
        (out / "summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2, default=str) + "\n")
        report = out / "report.md"
        report.write_text(study.markdown(summary, [p.name for p in pngs]))
        return report
    summary = summarize(runs, target_accuracy)
    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    pngs = _write_plots(arms, summary, out)
    (out / "summary.json").write_text(json.dumps(_nan_to_none(summary), indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(_markdown(summary, [p.name for p in pngs]))
    return report


# ----------------------------------------------------------------------------
# Grid specs (configs/paper/*.yaml)


def _yaml_value(v: Any) -> str:
    """A value as the YAML text that config overrides parse back to it
    (e.g. 0.001 -> '0.001', not '1e-03', which YAML reads as a string)."""
    text = yaml.safe_dump(v, default_flow_style=True, width=10**9)
    return text.removesuffix("...\n").strip()


def _cells(spec: dict, path: Path) -> list[tuple[Optional[str], list[str]]]:
    """`cells:` as [(name, overrides)]; [(None, [])] when the spec has none."""
    cells = spec.get("cells")
    if cells is None:
        return [(None, [])]
    if not isinstance(cells, list) or not cells:
        raise ConfigError(f"{path}: cells: use a list of mappings {{name: ..., dotted.key: value}}")
    out = []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("name"), str) or not cell["name"]:
            raise ConfigError(f"{path}: cells[{i}]: invalid value {cell!r}: use a mapping with a "
                              f"'name' (e.g. tanh-d16) and dotted keys (e.g. model.depth: 16)")
        if "@" in cell["name"] or "/" in cell["name"]:
            raise ConfigError(f"{path}: cells[{i}].name: invalid value {cell['name']!r}: use a name "
                              f"without '@' or '/'")
        out.append((cell["name"], [f"{k}={_yaml_value(v)}" for k, v in cell.items() if k != "name"]))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: cells: duplicate name(s) {dup}: give each cell its own name")
    return out


def expand_grid(grid_yaml_path: str | Path) -> list[tuple[str, str, list[str]]]:
    """Expand a grid spec into runs: [(run_name, group, overrides)], arms x seeds.

    The spec has `base:` (a config mapping: section -> fields), `seeds:` (a
    list of ints), `arms:` (arm name -> {dotted key: value}) and optionally
    `cells:` (a list of {name: CELL, dotted key: value}): then every arm runs
    in every cell, as group "<arm>@<cell>". Overrides are "key=value"
    strings, applied in order: base, cell, arm, then run.name, run.group and
    run.seed. Each run's overrides are validated with mi_scale.config, so a
    bad key fails here, before any run starts.
    """
    path = Path(grid_yaml_path)
    if not path.is_file():
        raise ConfigError(f"grid spec {str(path)!r} not found (examples live in configs/paper/)")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - {"base", "seeds", "arms", "cells"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; "
                          f"use base, seeds, arms and cells")
    seeds, arms, base = spec.get("seeds") or [0], spec.get("arms"), spec.get("base") or {}
    if not (isinstance(seeds, list) and all(isinstance(s, int) and s >= 0 for s in seeds)
            and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"{path}: seeds: invalid value {seeds!r}: use a list of distinct ints >= 0")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{path}: arms: use a mapping arm-name -> {{dotted.key: value}}")
    if not isinstance(base, dict) or not all(isinstance(v, dict) for v in base.values()):
        raise ConfigError(f"{path}: base: use a config mapping (section -> fields)")
    base_ov = [f"{sec}.{k}={_yaml_value(v)}" for sec, fields in base.items() for k, v in fields.items()]

    runs = []
    for cell, cell_ov in _cells(spec, path):
        for arm, ov in arms.items():
            if not isinstance(ov, (dict, type(None))):
                raise ConfigError(f"{path}: arms.{arm}: use a mapping of dotted keys to values")
            arm_ov = [f"{k}={_yaml_value(v)}" for k, v in (ov or {}).items()]
            group = str(arm) if cell is None else f"{arm}@{cell}"
            for seed in seeds:
                name = f"{group}-s{seed}"
                overrides = base_ov + cell_ov + arm_ov + [f"run.name={_yaml_value(name)}",
                                                          f"run.group={_yaml_value(group)}",
                                                          f"run.seed={seed}"]
                try:
                    load_config(None, overrides)
                except ConfigError as e:
                    where = f"arm {arm!r}" + (f", cell {cell!r}" if cell else "")
                    raise ConfigError(f"{path}: {where}, seed {seed}: {e}") from None
                runs.append((name, group, overrides))
    return runs
