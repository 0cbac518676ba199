"""Reading recipes: YAML files composed with ``base:``, ``key=value`` overrides, and where each key came from.

Why separate from the schema: composition is about files (bases, cycles, which file set which key, for
the messages); what the keys mean and which values are valid is declared in ``sections`` and beside
the registries. A layer's keys are checked as it is read, so a typo names its own file.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from ..errors import BlockKDError
from ..registry import closest
from ..schema import format_value
from .keys import declared_keys

SECTIONS = ("model", "teacher", "method", "data", "optim", "schedule", "train", "output")


def section_keys(section: str) -> list[str]:
    """Every key a ``section`` may hold for some choice of its ``name`` (checked for the actual one later)."""
    return declared_keys(section)


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in section_keys(s)]


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float (YAML 1.2), not as the string "1e-3"."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter messages)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read(path: Path) -> dict:
    """The mapping in the YAML file ``path`` (an empty file is an empty recipe)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BlockKDError(f"cannot read recipe {_show(path)}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise BlockKDError(f"invalid YAML in {_show(path)}{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise BlockKDError(f"invalid YAML in {_show(path)}: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BlockKDError(f"recipe {_show(path)} must be a YAML mapping of sections, got {format_value(data)}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: a YAML scalar, list or mapping (``0.1``, ``[30, 60]``, ``null``, ``1e-3``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise BlockKDError(f"cannot parse value {text!r} as YAML: {' '.join(str(e).split())}") from None


def parse_overrides(items: Iterable[str]) -> list[tuple[str, dict]]:
    """``["optim.lr=0.1", ...]`` -> one ``(source, nested mapping)`` layer per item."""
    layers = []
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise BlockKDError(f"override {item!r} must look like key=value, e.g. optim.lr=0.1")
        layer: dict = {parts[-1]: parse_value(text)}
        for part in reversed(parts[:-1]):
            layer = {part: layer}
        layers.append((f"override {item!r}", layer))
    return layers


def _suggest(key: str, choices: list[str]) -> str | None:
    """The valid key the user most likely meant: a key of the same section first (similar leaf name, or
    one leaf a prefix of the other: ``T`` -> ``temperature``), then the same leaf in another section
    (``train.lr`` -> ``optim.lr``); for an unknown section, the closest full key (``optimizer.lr``)."""
    head, _, leaf = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in choices if c.rpartition(".")[0] == head}
    if siblings:
        low = leaf.lower()
        prefixed = [s for s in siblings if low and (low.startswith(s.lower()) or s.lower().startswith(low))]
        # a known key the typed one extends or abbreviates first (lr_rate -> lr, T -> temperature), then
        # the most similar spelling (batchsize -> batch_size)
        hint = max(prefixed, key=len, default=None) or closest(leaf, siblings)
        if hint:
            return siblings[hint]
    elif closest(key, choices):
        return closest(key, choices)
    leaves = {c.rpartition(".")[2]: c for c in reversed(choices) if "." in c}
    hint = closest(leaf, leaves)
    return leaves[hint] if hint else None


def _unknown_key(key: str, where: str, choices: list[str]) -> BlockKDError:
    hint = _suggest(key, choices)
    head = key.rpartition(".")[0]
    siblings = [c.rpartition(".")[2] for c in choices if c.rpartition(".")[0] == head]
    if hint:
        tip = f"; did you mean {hint!r}?"
    elif head and siblings:
        tip = f"; valid keys in {head!r}: {', '.join(siblings)}"
    else:
        tip = f"; valid sections: {', '.join(SECTIONS)}"
    return BlockKDError(f"unknown key {key!r} in {where}{tip}")


def _bad(key: str, value: Any, where: str, what: str) -> BlockKDError:
    return BlockKDError(f"invalid {key}={format_value(value)} in {where}: expected {what}")


def check_keys(cfg: Any, where: Callable[[str], str]) -> None:
    """Reject unknown sections and keys (method options are checked once the method is known)."""
    if not isinstance(cfg, Mapping):
        raise BlockKDError(f"a config must be a mapping of sections, got {format_value(cfg)}")
    keys = all_keys()
    for section, body in cfg.items():
        section = str(section)
        if section not in SECTIONS:
            first = next(iter(body), None) if isinstance(body, Mapping) else None
            name = f"{section}.{first}" if first is not None else section
            if section == "base":
                raise BlockKDError(f"'base' is only valid at the top of a recipe file, not in {where(section)}")
            raise _unknown_key(name, where(section), list(SECTIONS) + keys)
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise _bad(section, body, where(section), f"a mapping of {section} keys")
        valid = section_keys(section)
        for key in body:
            if str(key) not in valid:
                raise _unknown_key(f"{section}.{key}", where(f"{section}.{key}"), keys)


def _merge(into: dict, layer: Mapping, source: str, origins: dict[str, str], prefix: str = "") -> None:
    """Deep-merge ``layer`` into ``into`` (later wins) and note which source set each key."""
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        origins[dotted] = source
        if value is None and isinstance(into.get(key), dict):  # an empty section (`data:`) keeps the base's
            continue
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, origins, dotted + ".")
        else:
            into[key] = copy.deepcopy(dict(value) if isinstance(value, Mapping) else value)
            if isinstance(value, Mapping):
                _note(value, source, origins, dotted + ".")


def _note(layer: Mapping, source: str, origins: dict[str, str], prefix: str) -> None:
    for key, value in layer.items():
        origins[f"{prefix}{key}"] = source
        if isinstance(value, Mapping):
            _note(value, source, origins, f"{prefix}{key}.")


def _layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The layers of the recipe at ``path``: its bases (recursively, in order), then the file itself."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(_show(p) for p in (*stack[stack.index(path):], path))
        raise BlockKDError(f"base cycle: {chain}")
    raw = _read(path)
    bases = raw.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise _bad("base", bases, _show(path), "a path or a list of paths relative to the file")
    layers: list[tuple[str, dict]] = []
    for base in bases:
        base_path = path.parent / base
        if not base_path.is_file():
            raise BlockKDError(f"base file {base!r} not found (in {_show(path)}; looked for {_show(base_path)})")
        layers += _layers(base_path, (*stack, path))
    check_keys(raw, lambda key: _show(path))
    return layers + [(_show(path), raw)]


def compose(path: Path, overrides: Iterable[str]) -> tuple[dict, dict[str, str]]:
    """The merged mapping of the recipe at ``path`` and its overrides, and the source of each dotted key
    (the sources in the order they were applied are ``list(origins.values())``' order of first setting;
    ``layer_order`` gives it explicitly)."""
    layers = _layers(path)
    recipe = _show(path.resolve())
    for source, layer in parse_overrides(overrides):
        source = f"{source} (on {recipe})"
        check_keys(layer, lambda key, source=source: source)
        layers.append((source, layer))
    cfg: dict = {}
    origins: dict[str, str] = {}
    for source, layer in layers:
        _merge(cfg, layer, source, origins)
    origins["__order__"] = [source for source, _ in layers]  # type: ignore[assignment]
    return cfg, origins


def origin(origins: Mapping[str, str], key: str, default: str) -> str:
    """The source that set ``key`` (or its closest enclosing section)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    return default


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists (``milestones: [150, 180, 210]``)."""


def _flow_list(dumper: yaml.SafeDumper, value: list | tuple) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_Dumper.add_representer(list, _flow_list)
_Dumper.add_representer(tuple, _flow_list)


def dump(cfg: Mapping) -> str:
    """``cfg`` as YAML, sections in schema order (``load`` of the result gives ``cfg`` back)."""
    return yaml.dump(dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


