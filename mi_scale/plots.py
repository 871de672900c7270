"""PNG plots for training-time monitoring and the experiment report.

Each public function draws one figure, writes one PNG and returns its path.
Figures are built with matplotlib's object API on an Agg canvas, never
pyplot: no display is needed, and a trainer calling `mi_heatmap` every few
hundred steps keeps no global figure state (pyplot figures leak unless closed).

Shape legend: P layer pairs, S steps (columns), R runs (seeds).
A `Series` is (steps_S, values_RS): one row per run, NaN where a run did not
log that step; a 1-D values array is taken as a single run.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = tuple[Sequence[float], np.ndarray]

MI_LABEL = "sketched MI (nats)"
_DPI = 100


def _new_figure(width: float, height: float, layout: Optional[str] = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _colors(n: int) -> list:
    """Distinct colors for few lines; an ordered colormap when lines are many
    (e.g. 15 layer pairs), so neighbouring layers get neighbouring colors."""
    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(max(n, 1) / cols), cols


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


# ----------------------------------------------------------------------------
# Lines with a band over seeds


def curves(panels: Mapping[str, Mapping[str, Series]], path: str | Path, *,
           xlabel: str = "step", ylabel: str = "", title: str = "",
           band: str = "minmax", logy: bool = False, sharey: bool = False) -> Path:
    """One subplot per panel, one line per label: the mean over runs (NaN
    ignored) with a shaded band, min..max over runs (`band="minmax"`) or
    mean +- std (`band="std"`). A label keeps its color across panels.

    panels: {panel title: {line label: (steps_S, values_RS)}}.
    """
    if band not in ("minmax", "std"):
        raise ValueError(f"band={band!r}: use 'minmax' or 'std'")
    labels = list(dict.fromkeys(lab for lines in panels.values() for lab in lines))
    color = dict(zip(labels, _colors(len(labels))))
    rows, cols = _grid(len(panels))
    fig = _new_figure(max(7.0, 5.2 * cols), 3.6 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        drawn = 0
        # With many lines (e.g. 15 layer pairs) bands and a full legend bury
        # the lines: draw means only and name the first and last line.
        many = len(lines) > 8
        ends = (next(iter(lines)), list(lines)[-1]) if lines else ()
        for label, (steps, values) in lines.items():
            x_S = np.asarray(steps, dtype=float)
            v_RS = np.atleast_2d(np.asarray(values, dtype=float))
            if x_S.size == 0 or not np.isfinite(v_RS).any():
                continue
            with warnings.catch_warnings():  # all-NaN columns are expected gaps
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(v_RS, axis=0)
                if band == "std":
                    sd = np.nanstd(v_RS, axis=0)
                    lo, hi = mean - sd, mean + sd
                else:
                    lo, hi = np.nanmin(v_RS, axis=0), np.nanmax(v_RS, axis=0)
            ok = np.isfinite(mean)
            ax.plot(x_S[ok], mean[ok], color=color[label], lw=1.0 if many else 1.4,
                    label=label if not many or label in ends else None)
            if v_RS.shape[0] > 1 and not many:
                ax.fill_between(x_S[ok], lo[ok], hi[ok], color=color[label], alpha=0.2, lw=0)
            drawn += 1
        if logy and drawn:
            ax.set_yscale("log")
        _finish_panel(ax, drawn, panel, xlabel, ylabel)
    return _finish_figure(fig, title, path)


def _finish_panel(ax, drawn: int, panel: str, xlabel: str, ylabel: str) -> None:
    if drawn:
        ax.legend(fontsize="x-small")
    else:
        _no_data(ax)
    ax.set_title(panel, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _finish_figure(fig, title: str | None, path):
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Layer-pair x step heatmaps


def _finite_range(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    finite = [a[np.isfinite(a)] for a in arrays]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    lo = float(min(f.min() for f in finite))
    hi = float(max(f.max() for f in finite))
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


def _check_heatmap(pair_names: Sequence[str], steps: Sequence[float], values_PS) -> np.ndarray:
    shape = (len(pair_names), len(steps))
    v_PS = np.asarray(values_PS, dtype=float)
    if v_PS.size == 0 and 0 in shape:  # nothing logged yet: an empty panel
        return np.empty(shape)
    if v_PS.shape != shape:
        raise ValueError(f"values_PS has shape {v_PS.shape}, expected "
                         f"(len(pair_names), len(steps)) = {shape}")
    return v_PS


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges halfway between centers, so cells sit on their real steps."""
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def _draw_heatmap(ax, pair_names, steps, v_PS, vmin, vmax):
    P, S = v_PS.shape
    if P == 0 or S == 0:
        _no_data(ax, "no MI logged")
        ax.set_xticks([])
        ax.set_yticks([])
        return None
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # NaN cells grey
    # pcolormesh on real step coordinates: gaps in logging show as wider cells
    # and the step axis gets round tick values.
    im = ax.pcolormesh(_edges(np.asarray(steps, dtype=float)), np.arange(P + 1) - 0.5,
                       np.ma.masked_invalid(v_PS), cmap=cmap, vmin=vmin, vmax=vmax)
    yt = np.arange(0, P, max(1, math.ceil(P / 24)))
    ax.set_yticks(yt, [pair_names[i] for i in yt], fontsize="x-small")
    ax.set_ylim(P - 0.5, -0.5)  # first pair on top
    ax.set_xlabel("step")
    return im


