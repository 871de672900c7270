"""The study report: does raising inter-layer MI make deep nets trainable?

Reads the runs of configs/paper/{anchor,depth,lm}.yaml (any subset) and
answers, from metrics.jsonl alone:

- anchor:  final accuracy of the shallow-MLP recipe vs the MNIST-1D paper;
- dose:    final sketched MI and accuracy against mi.weight, and per arm the
           fraction of layer pairs whose final MI is within 5% of the
           estimator's ceiling (saturation);
- depth:   final accuracy vs depth per arm (baseline, raise-MI doses,
           lower-MI, the matched-gradient control, residual), 95% CIs, and
           the deepest depth whose mean final accuracy reaches the threshold;
- speed:   steps to a fixed threshold and area under the learning curve;
- lm:      eval perplexity, steps to a perplexity threshold and MI per block
           pair for the language-model arms.

Arms and cells: a depth-grid run's group is "<arm>@<cell>" (report.expand_grid);
its role (baseline / raise / lower / control / residual) comes from its
config, never from its name.

Definitions:
- CI: 95% Student-t interval of the mean over seeds (normal when scipy is absent).
- final: the last eval row's value; final MI of a pair: its last finite train value.
- steps to threshold: first eval step at which accuracy >= threshold (ppl <=
  threshold); seeds that never reach it are counted in n_reached and left out of the mean.
- AUC: trapezoid area under the eval curve (accuracy, or eval loss for LMs)
  divided by the step span of the evals: the curve's mean height, in the metric's units.
- saturation: fraction of a run's pairs with final MI >= 0.95 x ceiling
  (gaussian estimator, no bias correction: estimators.gaussian_ceiling);
  the arm's value is the mean over seeds.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

import numpy as np

from mi_scale import plots
from mi_scale.mi.estimators import gaussian_ceiling
from mi_scale.mi.regularizer import TRAINING_ESTIMATOR_DEFAULTS
from mi_scale.stats import ci95, finite, stack, welch_interval

# Thresholds fixed before the grid ran (both baseline and regularized arms
# reach them in the pilot runs); `mi-scale report --target-accuracy/--target-ppl` override them.
TARGET_ACCURACY = 0.5
TARGET_PPL = 11.0
SATURATION_WITHIN = 0.05
MNIST1D_PAPER_MLP = 0.68
ROLES = ("baseline", "raise", "lower", "control", "residual")


def is_study(runs) -> bool:
    """Runs of the study grids: a cell grid ("arm@cell"), a control arm, or
    language-model and classification runs together. LM runs alone keep the
    generic report (eval loss)."""
    return (any("@" in r.arm or r._get("mi", "control", "none") != "none" for r in runs)
            or len({_is_lm(r) for r in runs}) == 2)


def _is_lm(run) -> bool:
    return any("eval_ppl" in row for row in run.eval)


def role(run) -> str:
    if run._get("mi", "control", "none") != "none":
        return "control"
    if run._get("model", "residual", False):
        return "residual"
    w = float(run._get("mi", "weight", 0.0) or 0.0)
    return "raise" if w > 0 else "lower" if w < 0 else "baseline"


def steps_to_threshold(run, key: str, target: float, higher: bool) -> Optional[int]:
    for row in run.eval:
        v = row.get(key)
        if finite(v) and (v >= target if higher else v <= target):
            return int(row["step"])
    return None


def auc(run, key: str) -> float:
    steps, v = run.series(key, "eval")
    if steps.size < 2:
        return float(v[0]) if v.size else math.nan
    return float(np.trapezoid(v, steps) / (steps[-1] - steps[0]))


def ceiling(run) -> float:
    """The estimator's largest reportable value for this run's settings; NaN
    when there is none (other estimators, or bias correction on)."""
    if run._get("mi", "estimator", "gaussian") != "gaussian":
        return math.nan
    kw = {**TRAINING_ESTIMATOR_DEFAULTS["gaussian"], **(run._get("mi", "estimator_kwargs") or {})}
    if kw.get("bias_correction"):
        return math.nan
    return gaussian_ceiling(int(run._get("mi", "sketch_dim", 16)), float(kw["shrinkage"]))


def final_mi(run) -> dict[str, float]:
    out = {}
    for p in run.pairs:
        _, v = run.series(f"mi/{p}", "train")
        out[p] = float(v[-1]) if v.size else math.nan
    return out


def saturation(run) -> float:
    """Fraction of pairs whose final MI is within 5% of the ceiling."""
    c, mi = ceiling(run), [v for v in final_mi(run).values() if finite(v)]
    if not finite(c) or not mi:
        return math.nan
    return sum(v >= (1 - SATURATION_WITHIN) * c for v in mi) / len(mi)


def _final(run, key: str) -> float:
    _, v = run.series(key, "eval")
    return float(v[-1]) if v.size else math.nan


def _arm_stats(rs: list, key: str, target: float, higher: bool) -> dict:
    steps = [steps_to_threshold(r, key, target, higher) for r in rs]
    mi = [final_mi(r) for r in rs]
    pairs = list(dict.fromkeys(p for m in mi for p in m))
    r0 = rs[0]
    return {
        "role": role(r0), "weight": float(r0._get("mi", "weight", 0.0) or 0.0),
        "depth": r0._get("model", "depth"), "activation": r0._get("model", "activation"),
        "seeds": [r.seed for r in rs], "runs": [r.name for r in rs],
        "final": ci95([_final(r, key) for r in rs]),
        "final_per_seed": [_final(r, key) for r in rs],
        "steps_to_threshold_per_seed": steps,
        "steps_to_threshold": ci95([s for s in steps if s is not None]),
        "n_reached": sum(s is not None for s in steps),
        "auc": ci95([auc(r, key) for r in rs]),
        "auc_per_seed": [auc(r, key) for r in rs],
        "final_mi": ci95([statistics.fmean(v for v in m.values() if finite(v)) if m else math.nan for m in mi]),
        "final_mi_per_pair": {p: ci95([m.get(p, math.nan) for m in mi]) for p in pairs},
        "ceiling": ceiling(r0),
        "saturation_per_seed": [saturation(r) for r in rs],
        "saturation": ci95([saturation(r) for r in rs])["mean"],
    }


def summarize(runs, target_accuracy: Optional[float] = None, target_ppl: Optional[float] = None) -> dict:
    ta = TARGET_ACCURACY if target_accuracy is None else float(target_accuracy)
    tp = TARGET_PPL if target_ppl is None else float(target_ppl)
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(r.arm, []).append(r)
    arms = {}
    for g, rs in groups.items():
        lm = _is_lm(rs[0])
        arms[g] = _arm_stats(rs, "eval_ppl" if lm else "eval_accuracy", tp if lm else ta, not lm)
        arms[g].update(task="lm" if lm else "classify", cell=g.split("@", 1)[1] if "@" in g else None,
                       arm=g.split("@", 1)[0])
        if lm:
            arms[g]["auc_eval_loss"] = ci95([auc(r, "eval_loss") for r in rs])

    # depth grid: per activation, per arm name, per depth
    depth: dict[str, dict[str, dict]] = {}
    for g, a in arms.items():
        if a["cell"] is not None:
            depth.setdefault(a["activation"], {}).setdefault(a["arm"], {})[int(a["depth"])] = g
    trainable = {act: {arm: max([d for d, g in by.items() if finite(arms[g]["final"]["mean"])
                                 and arms[g]["final"]["mean"] >= ta] or [0])
                       for arm, by in per_arm.items()} for act, per_arm in depth.items()}

    comparisons = []
    for act, per_arm in depth.items():
        base = next((arm for arm, by in per_arm.items() if arms[next(iter(by.values()))]["role"] == "baseline"), None)
        ctrl = next((arm for arm, by in per_arm.items() if arms[next(iter(by.values()))]["role"] == "control"), None)
        for arm, by in per_arm.items():
            r = arms[next(iter(by.values()))]["role"]
            refs = [base] if r != "baseline" and base else []
            if r == "raise" and ctrl:
                refs.append(ctrl)
            for ref in refs:
                for d, g in sorted(by.items()):
                    gr = per_arm[ref].get(d)
                    if gr is None:
                        continue
                    for metric, k in (("final accuracy", "final_per_seed"), ("AUC", "auc_per_seed")):
                        w = welch_interval(arms[g][k], arms[gr][k])
                        comparisons.append({"activation": act, "depth": d, "arm": arm, "vs": ref,
                                            "metric": metric, **w, "verdict": _verdict(w)})

    lm = {g: a for g, a in arms.items() if a["task"] == "lm"}
    lm_base = next((g for g, a in lm.items() if a["role"] == "baseline"), None)
    lm_cmp = []
    if lm_base:
        for g, a in lm.items():
            if g == lm_base:
                continue
            for metric, k in (("final eval ppl", "final_per_seed"), ("AUC of eval ppl", "auc_per_seed")):
                w = welch_interval(a[k], lm[lm_base][k])
                lm_cmp.append({"arm": g, "vs": lm_base, "metric": metric, **w, "verdict": _verdict(w, higher=False)})

    anchor = {g: a for g, a in arms.items() if a["cell"] is None and a["task"] == "classify"}
    anchor_arm = next((g for g in anchor if "anchor" in g), next(iter(anchor), None))
    summary = {
        "thresholds": {"accuracy": ta, "ppl": tp, "note": "fixed before the grid ran"},
        "anchor_arm": anchor_arm,
        "anchor_final_accuracy": arms[anchor_arm]["final"]["mean"] if anchor_arm else None,
        "anchor_final_accuracy_ci95": arms[anchor_arm]["final"]["ci95"] if anchor_arm else None,
        "anchor_final_accuracy_per_seed": arms[anchor_arm]["final_per_seed"] if anchor_arm else None,
        "paper_mnist1d_mlp_accuracy": MNIST1D_PAPER_MLP,
        "arms": arms,
        "depth_groups": depth,
        "trainable_depth": trainable,
        "comparisons": comparisons,
        "lm_baseline": lm_base,
        "lm_comparisons": lm_cmp,
    }
    summary["verdict"] = verdict(summary)
    return summary


def _verdict(w: dict, higher: bool = True) -> str:
    lo, hi = w["ci95"]
    if not (finite(lo) and finite(hi)):
        return "inconclusive"
    if lo > 0:
        return "better" if higher else "worse"
    if hi < 0:
        return "worse" if higher else "better"
    return "no difference detected"


# ----------------------------------------------------------------------------
# Verdict sentences, one per question, from the numbers above


def _ci(c: dict, spec: str = ".3f") -> str:
    lo, hi = c["ci95"]
    return (f"{format(c['mean'], spec)} [{format(lo, spec)}, {format(hi, spec)}]" if finite(lo)
            else (format(c["mean"], spec) if finite(c["mean"]) else "–"))


def _diff(c: dict) -> str:
    lo, hi = c["ci95"]
    return (f"{c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}], d = {c['cohens_d']:.2f}" if finite(lo)
            else f"{c['diff']:+.3f} (no CI)" if finite(c["diff"]) else "–")


def verdict(s: dict) -> list[str]:
    arms, out = s["arms"], []
    ta, tp = s["thresholds"]["accuracy"], s["thresholds"]["ppl"]
    if s["anchor_arm"]:
        a = arms[s["anchor_arm"]]
        out.append(f"Testbed: the shallow-MLP anchor ends at test accuracy {_ci(a['final'])} over "
                   f"{a['final']['n']} seeds (the MNIST-1D paper: {MNIST1D_PAPER_MLP:.2f}).")
    dose = [a for a in arms.values() if a["role"] in ("raise", "lower", "baseline") and a["cell"]]
    if dose:
        sat = {f"{a['arm']}@{a['cell']}": a["saturation"] for a in dose if a["role"] == "raise"}
        worst = max(sat.values()) if sat else math.nan
        by_w: dict[float, list] = {}
        for a in dose:
            by_w.setdefault(a["weight"], []).append(a["final_mi"]["mean"])
        mi_w = ", ".join(f"w={w:g}: {statistics.fmean(v):.2f}" for w, v in sorted(by_w.items())
                         if all(finite(x) for x in v))
        out.append(f"Dose: mean final sketched MI over cells by weight: {mi_w} nats; the largest fraction of "
                   f"pairs within 5% of the ceiling in any raise-MI arm is {worst:.2f}.")
    cmp = s["comparisons"]
    for act, per_arm in s["depth_groups"].items():
        td = s["trainable_depth"][act]
        out.append(f"Depth ({act}): deepest depth whose mean final accuracy reaches {ta:g}: " +
                   ", ".join(f"{arm} {d or 'none'}" for arm, d in td.items()) + ".")
        for kind, ref_role in (("raise", "baseline"), ("raise", "control"), ("control", "baseline")):
            rows = [c for c in cmp if c["activation"] == act and c["metric"] == "final accuracy"
                    and arms[f"{c['arm']}@{_cell_of(s, act, c['arm'], c['depth'])}"]["role"] == kind
                    and arms[f"{c['vs']}@{_cell_of(s, act, c['vs'], c['depth'])}"]["role"] == ref_role]
            if rows:
                better = [f"{c['arm']} d{c['depth']}" for c in rows if c["verdict"] == "better"]
                worse = [f"{c['arm']} d{c['depth']}" for c in rows if c["verdict"] == "worse"]
                best = max(rows, key=lambda c: c["diff"] if finite(c["diff"]) else -math.inf)
                out.append(f"  {kind} vs {ref_role} ({act}, final accuracy, {len(rows)} comparisons): "
                           f"better in {len(better)} ({', '.join(better) or 'none'}), worse in {len(worse)} "
                           f"({', '.join(worse) or 'none'}); largest gain {best['arm']} at depth "
                           f"{best['depth']}: {_diff(best)}.")
        rows = [c for c in cmp if c["activation"] == act and c["metric"] == "AUC" and c["verdict"] != "no difference detected"
                and arms[f"{c['arm']}@{_cell_of(s, act, c['arm'], c['depth'])}"]["role"] == "raise"
                and arms[f"{c['vs']}@{_cell_of(s, act, c['vs'], c['depth'])}"]["role"] == "baseline"]
        out.append(f"  Speed ({act}): raise-MI arms' area under the accuracy curve differs from baseline's in "
                   f"{len(rows)} cells: " + (", ".join(f"{c['arm']} d{c['depth']} {c['verdict']} "
                                                      f"({_diff(c)})" for c in rows) or "none") + ".")
    for c in s["lm_comparisons"]:
        a, b = arms[c["arm"]], arms[c["vs"]]
        speed = (f"; steps to ppl <= {tp:g}: {_ci(a['steps_to_threshold'], '.0f')} ({a['n_reached']}/"
                 f"{len(a['seeds'])} seeds) vs {_ci(b['steps_to_threshold'], '.0f')} ({b['n_reached']}/"
                 f"{len(b['seeds'])})" if c["metric"] == "final eval ppl" else "")
        out.append(f"LM: {c['arm']} vs {c['vs']}, {c['metric']}: {c['verdict']} ({_diff(c)}){speed}.")
    return out


def _cell_of(s: dict, act: str, arm: str, depth: int) -> str:
    return s["depth_groups"][act][arm][depth].split("@", 1)[1]


# ----------------------------------------------------------------------------
# Plots and markdown


def write_plots(runs, s: dict, out: Path) -> list[Path]:
    arms, paths = s["arms"], []

    def point(a: dict, key: str, x: float):
        c = a[key]
        return (x, c["mean"], *c["ci95"])

    dose_mi: dict[str, dict[str, list]] = {}
    dose_acc: dict[str, dict[str, list]] = {}
    ceilings = set()
    for g, a in arms.items():
        if a["cell"] and a["role"] in ("baseline", "raise", "lower"):
            dose_mi.setdefault(a["activation"], {}).setdefault(f"depth {a['depth']}", []).append(
                point(a, "final_mi", a["weight"]))
            dose_acc.setdefault(a["activation"], {}).setdefault(f"depth {a['depth']}", []).append(
                point(a, "final", a["weight"]))
            if finite(a["ceiling"]):
                ceilings.add(a["ceiling"])
    paths.append(plots.points_with_ci(dose_mi, out / "dose_mi.png", xlabel="mi.weight (symlog)",
                                      ylabel="final " + plots.MI_LABEL, xscale="symlog",
                                      hlines={f"ceiling {c:.2f}": c for c in sorted(ceilings)},
                                      title="Final sketched MI (mean over pairs) vs MI weight; bars = 95% CI"))
    paths.append(plots.points_with_ci(dose_acc, out / "dose_accuracy.png", xlabel="mi.weight (symlog)",
                                      ylabel="final test accuracy", xscale="symlog",
                                      title="Final test accuracy vs MI weight; bars = 95% CI"))
    by_depth: dict[str, dict[str, list]] = {}
    for act, per_arm in s["depth_groups"].items():
        for arm, by in per_arm.items():
            by_depth.setdefault(act, {})[arm] = [point(arms[g], "final", d) for d, g in sorted(by.items())]
    paths.append(plots.points_with_ci(by_depth, out / "depth_accuracy.png", xlabel="depth (blocks)",
                                      ylabel="final test accuracy", xscale="log2", band=True,
                                      hlines={f"threshold {s['thresholds']['accuracy']:g}":
                                              s["thresholds"]["accuracy"]},
                                      title="Final test accuracy vs depth; band = 95% CI over seeds"))
    lm_groups: dict[str, list] = {}
    for r in runs:
        if arms[r.arm]["task"] == "lm":
            lm_groups.setdefault(r.arm, []).append(r)
    paths.append(plots.curves({"": {g: stack(rs, "eval_ppl", "eval") for g, rs in lm_groups.items()}},
                              out / "lm_eval_ppl.png", ylabel="eval perplexity", logy=True,
                              title="LM eval perplexity; mean, band = min..max over seeds"))
    paths.append(plots.bar_by_arm({g: {p: c["mean"] for p, c in arms[g]["final_mi_per_pair"].items()}
                                   for g in lm_groups}, out / "lm_mi_pairs.png",
                                  errors={g: {p: (c["ci95"][1] - c["mean"]) if finite(c["ci95"][1]) else math.nan
                                              for p, c in arms[g]["final_mi_per_pair"].items()}
                                          for g in lm_groups},
                                  title="LM: final sketched MI per block pair (mean, bar = 95% CI half-width)"))
    return paths


def markdown(s: dict, plot_names: list[str]) -> str:
    arms, th = s["arms"], s["thresholds"]
    L = ["# mi-scale study report: inter-layer MI and trainability", "",
         "Claim under test (Hodas & Stinis 2018): raising the mutual information between successive "
         "layers makes deep networks train (faster, better). Every number below is computed by "
         "`mi_scale/study.py` from the runs' metrics.jsonl; summary.json holds them all.", "",
         f"Thresholds, fixed before the grid ran: test accuracy {th['accuracy']:g} (MNIST-1D), "
         f"eval perplexity {th['ppl']:g} (LM). CIs are 95% t intervals over seeds; differences are "
         f"Welch intervals (arm minus reference) with Cohen's d; each interval stands alone "
         f"(no multiple-comparison correction).", "", "## Verdict", ""]
    L += [f"- {v.strip()}" if not v.startswith("  ") else f"  - {v.strip()}" for v in s["verdict"]]
    if s["anchor_arm"]:
        a = arms[s["anchor_arm"]]
        L += ["", "## Anchor (trusted testbed)", "",
              f"{s['anchor_arm']}: final test accuracy {_ci(a['final'])}; per seed "
              + ", ".join(f"{x:.3f}" for x in a["final_per_seed"]) +
              f". MNIST-1D paper MLP: {MNIST1D_PAPER_MLP:.2f}."]
    cls = [(g, a) for g, a in arms.items() if a["task"] == "classify" and a["cell"]]
    if cls:
        L += ["", "## Depth grid: per arm and cell", "",
              "| cell | arm | role | weight | final accuracy [95% CI] | steps to "
              f"{th['accuracy']:g} (reached) | AUC accuracy [95% CI] | final MI (nats) | ceiling | "
              "pairs within 5% of ceiling |", "|---|---|---|---|---|---|---|---|---|---|"]
        for g, a in sorted(cls, key=lambda x: (x[1]["activation"], x[1]["depth"], ROLES.index(x[1]["role"]),
                                               x[1]["weight"])):
            L.append(f"| {a['cell']} | {a['arm']} | {a['role']} | {a['weight']:g} | {_ci(a['final'])} | "
                     f"{_ci(a['steps_to_threshold'], '.0f')} ({a['n_reached']}/{len(a['seeds'])}) | "
                     f"{_ci(a['auc'])} | {_ci(a['final_mi'], '.2f')} | {a['ceiling']:.2f} | "
                     f"{a['saturation']:.2f} |")
        L += ["", "## Comparisons (final accuracy and AUC)", "",
              "| activation | depth | arm | vs | metric | diff [95% CI], d | verdict |", "|---|---|---|---|---|---|---|"]
        for c in s["comparisons"]:
            L.append(f"| {c['activation']} | {c['depth']} | {c['arm']} | {c['vs']} | {c['metric']} | "
                     f"{_diff(c)} | {c['verdict']} |")
    lm = [(g, a) for g, a in arms.items() if a["task"] == "lm"]
    if lm:
        L += ["", "## Language model", "",
              f"| arm | weight | final eval ppl [95% CI] | steps to ppl {th['ppl']:g} (reached) | "
              "AUC eval ppl | final MI (nats) | pairs within 5% of ceiling |", "|---|---|---|---|---|---|---|"]
        for g, a in sorted(lm, key=lambda x: x[1]["weight"]):
            L.append(f"| {g} | {a['weight']:g} | {_ci(a['final'])} | {_ci(a['steps_to_threshold'], '.0f')} "
                     f"({a['n_reached']}/{len(a['seeds'])}) | {_ci(a['auc'])} | {_ci(a['final_mi'], '.2f')} | "
                     f"{a['saturation']:.2f} |")
        pairs = list(dict.fromkeys(p for _, a in lm for p in a["final_mi_per_pair"]))
        L += ["", "Final sketched MI per block pair (nats, mean over seeds):", "",
              "| pair | " + " | ".join(g for g, _ in lm) + " |", "|---" * (len(lm) + 1) + "|"]
        for p in pairs:
            L.append(f"| {p} | " + " | ".join(_ci(a["final_mi_per_pair"][p], ".2f") if p in a["final_mi_per_pair"]
                                              else "–" for _, a in lm) + " |")
        L += ["", "| arm | vs | metric | diff [95% CI], d | verdict |", "|---|---|---|---|---|"]
        for c in s["lm_comparisons"]:
            L.append(f"| {c['arm']} | {c['vs']} | {c['metric']} | {_diff(c)} | {c['verdict']} |")
    L += ["", "## Plots", ""] + [f"![{n}]({n})" for n in plot_names]
    return "\n".join(L) + "\n"
