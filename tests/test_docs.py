"""docs/design.md's layout lists every package of src/blockkd/ and every recipe folder of configs/."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout() -> str:
    text = (ROOT / "docs" / "design.md").read_text()
    return text.split("```\n", 1)[1].split("```", 1)[0]


def test_design_layout_lists_every_package_and_config_folder():
    listed = layout()
    packages = sorted(p.name for p in (ROOT / "src" / "blockkd").iterdir() if (p / "__init__.py").is_file())
    folders = sorted(p.name for p in (ROOT / "configs").iterdir() if p.is_dir())
    missing = [f"  {name}/  (under src/blockkd/)" for name in packages if not re.search(rf"^  {name}/ ", listed, re.M)]
    missing += [f"  {name}/  (under configs/)" for name in folders
                if not re.search(rf"^  {re.escape(name)}/ ", listed.split("\nconfigs/", 1)[1], re.M)]
    assert not missing, "add to the layout block of docs/design.md, with a few words on each:\n" + "\n".join(missing)


def test_design_layout_lists_only_what_exists():
    listed = layout()
    src, configs = listed.split("\nconfigs/", 1)
    configs = configs.split("\nbenchmarks/", 1)[0]
    for name in re.findall(r"^  ([\w.]+)/ ", src, re.M):
        assert (ROOT / "src" / "blockkd" / name).is_dir(), f"docs/design.md lists src/blockkd/{name}/, which is gone"
    for name in re.findall(r"^  ([\w.]+)/ ", configs, re.M):
        assert (ROOT / "configs" / name).is_dir(), f"docs/design.md lists configs/{name}/, which is gone"


DOCS = ["README.md", "CONTRIBUTING.md", "results/README.md", "benchmarks/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def paragraphs(text: str) -> list[str]:
    """The blank-line separated blocks of ``text`` of 80 characters or more, whitespace normalised."""
    return [" ".join(block.split()) for block in re.split(r"\n\s*\n", text) if len(" ".join(block.split())) >= 80]


def test_no_two_docs_share_a_paragraph():
    """Each text lives in one place (README.md links to the others); copies drift apart."""
    seen: dict[str, str] = {}
    shared = []
    for name in DOCS:
        path = ROOT / name
        if not path.is_file():
            continue
        for p in paragraphs(path.read_text()):
            if p in seen and seen[p] != name:
                shared.append(f"{seen[p]} and {name}: {p[:100]}...")
            seen.setdefault(p, name)
    assert not shared, "\n".join(shared)