def mi_heatmap(pair_names: Sequence[str], steps: Sequence[float], values_PS,
               path: str | Path, title: str = "") -> Path:
    """Layer pair (rows) x step (columns) heatmap of sketched MI; NaN cells grey.

    Cheap enough to call from a training loop: one imshow, no interpolation.
    """
    v_PS = _check_heatmap(pair_names, steps, values_PS)
    fig = _new_figure(6.4, 1.6 + 0.22 * max(len(pair_names), 4))
    ax = fig.add_subplot()
    im = _draw_heatmap(ax, list(pair_names), list(steps), v_PS, *_finite_range([v_PS]))
    if im is not None:
        fig.colorbar(im, ax=ax, label=MI_LABEL)
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, path)


def mi_heatmaps(panels: Mapping[str, tuple[Sequence[str], Sequence[float], np.ndarray]],
                path: str | Path, title: str = "") -> Path:
    """Several heatmaps side by side (one per arm) on one shared color scale,
    so colors compare across panels. panels: {title: (pair_names, steps, values_PS)}."""
    checked = {k: (list(p), list(s), _check_heatmap(p, s, v)) for k, (p, s, v) in panels.items()}
    vmin, vmax = _finite_range([v for _, _, v in checked.values()])
    n_pairs = max([len(p) for p, _, _ in checked.values()] + [4])
    rows, cols = _grid(len(checked))
    # Constrained layout leaves room for each panel's pair labels and the shared colorbar.
    fig = _new_figure(5.6 * cols + 1.0, (1.4 + 0.22 * n_pairs) * rows + (0.4 if title else 0),
                      layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(checked):]:
        ax.set_visible(False)
    im = None
    for ax, (panel, (pairs, steps, v_PS)) in zip(axes.flat, checked.items()):
        im = _draw_heatmap(ax, pairs, steps, v_PS, vmin, vmax) or im
        ax.set_title(panel, fontsize="medium")
    if not checked:
        _no_data(axes.flat[0], "no runs")
    if title:
        fig.suptitle(title)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label=MI_LABEL)
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Grouped bars


