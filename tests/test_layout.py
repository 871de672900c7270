"""The house: no import circles under mi_scale/ (imports inside functions
included), no module over 500 lines; user-fixable errors share one base at the bottom (mi_scale/errors.py,
which imports nothing of ours) and the CLI turns any of them into one line, exit 2."""

from __future__ import annotations

import ast
import re
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


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports anywhere in its body (top level,
    functions, TYPE_CHECKING blocks). `from pkg import sub` counts as importing
    pkg.sub when that is a module, else pkg; a parent package that Python loads
    on the way is not an edge."""
    def ours(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, tree in modules.items():
        package = mod if _is_package(mod) else mod.rpartition(".")[0]
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .sub import y
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found |= {m for n in names if n.startswith("mi_scale") and (m := ours(n)) and m != mod}
        graph[mod] = found
    return graph


def _is_package(mod: str) -> bool:
    return (PACKAGE.parent / mod.replace(".", "/") / "__init__.py").is_file()


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as a path a -> b -> ... -> a, or [] when there is none."""
    state, path = {}, []

    def visit(m: str) -> list[str]:
        state[m] = "open"
        path.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[m] = "done"
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_no_import_circles():
    graph = _imports(_modules())
    assert graph["mi_scale.cli"] and graph["mi_scale.data.build"]  # the parse finds edges (relative ones too)
    assert "mi_scale.data.prepare" in graph["mi_scale.data.build"]
    assert " -> ".join(_cycle(graph)) == ""


def test_the_cycle_finder_finds_a_circle_inside_functions():
    """A planted circle (b imports a inside a function) is reported as a path."""
    modules = {"mi_scale.a": ast.parse("import mi_scale.b\n"),
               "mi_scale.b": ast.parse("def f():\n    from mi_scale.a import x\n"),
               "mi_scale.c": ast.parse("from mi_scale import a\n")}
    assert _cycle(_imports(modules)) == ["mi_scale.a", "mi_scale.b", "mi_scale.a"]


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


def test_no_module_over_500_lines():
    """One module, one job: a module that grows past 500 lines holds several."""
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 40 and max(sizes.values()) > 100  # the walk finds the package
    assert {p: n for p, n in sizes.items() if n > 500} == {}


def test_readme_layout_names_every_module():
    """README's Layout section names each module (by file stem) of the tree."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")] if "\n## " in layout else layout
    words = set(re.findall(r"[\w.]+", layout))
    stems = {p.stem for p in PACKAGE.rglob("*.py") if not p.stem.startswith("__")}
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py") if p.parent != PACKAGE}
    assert len(stems) > 40
    assert sorted(s for s in stems if s not in words and f"{s}.py" not in words) == []
    assert sorted(p for p in packages if f"mi_scale/{p}/" not in layout) == []
