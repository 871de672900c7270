"""Regenerate the bundled text corpus from Python standard-library docstrings,
or write a large jsonl corpus of real text for benchmarks and scale runs.

Run once by a maintainer; the output is committed so the corpus stays fixed
across Python versions (docstrings change between releases):

    python -m mi_scale.data.make_corpus [--out PATH] [--max-bytes N]
    python -m mi_scale.data.make_corpus --jsonl OUT.jsonl --mb 1024

`--jsonl`: the documentation strings of every installed Python package (stdlib
and site-packages, English prose and examples written by people), one
document per string, repeated in a new shuffled order per pass until the file
reaches the size asked for. Nothing is downloaded.

Docstrings are read with `ast` from the stdlib source files, so no module is
imported. The text is covered by the PSF License (see corpus/README.md).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import re
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


# A triple-quoted string: docstrings, mostly. A regex over the source is 20x faster
# than parsing every installed file with `ast`, and exactness does not matter here.
_TRIPLE = re.compile(r'"""(.*?)"""', re.S)


def installed_docstrings() -> list[str]:
    """Unique documentation strings (>= MIN_CHARS, mostly letters) of stdlib and site-packages."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib")}
    seen, docs = set(), []
    for root in sorted(roots):
        for path in sorted(root.rglob("*.py")):
            try:
                source = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            for m in _TRIPLE.finditer(source):
                doc = inspect.cleandoc(m[1])
                letters = sum(c.isalpha() or c.isspace() for c in doc)
                if len(doc) >= MIN_CHARS and letters > 0.8 * len(doc) and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def write_jsonl(out: Path, target_bytes: int, seed: int = 0) -> int:
    """Real-text documents as jsonl rows {"text": ...} until the file holds target_bytes."""
    docs = installed_docstrings()
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "w", encoding="utf-8") as f:
        while written < target_bytes:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target_bytes:
                    break
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-bytes", type=int, default=500_000)
    ap.add_argument("--jsonl", type=Path, default=None, help="write a large jsonl corpus here instead")
    ap.add_argument("--mb", type=float, default=100, help="--jsonl: size in MiB")
    args = ap.parse_args()
    if args.jsonl:
        n = write_jsonl(args.jsonl, int(args.mb * 2**20))
        print(f"wrote {n} bytes to {args.jsonl}")
        return
    text = make_corpus(args.max_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(text.encode('utf-8'))} bytes to {args.out}")


if __name__ == "__main__":
    main()
