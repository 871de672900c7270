"""The house: user-fixable errors share one base at the bottom (mi_scale/errors.py,
which imports nothing of ours) and the CLI turns any of them into one line, exit 2."""

from __future__ import annotations

import ast
from pathlib import Path

from mi_scale import cli

PACKAGE = Path(cli.__file__).parent


def _modules() -> dict[str, ast.Module]:
    """Every module under mi_scale/, by dotted name, parsed."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return out


def test_errors_module_imports_nothing_of_ours():
    tree = _modules()["mi_scale.errors"]
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names]
    assert [m for m in imported if m and m.startswith("mi_scale")] == []


def test_every_error_class_subclasses_the_one_base():
    """Every `class ...Error` under mi_scale/ derives (directly or through another
    of ours) from UserFixableError, so the CLI's one except catches them all."""
    bases = {}
    for tree in _modules().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]

    def derives(name: str) -> bool:
        return name == "UserFixableError" or any(derives(b) for b in bases.get(name, []))

    assert len(bases) >= 9  # ConfigError, DataError, ModelError, ... (a parse that finds none fails)
    assert sorted(n for n in bases if not derives(n)) == []


def test_cli_prints_a_report_error_as_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert cli.main(["report", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: not a run directory (no config.yaml) and holds none\n"
