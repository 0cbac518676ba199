"""Paste the benchmarks' markdown (results/*.md) into README.md between their markers.

    python benchmarks/readme.py [--check] [--readme README.md]

Why: every number in the README's results section must be the one a benchmark wrote, never retyped.
Each section sits between ``<!-- BEGIN results/NAME.md -->`` and ``<!-- END results/NAME.md -->``;
this script replaces what is between them with the file's current text. ``--check`` changes nothing
and exits 1 when the README is out of date (the test suite runs it).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from blockkd.utils import atomic_write

REPO = Path(__file__).resolve().parents[1]
MARKERS = re.compile(r"(<!-- BEGIN (?P<name>[\w./-]+\.md) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.S)


def render(readme: str, root: Path) -> str:
    """``readme`` with every marked section replaced by the current text of the file it names."""
    def fill(m: re.Match) -> str:
        path = root / m["name"]
        if not path.is_file():
            raise SystemExit(f"error: README marks {m['name']}, which does not exist; run its benchmark first")
        return m.group(1) + path.read_text(encoding="utf-8").rstrip("\n") + "\n" + m.group(4)

    return MARKERS.sub(fill, readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 if the README is out of date; change nothing")
    args = p.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text(encoding="utf-8")
    names = [m["name"] for m in MARKERS.finditer(old)]
    if not names:
        print(f"error: no '<!-- BEGIN results/NAME.md -->' markers in {path}", file=sys.stderr)
        return 2
    new = render(old, path.parent)
    if args.check:
        if new != old:
            print(f"{path} is out of date with {', '.join(names)}: run python benchmarks/readme.py", file=sys.stderr)
            return 1
        return 0
    atomic_write(path, new)
    print(f"{path}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
