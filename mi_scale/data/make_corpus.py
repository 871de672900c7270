"""Regenerate the bundled text corpus from Python standard-library docstrings.

Run once by a maintainer; the output is committed so the corpus stays fixed
across Python versions (docstrings change between releases):

    python -m mi_scale.data.make_corpus [--out PATH] [--max-bytes N]

Docstrings are read with `ast` from the stdlib source files, so no module is
imported. The text is covered by the PSF License (see corpus/README.md).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sysconfig
from pathlib import Path

# Modules with long, prose-heavy docstrings, in a fixed order. Packages
# contribute all their .py files (sorted).
MODULES = [
    "argparse", "collections", "functools", "typing", "dataclasses", "enum",
    "inspect", "pathlib", "os", "shutil", "subprocess", "threading",
    "concurrent", "asyncio", "logging", "json", "csv", "pickle", "copy",
    "datetime", "calendar", "decimal", "fractions", "statistics", "random",
    "heapq", "bisect", "textwrap", "string", "difflib", "re", "email",
    "http", "urllib", "zipfile", "tarfile", "gzip", "configparser",
    "unittest", "doctest", "pdb", "trace", "tokenize", "ast", "contextlib",
    "abc", "numbers", "operator", "weakref", "tempfile", "glob", "fnmatch",
    "locale", "gettext", "optparse", "cmd", "shlex", "queue", "sched",
    "selectors", "socket", "ssl", "smtplib", "imaplib", "ftplib", "mailbox",
    "xml", "html", "sqlite3", "importlib", "pydoc", "timeit", "uuid",
    "ipaddress", "base64", "hashlib", "hmac", "secrets", "pprint", "reprlib",
]
DEFAULT_OUT = Path(__file__).parent / "corpus" / "stdlib_docstrings.txt"
MIN_CHARS = 80  # skip one-liners like "Return x."; they add little prose


def _module_files(stdlib: Path, name: str) -> list[Path]:
    single = stdlib / f"{name}.py"
    if single.is_file():
        return [single]
    package = stdlib / name
    return sorted(p for p in package.rglob("*.py") if "test" not in p.parts)


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= MIN_CHARS:
            out.append(inspect.cleandoc(doc))
    return out


def make_corpus(max_bytes: int) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    size = 0
    for name in MODULES:
        for path in _module_files(stdlib, name):
            for doc in _docstrings(path.read_text(encoding="utf-8")):
                n = len(doc.encode("utf-8")) + 2
                if size + n > max_bytes:
                    return "\n\n".join(parts) + "\n"
                parts.append(doc)
                size += n
    return "\n\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-bytes", type=int, default=500_000)
    args = ap.parse_args()
    text = make_corpus(args.max_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode('utf-8'))} bytes to {args.out}")


if __name__ == "__main__":
    main()
