"""Experiment grid specs (configs/paper/*.yaml) expanded into per-run config
overrides, so that the grid and its report agree on arm names."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

from mi_scale.config import ConfigError, load as load_config


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