def bar_by_arm(values: Mapping[str, Mapping[str, float]], path: str | Path, *,
               errors: Optional[Mapping[str, Mapping[str, float]]] = None,
               title: str = "", ylabel: str = "final " + MI_LABEL) -> Path:
    """Grouped bars: one group per layer pair, one bar per arm (pairs an arm
    lacks, e.g. a shallower model, are left empty).

    values: {arm: {pair: value}}; errors: same shape, drawn as error bars.
    """
    arms = list(values)
    pairs = list(dict.fromkeys(p for per_pair in values.values() for p in per_pair))
    fig = _new_figure(min(16.0, max(6.4, 0.12 * len(pairs) * max(len(arms), 1) + 2.0)), 4.4)
    ax = fig.add_subplot()
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(pairs))
    for i, (arm, c) in enumerate(zip(arms, _colors(len(arms)))):
        idx = [j for j, p in enumerate(pairs) if np.isfinite(values[arm].get(p, np.nan))]
        if not idx:
            continue
        h = [values[arm][pairs[j]] for j in idx]
        err = None
        if errors is not None:
            err = [errors.get(arm, {}).get(pairs[j], np.nan) for j in idx]
            err = [e if np.isfinite(e) else 0.0 for e in err]
        ax.bar(x[idx] + (i - (len(arms) - 1) / 2) * width, h, width, yerr=err,
               color=c, label=arm, capsize=2 if err else 0)
    if pairs:
        ax.set_xticks(x, pairs, rotation=60, ha="right", fontsize="x-small")
        ax.legend(fontsize="x-small", ncol=1 if len(arms) <= 8 else 2)
    else:
        _no_data(ax, "no MI logged")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------
# Points with confidence intervals (dose-response, accuracy vs depth)


def points_with_ci(panels: Mapping[str, Mapping[str, Sequence[tuple[float, float, float, float]]]],
                   path: str | Path, *, xlabel: str = "", ylabel: str = "", title: str = "",
                   xscale: str = "linear", band: bool = False,
                   hlines: Optional[Mapping[str, float]] = None) -> Path:
    """One subplot per panel, one line per label through (x, mean) points
    with their CI (lo, hi): error bars, or a shaded band when `band`. NaN
    bounds (one seed) draw the point alone. xscale: linear | symlog (weights
    of both signs around 0) | log2 (depths). hlines: {label: y} dashed lines.

    panels: {panel title: {line label: [(x, mean, lo, hi), ...]}}.
    """
    labels = list(dict.fromkeys(lab for lines in panels.values() for lab in lines))
    color = dict(zip(labels, _colors(len(labels))))
    rows, cols = _grid(max(len(panels), 1))
    fig = _new_figure(max(7.0, 5.2 * cols), 3.8 * rows + (0.4 if title else 0))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if not panels:
        _no_data(axes.flat[0])
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        drawn = 0
        for label, pts in lines.items():
            p = np.array(sorted(pts), dtype=float).reshape(-1, 4)
            p = p[np.isfinite(p[:, 1])]
            if not len(p):
                continue
            x, m, lo, hi = p.T
            ax.plot(x, m, marker="o", ms=3, lw=1.2, color=color[label], label=label)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if band and ok.any():
                ax.fill_between(x[ok], lo[ok], hi[ok], color=color[label], alpha=0.15, lw=0)
            elif ok.any():
                ax.errorbar(x[ok], m[ok], yerr=[m[ok] - lo[ok], hi[ok] - m[ok]], fmt="none",
                            ecolor=color[label], capsize=2, lw=0.8)
            drawn += 1
        for i, (name, y) in enumerate((hlines or {}).items()):
            ax.axhline(y, color="grey", ls="--", lw=0.8, label=name)
        if xscale == "symlog":
            finite = [abs(x) for pts in lines.values() for x, *_ in pts if x != 0 and math.isfinite(x)]
            ax.set_xscale("symlog", linthresh=min(finite) if finite else 1e-3)
        elif xscale == "log2":
            ax.set_xscale("log", base=2)
        _finish_panel(ax, drawn, panel, xlabel, ylabel)
    return _finish_figure(fig, title, path)
