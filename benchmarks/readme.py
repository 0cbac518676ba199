"""Paste the benchmarks' markdown (results/*.md) into README.md and results/README.md between their markers.

    python benchmarks/readme.py [--check] [--readme FILE]

Why: every number in the docs must be the one a benchmark wrote, never retyped. Each section sits between
``<!-- BEGIN results/NAME.md -->`` and ``<!-- END results/NAME.md -->`` (names relative to the repository
root); this script replaces what is between them with the file's current text, its links made relative to
the document's folder. ``<!-- BEGIN results/NAME.md: headline -->`` takes only the file's first table, with
the columns ``HEADLINE`` names: the README's leaderboard, whose full table is in results/README.md.
``--check`` changes nothing and exits 1 when a document is out of date (the test suite runs it).
Without ``--readme`` both README.md and results/README.md are processed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from blockkd.utils import atomic_write

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "results/README.md")
MARKERS = re.compile(r"(<!-- BEGIN (?P<name>[\w./-]+\.md)(?P<view>(?:: headline)?) -->\n)(?P<body>.*?)"
                     r"(<!-- END (?P=name)(?P=view) -->)", re.S)
HEADLINE = ("rank", "method", "seeds", "test top-1, last epoch", "gain vs ce (last)")
LINK = re.compile(r"\]\((?!https?:|#|/)([^)\s]+)\)")


def headline(text: str, name: str) -> str:
    """The first markdown table of ``text``, only its ``HEADLINE`` columns."""
    table = []
    for line in text.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif table:
            break
    if not table or not all(c in table[0] for c in HEADLINE):
        raise SystemExit(f"error: {name} has no table with the columns {', '.join(HEADLINE)}")
    keep = [table[0].index(c) for c in HEADLINE]
    return "\n".join("| " + " | ".join(row[i] for i in keep) + " |" for row in table)


def relink(text: str, source: Path, dest: Path) -> str:
    """Relative links of ``text`` (written for ``source``'s folder) rewritten for ``dest``'s folder."""
    def fix(m: re.Match) -> str:
        target = os.path.relpath(source.parent / m[1], dest.parent)
        return f"]({Path(target).as_posix()})"

    return LINK.sub(fix, text) if source.parent != dest.parent else text


def render(doc: str, root: Path, dest: Path) -> str:
    """``doc`` (the text of ``dest``) with every marked section replaced by the current text of its file."""
    def fill(m: re.Match) -> str:
        path = root / m["name"]
        if not path.is_file():
            raise SystemExit(f"error: {dest.name} marks {m['name']}, which does not exist; run its benchmark first")
        text = path.read_text(encoding="utf-8").rstrip("\n")
        # Generated links are relative to the repository root (README.md's folder).
        text = headline(text, m["name"]) if m["view"] else relink(text, root / "README.md", dest)
        return m.group(1) + text + "\n" + m.group(5)

    return MARKERS.sub(fill, doc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", help="one document to update, its marks relative to its folder "
                                    "(default: README.md and results/README.md)")
    p.add_argument("--check", action="store_true", help="exit 1 if a document is out of date; change nothing")
    args = p.parse_args(argv)
    if args.readme:
        docs, root = [Path(args.readme)], Path(args.readme).parent
    else:
        docs, root = [REPO / d for d in DOCUMENTS], REPO
    stale = 0
    for path in docs:
        old = path.read_text(encoding="utf-8")
        names = [m["name"] + (m["view"] or "") for m in MARKERS.finditer(old)]
        if not names:
            print(f"error: no '<!-- BEGIN results/NAME.md -->' markers in {path}", file=sys.stderr)
            return 2
        new = render(old, root, path)
        if args.check:
            if new != old:
                print(f"{path} is out of date with {', '.join(names)}: run python benchmarks/readme.py",
                      file=sys.stderr)
                stale = 1
            continue
        atomic_write(path, new)
        print(f"{path}: {', '.join(names)}")
    return stale


if __name__ == "__main__":
    sys.exit(main())
