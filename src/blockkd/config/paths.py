"""Paths inside a recipe, resolved once, at load: against the folder of the recipe file that names them
(then the working directory), or the working directory for command-line overrides.

Why: a run stores its config and is evaluated, resumed or used as a teacher later, from anywhere; a
relative path stored as typed means something else from another directory (``blockkd eval`` of a run from
``~`` looked for the student's ``hf-config.`` file under ``~``), and one file named in two ways looked like two
teachers. A relative path that exists is therefore made absolute when the recipe is read, and that is the
form the run keeps. One that exists nowhere is left as typed: it is either a mistake, which the error then
names as typed, or a folder the run creates (a dataset download).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..utils import shown

# (section, key): a path, unless it is a URL-like spec (torchvision://..., timm://...) or one of `keep`
PATH_KEYS = {("model", "checkpoint"): (), ("teacher", "checkpoint"): (), ("data", "root"): (),
             ("data", "train"): (), ("data", "test"): (), ("data", "tokenizer"): ("wordpiece", "bpe")}
# (section, key): a model name; its part after these prefixes is a path (hf.: when it is a local folder)
NAME_KEYS = (("model", "name"), ("teacher", "name"))
PATH_PREFIXES = ("hf-config.", "hf.")


def resolve_path(text: str, folders: list[Path]) -> str | None:
    """``text`` as an absolute path, from the first of ``folders`` where it exists (None: nowhere)."""
    try:
        path = Path(text).expanduser()
        candidates = [path] if path.is_absolute() else [folder / path for folder in folders]
        found = next((p for p in candidates if p.exists()), None)
    except (OSError, ValueError, RuntimeError):  # a NUL byte, ~unknown_user ...: not a path of this machine
        return None
    return os.path.abspath(found) if found is not None else None


def resolve(raw: dict[str, dict], recipe_of: Callable[[str], Path | None]) -> None:
    """Make the existing relative paths of the ``raw`` sections absolute, in place. ``recipe_of(dotted key)``:
    the recipe file that set the key (None: an override, or a mapping given in Python)."""

    def folders(dotted: str) -> list[Path]:
        recipe = recipe_of(dotted)
        return ([recipe.absolute().parent] if recipe is not None else []) + [Path.cwd()]

    for (section, key), keep in PATH_KEYS.items():
        value = raw.get(section, {}).get(key)
        if isinstance(value, str) and value and "://" not in value and value not in keep:
            raw[section][key] = resolve_path(value, folders(f"{section}.{key}")) or value
    for section, key in NAME_KEYS:
        value = raw.get(section, {}).get(key)
        prefix = next((p for p in PATH_PREFIXES if isinstance(value, str) and value.startswith(p)), None)
        if prefix is not None and value[len(prefix):]:
            found = resolve_path(value[len(prefix):], folders(f"{section}.{key}"))
            raw[section][key] = prefix + found if found is not None else value


def short(name: Any) -> Any:
    """A model name with an absolute path shown short (run folder names): relative to the working directory
    when below it, else the file or folder name."""
    prefix = next((p for p in PATH_PREFIXES if isinstance(name, str) and name.startswith(p)), None)
    if prefix is None or not os.path.isabs(name[len(prefix):]):
        return name
    rel = shown(name[len(prefix):])
    return prefix + (rel if not os.path.isabs(rel) else Path(rel).name)


def same_path_name(a: str, b: str) -> bool:
    """Whether two model names are the same, a path in them compared as the file it names (a run trained
    with ``hf-config.models/t.json`` and a recipe naming that file by its absolute path: one teacher)."""
    if a == b:
        return True
    pa = next((p for p in PATH_PREFIXES if a.startswith(p)), None)
    if pa is None or not b.startswith(pa) or (pa == "hf." and b.startswith("hf-config.")):
        return False
    try:
        x, y = Path(a[len(pa):]).expanduser(), Path(b[len(pa):]).expanduser()
        return x.exists() and y.exists() and os.path.samefile(x, y)
    except (OSError, ValueError, RuntimeError):
        return False
