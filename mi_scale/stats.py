"""Statistics over seeds, shared by the report and the MI study: 95% intervals
(Student t when scipy is importable), Welch's difference of two arms with
Cohen's d, and runs' series stacked on one step axis."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import numpy as np


def finite(x: Any) -> bool:
    """A real number that is not NaN or infinite (bools are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (NaN when too few)."""
    xs = [x for x in xs if finite(x)]
    mean = statistics.fmean(xs) if xs else math.nan
    std = statistics.stdev(xs) if len(xs) >= 2 else math.nan
    return mean, std


def t_crit(df: float) -> tuple[float, str]:
    """Two-sided 95% critical value: Student t when scipy is importable,
    else the normal approximation."""
    if not math.isfinite(df):
        return 1.959963984540054, "normal"
    try:
        from scipy import stats
    except ImportError:
        return 1.959963984540054, "normal approximation (scipy not installed)"
    return float(stats.t.ppf(0.975, df)), "Welch t"


def ci95(xs) -> dict:
    """Mean and 95% t interval over seeds; NaN bounds for fewer than 2 values."""
    xs = [float(x) for x in xs if finite(x)]
    out = {"mean": statistics.fmean(xs) if xs else math.nan, "ci95": [math.nan, math.nan], "n": len(xs)}
    if len(xs) >= 2:
        half = t_crit(len(xs) - 1)[0] * statistics.stdev(xs) / math.sqrt(len(xs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def welch_interval(a: Sequence[float], b: Sequence[float]) -> dict:
    """95% CI for mean(a) - mean(b) (Welch) and Cohen's d (pooled sd)."""
    a = [x for x in a if finite(x)]
    b = [x for x in b if finite(x)]
    out = {"diff": math.nan, "ci95": [math.nan, math.nan], "df": math.nan,
           "cohens_d": math.nan, "method": "", "n": [len(a), len(b)]}
    if not a or not b:
        return out
    out["diff"] = diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        out["method"] = "needs >= 2 seeds per arm"
        return out
    va, vb = statistics.variance(a), statistics.variance(b)
    se2 = va / len(a) + vb / len(b)
    df = se2 ** 2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1)) \
        if se2 > 0 else math.inf
    t, method = t_crit(df)
    half = t * math.sqrt(se2)
    pooled = math.sqrt(((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2))
    out.update(ci95=[diff - half, diff + half], df=df, method=method,
               cohens_d=diff / pooled if pooled > 0 else math.nan)
    return out


def stack(runs: Sequence, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Runs' series of `key` (each run's `.series(key, split)`) on the union of
    their steps, NaN where a run has no value: (steps_S, values_RS)."""
    series = [r.series(key, split) for r in runs]
    steps = np.unique(np.concatenate([s for s, _ in series])) if series else np.array([])
    v_RS = np.full((len(runs), steps.size), np.nan)
    for i, (s, v) in enumerate(series):
        v_RS[i, np.searchsorted(steps, s)] = v
    return steps, v_RS
