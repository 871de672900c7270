"""Experiment report: run directories in, plots + report.md + summary.json out.

Runs are grouped into arms (run.group, or run.name without its "-s<seed>"
suffix). Each arm is compared with a baseline arm on final held-out accuracy
(a Welch t interval and Cohen's d over seeds) and on steps to a target
accuracy. Every number in the report is computed here from metrics.jsonl;
summary.json holds the same numbers for machines.

The package also expands the experiment grid specs in configs/paper/ into
per-run config overrides (`expand_grid`), so the grid and its report agree on
arm names.

One job a module: runs.py loads run directories, summary.py computes every
number (summary.json), figures.py draws the PNGs, markdown.py writes
report.md, grid.py expands grid specs; the study grids' report is
mi_scale/study.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from mi_scale.report.figures import write_plots
from mi_scale.report.grid import expand_grid
from mi_scale.report.markdown import markdown
from mi_scale.report.runs import ReportError, Run, find_runs, load_run
from mi_scale.report.summary import nan_to_none, summarize

__all__ = ["ReportError", "Run", "expand_grid", "find_runs", "load_run", "summarize", "write_report"]


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
        (out / "summary.json").write_text(json.dumps(nan_to_none(summary), indent=2, default=str) + "\n")
        report = out / "report.md"
        report.write_text(study.markdown(summary, [p.name for p in pngs]))
        return report
    summary = summarize(runs, target_accuracy)
    arms: dict[str, list[Run]] = {}
    for r in runs:
        arms.setdefault(r.arm, []).append(r)
    pngs = write_plots(arms, summary, out)
    (out / "summary.json").write_text(json.dumps(nan_to_none(summary), indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(markdown(summary, [p.name for p in pngs]))
    return report
