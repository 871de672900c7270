"""Every number of the report, as plain data (summary.json).

Each arm is compared with a baseline arm on final held-out accuracy (a Welch t
interval and Cohen's d over seeds) and on steps to a target accuracy; every
number is computed from metrics.jsonl.

Definitions (summary.json and report.md use them):
- final metric of a run: its last eval row's eval_accuracy (classification)
  or eval_loss (language modelling, lower is better).
- steps to target: the first eval step at which the metric reaches the target.
- final MI of a pair: the last finite value of "mi/<a>-><b>" in the run's
  train rows; a run's final mean MI averages its pairs.
- std: sample standard deviation over seeds (ddof=1); null for one seed.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

from mi_scale.report.runs import Run
from mi_scale.stats import finite, mean_std, welch_interval

# Published MNIST-1D test accuracies (Greydanus 2020, default 4000/1000 split),
# printed next to our shallow MLP as a check on the data and training pipeline.
MNIST1D_PAPER_ACCURACY = {"MLP": 0.68, "logistic regression": 0.32}

# Keys that differ between seeds of one arm by design; left out of config diffs.
_PER_RUN_KEYS = ("run.name", "run.seed", "run.group", "run.output_dir")


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


def nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [nan_to_none(v) for v in x]
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
