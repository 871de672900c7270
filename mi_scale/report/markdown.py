"""report.md: the summary's numbers as people read them, with the verdicts."""

from __future__ import annotations

import math
from typing import Any

from mi_scale.stats import finite


def _f(x: Any, spec: str = ".4f") -> str:
    return format(x, spec) if finite(x) else "–"


def _pm(mean: float, std: float, spec: str = ".4f") -> str:
    return f"{_f(mean, spec)} ± {_f(std, spec)}" if finite(std) else _f(mean, spec)


def _steps(arm: dict) -> str:
    mean = _f(arm["steps_to_target_mean"], ".0f")
    reached = f"{arm['n_reached']}/{arm['n_seeds']} seeds"
    return f"{mean} steps ({reached})" if arm["n_reached"] else f"no seed ({reached})"


def markdown(summary: dict, plot_names: list[str]) -> str:
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
