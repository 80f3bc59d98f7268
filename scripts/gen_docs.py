"""Writes docs/methods.md, docs/configuration.md and docs/troubleshooting.md from the code.

The merge methods come from the registry and its parameter specs (docs_methods.py), the
configuration reference from conf/ and the dataclasses of search/config.py (docs_conf.py
reads them, docs_configuration.py writes the page), and the troubleshooting page from
the ``raise`` statements of search/ and evaluators/ (docs_troubleshooting.py, with
``ast``); docs_common.py holds the Markdown helpers. Output is deterministic, so a
committed doc that differs from a fresh run is stale.

    python scripts/gen_docs.py           # (re)write the three docs
    python scripts/gen_docs.py --check   # exit 1 listing stale docs, 0 when current

Example:
    >>> docs = generate()
    >>> sorted(path.name for path in docs)
    ['configuration.md', 'methods.md', 'troubleshooting.md']
    >>> stale(docs)                     # doctest: +SKIP
    []
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:  # loaded by path (tests): make the docs_* modules beside it importable
    sys.path.insert(0, HERE)

from docs_common import ROOT  # noqa: E402
from docs_configuration import render_configuration  # noqa: E402
from docs_methods import render_methods  # noqa: E402
from docs_troubleshooting import render_troubleshooting  # noqa: E402

DOCS = ROOT / "docs"


RENDERERS: dict[str, Callable[[], str]] = {
    "methods.md": render_methods,
    "configuration.md": render_configuration,
    "troubleshooting.md": render_troubleshooting,
}


def generate() -> dict[Path, str]:
    """Every generated doc: path -> text."""
    return {DOCS / name: render() for name, render in RENDERERS.items()}


def stale(docs: Mapping[Path, str]) -> list[Path]:
    """The docs whose committed text differs from ``docs`` (or that are missing)."""
    return [p for p, text in docs.items()
            if not p.is_file() or p.read_text(encoding="utf-8") != text]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Writes the docs, or with ``--check`` lists the stale ones (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a doc is not what the code generates")
    args = parser.parse_args(argv)
    docs = generate()
    if args.check:
        old = stale(docs)
        for path in old:
            print(f"stale: {_shown(path)} (run python scripts/gen_docs.py)")
        return 1 if old else 0
    DOCS.mkdir(exist_ok=True)
    for path, text in docs.items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
