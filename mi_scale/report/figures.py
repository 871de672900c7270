"""The report's PNGs: loss and metric curves per arm, MI per layer pair."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from mi_scale import plots
from mi_scale.report.runs import Run
from mi_scale.stats import stack


def write_plots(arms: dict[str, list[Run]], summary: dict, out: Path) -> list[Path]:
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
