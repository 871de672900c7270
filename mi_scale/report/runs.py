"""Run directories in: config.yaml and metrics.jsonl of each run, grouped into
arms (run.group, or run.name without its "-s<seed>" suffix)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import yaml

from mi_scale.errors import UserFixableError
from mi_scale.stats import finite

_SEED_SUFFIX = re.compile(r"-(?:s|seed)\d+$")


class ReportError(UserFixableError, ValueError):
    """A user-fixable problem with a run directory; the message names the path."""


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
