"""YAML recipes: composition (``base:``), ``key=value`` overrides, defaults and validation.

Why: a mistyped key or a bad value must stop a run before any work starts, with one line that names
the key, the file it came from and what is expected (or the closest valid key). The schema is one
table of dotted keys, so the defaults, the checks and docs/config.md cannot drift apart.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from .errors import BlockKDError
from .registry import UnknownNameError, closest, unknown

__all__ = ["SCHEMA", "REQUIRED", "load", "validate", "dump", "run_name", "parse_overrides", "parse_value",
           "parse_data_overrides", "format_value", "check"]


def format_value(value: Any) -> str:
    """``value`` as the user would write it in YAML, on one short line."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
        text = text.removesuffix("...").strip()
    except (yaml.YAMLError, RecursionError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A value check: ``ok(value)`` says whether the value is valid, ``cast`` normalises it
    (e.g. int -> float), ``what`` is the expectation shown to the user when it is not."""

    what: str
    ok: Callable[[Any], bool]
    cast: Callable[[Any], Any] = lambda v: v

    def __call__(self, value: Any) -> Any:
        if not self.ok(value):
            raise ValueError(self.what)
        return self.cast(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(lo: float | None = None, *, strict: bool = False, hi: float | None = None) -> Check:
    """A finite int or float (stored as float), optionally bounded."""
    bounds = [f"{'>' if strict else '>='} {lo:g}"] if lo is not None else []
    bounds += [f"<= {hi:g}"] if hi is not None else []
    return Check("a number" + (" " + " and ".join(bounds) if bounds else ""),
                 lambda v: _is_number(v) and (lo is None or (v > lo if strict else v >= lo))
                 and (hi is None or v <= hi), float)


def integer(lo: int | None = None) -> Check:
    return Check("an integer" + (f" >= {lo}" if lo is not None else ""),
                 lambda v: _is_int(v) and (lo is None or v >= lo))


def choice(*options: Any) -> Check:
    """One of ``options``, compared type-strictly (so that 1 is not taken for true)."""
    return Check("one of " + ", ".join(format_value(o) for o in options),
                 lambda v: any(type(v) is type(o) and v == o for o in options))


def optional(check: Check) -> Check:
    return Check(f"{check.what} or null", lambda v: v is None or check.ok(v),
                 lambda v: None if v is None else check.cast(v))


def _is_device(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    import torch

    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


ANY = Check("anything", lambda v: True)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
STRING = Check("a non-empty string", lambda v: isinstance(v, str) and v != "")
MAPPING = Check("a mapping", lambda v: v is None or isinstance(v, Mapping), lambda v: dict(v or {}))
MILESTONES = Check("a list of strictly increasing integers >= 1",
                   lambda v: isinstance(v, (list, tuple)) and all(_is_int(m) and m >= 1 for m in v)
                   and all(a < b for a, b in zip(v, v[1:])), list)
# YAML 1.1 reads a bare `off` as false: take it to mean "off".
AMP = Check("one of auto, off, bf16, fp16", lambda v: v is False or v in ("auto", "off", "bf16", "fp16"),
            lambda v: "off" if v is False else v)
DEVICE = Check("'auto' or a torch device such as cpu, cuda, cuda:1", _is_device)


def like(default: Any) -> Check:
    """The check for a method option: the type of its default (int accepted for float, None: anything)."""
    if default is None:
        return ANY
    if isinstance(default, bool):
        base = BOOL
    elif isinstance(default, int):
        base = integer()
    elif isinstance(default, float):
        base = number()
    elif isinstance(default, str):
        base = Check("a string", lambda v: isinstance(v, str))
    elif isinstance(default, (list, tuple)):
        base = Check("a list", lambda v: isinstance(v, (list, tuple)), list)
    elif isinstance(default, Mapping):
        base = Check("a mapping", lambda v: isinstance(v, Mapping), dict)
    else:
        return ANY
    return Check(f"{base.what} (default {format_value(default)})", base.ok, base.cast)


# ----------------------------------------------------------------------------------------- schema
REQUIRED = ...  # default of a key that every recipe must set

# dotted key -> (default, check, help). ``data.*`` keys and defaults come from blockkd.data.DEFAULTS
# (checks below); ``method.options`` is checked against the method's own ``defaults``.
SCHEMA: dict[str, tuple[Any, Check, str]] = {
    "model.name": (REQUIRED, STRING, "student (or, for ce, the model trained): a blockkd.models name"),
    "model.checkpoint": (None, optional(STRING), "initial weights for the student"),
    "teacher.name": (None, optional(STRING), "teacher model name (every method but ce)"),
    "teacher.checkpoint": (None, optional(STRING), "run folder, .safetensors or RepDistiller/mdistiller .pth"),
    "teacher.allow_random": (False, BOOL, "tests only: distill from an untrained teacher"),
    "method.name": ("ce", STRING, "ce, kd, dkd, blockkd, blockkd-lite"),
    "method.options": ({}, MAPPING, "options of the method, checked against its defaults"),
    "optim.name": ("sgd", choice("sgd"), "optimizer"),
    "optim.lr": (0.05, number(0, strict=True), "base learning rate for the global batch"),
    "optim.momentum": (0.9, number(0, hi=1), "SGD momentum"),
    "optim.nesterov": (False, BOOL, "Nesterov momentum"),
    "optim.weight_decay": (5.0e-4, number(0), "L2 weight decay"),
    "schedule.name": ("multistep", choice("multistep", "cosine", "constant"), "learning-rate schedule"),
    "schedule.milestones": ([150, 180, 210], MILESTONES, "epochs at which lr *= gamma (multistep)"),
    "schedule.gamma": (0.1, number(0, strict=True), "multistep decay factor"),
    "schedule.warmup_epochs": (0.0, number(0), "linear lr warm-up, per step"),
    "schedule.min_lr": (0.0, number(0), "cosine floor"),
    "train.epochs": (240, integer(1), "number of epochs"),
    "train.seed": (0, integer(0), "seed of every RNG"),
    "train.deterministic": (False, BOOL, "deterministic algorithms"),
    "train.device": ("auto", DEVICE, "auto, cpu, cuda, cuda:1 ..."),
    "train.amp": ("auto", AMP, "mixed precision: auto, off, bf16 or fp16"),
    "train.channels_last": ("auto", choice("auto", True, False), "channels-last memory format"),
    "train.compile": (False, BOOL, "torch.compile the training forward"),
    "train.grad_clip": (None, optional(number(0, strict=True)), "max gradient norm"),
    "train.nonfinite": ("stop", choice("stop", "skip"), "what to do with a NaN/Inf loss"),
    "train.eval_every": (1, integer(1), "epochs between evaluations"),
    "train.sync_bn": (False, BOOL, "SyncBatchNorm under DDP"),
    "train.max_steps": (None, optional(integer(1)), "stop after this many optimizer steps"),
    "output.dir": ("runs", STRING, "parent folder of run folders"),
    "output.name": (None, optional(STRING), "run folder name (default: derived from the recipe)"),
    "output.tensorboard": (True, BOOL, "TensorBoard event files"),
    "output.progress": (True, BOOL, "live progress bar"),
    "output.plot": (True, BOOL, "PNG of the curves at the end"),
}

DATA_CHECKS: dict[str, Check] = {
    "name": STRING,
    "root": optional(STRING),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "num_workers": integer(0),
    "augment": BOOL,
    "train_subset": optional(integer(1)),
    "val_split": integer(0),
    "download": BOOL,
    "drop_last": BOOL,
    "num_classes": integer(1),
    "image_size": optional(integer(1)),
    "channels": integer(1),
    "train_size": integer(1),
    "test_size": integer(1),
}

SECTIONS = ("model", "teacher", "method", "data", "optim", "schedule", "train", "output")


def _data_defaults() -> dict[str, Any]:
    from .data import DEFAULTS

    return DEFAULTS


def _section_keys(section: str) -> list[str]:
    if section == "data":
        return list(_data_defaults())
    return [k.split(".", 1)[1] for k in SCHEMA if k.startswith(section + ".")]


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_keys(s)]


# ----------------------------------------------------------------------------------------- YAML
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


# ----------------------------------------------------------------------------------------- errors
def _suggest(key: str, choices: list[str]) -> str | None:
    """The valid key the user most likely meant: a key of the same section first (similar leaf name, or
    one leaf a prefix of the other: ``T`` -> ``temperature``), then the same leaf in another section
    (``train.lr`` -> ``optim.lr``); for an unknown section, the closest full key (``optimizer.lr``)."""
    head, _, leaf = key.rpartition(".")
    siblings = {c.rpartition(".")[2]: c for c in choices if c.rpartition(".")[0] == head}
    if siblings:
        low = leaf.lower()
        prefixed = [s for s in siblings if low and (low.startswith(s.lower()) or s.lower().startswith(low))]
        hint = closest(leaf, siblings) or max(prefixed, key=len, default=None)
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


def _checked(key: str, value: Any, check: Check, where: str, context: str = "") -> Any:
    """``check(value)``, or the error naming the key, the value, its source and what is expected."""
    try:
        return check(value)
    except ValueError:
        raise _bad(key, value, where, check.what + context) from None


def _check_keys(cfg: Any, where: Callable[[str], str]) -> None:
    """Reject unknown sections and keys (method options are checked once the method is known)."""
    if not isinstance(cfg, Mapping):
        raise BlockKDError(f"a config must be a mapping of sections, got {format_value(cfg)}")
    keys = _all_keys()
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
        valid = _section_keys(section)
        for key in body:
            if str(key) not in valid:
                raise _unknown_key(f"{section}.{key}", where(f"{section}.{key}"), keys)


# ----------------------------------------------------------------------------------------- compose
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
    _check_keys(raw, lambda key: _show(path))
    return layers + [(_show(path), raw)]


def load(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The validated, fully resolved config of the recipe at ``path`` with ``key=value`` ``overrides``."""
    path = Path(path)
    if not path.is_file():
        folder = " (it is a folder)" if path.is_dir() else ""
        raise BlockKDError(f"recipe file not found: {_show(path.absolute())}{folder}")
    layers = _layers(path)
    for source, layer in parse_overrides(overrides):
        _check_keys(layer, lambda key, source=source: source)
        layers.append((source, layer))
    cfg: dict = {}
    origins: dict[str, str] = {}
    for source, layer in layers:
        _merge(cfg, layer, source, origins)
    return validate(cfg, origins=origins, source=_show(path.resolve()))


# ----------------------------------------------------------------------------------------- validate
def _origin(origins: Mapping[str, str], key: str, default: str) -> str:
    """The source that set ``key`` (or its closest enclosing section)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in origins:
            return origins[".".join(parts[:n])]
    return default


def validate(cfg: Mapping, *, origins: Mapping[str, str] | None = None, source: str = "config") -> dict:
    """A new, complete config: ``cfg`` checked key by key and filled with defaults.

    Idempotent (``validate(validate(c)) == validate(c)``), so the engine may call it on any dict.
    ``origins`` maps dotted keys to the file or override that set them, for the messages.
    """
    origins = origins or {}
    where = lambda key: _origin(origins, key, source)  # noqa: E731
    _check_keys(cfg, where)
    sections = {s: dict(cfg.get(s) or {}) for s in SECTIONS}

    def get(key: str, default: Any, check: Check) -> Any:
        section, name = key.split(".", 1)
        if name not in sections[section]:
            if default is REQUIRED:
                raise BlockKDError(f"missing required key {key!r} in {source}: {SCHEMA[key][2]}")
            return copy.deepcopy(default)
        return _checked(key, sections[section][name], check, where(key))

    out: dict[str, dict] = {s: {} for s in SECTIONS}
    for key, (default, check, _) in SCHEMA.items():
        section, name = key.split(".", 1)
        out[section][name] = get(key, default, check)
    for name, default in _data_defaults().items():
        out["data"][name] = get(f"data.{name}", default, DATA_CHECKS.get(name) or like(default))
    _check_names(out, where)
    _check_synthetic_size(out["data"], where)
    out["method"]["options"] = _method_options(out["method"], where)
    _check_teacher(out, source)
    if out["output"]["name"] is None:
        out["output"]["name"] = run_name(out)
    return out


def _check_names(cfg: dict, where: Callable[[str], str]) -> None:
    """Model, teacher, method and dataset names must be registered (closest-name errors)."""
    from . import data, methods, models

    for key in ("model.name", "teacher.name", "method.name", "data.name"):
        section, name = key.split(".")
        value = cfg[section][name]
        if value is None:
            continue
        kind = {"model": "model", "teacher": "teacher model", "method": "method", "data": "dataset"}[section]
        try:
            if section in ("model", "teacher"):
                models.check_name(value)  # also resolves torchvision.<name> and timm.<name>
            else:
                choices = methods.names() if section == "method" else data.names()
                if value not in choices:
                    raise unknown(kind, value, choices)
        except UnknownNameError as err:  # the registry's message, with where the name was set
            message = str(err).replace("unknown model", f"unknown {kind}", 1)
            raise UnknownNameError(message.replace(repr(value), f"{value!r} ({key} in {where(key)})", 1)) from None


def _method_options(method: dict, where: Callable[[str], str]) -> dict:
    """The method's options dataclass from the recipe's options, as a plain mapping."""
    from . import methods, schema

    return schema.to_dict(methods.parse_options(method["name"], method["options"], where=where))


def check(key: str, value: Any, where: str = "the command line") -> Any:
    """``value`` checked (and normalised) as the schema key ``key``, e.g. a ``--device`` argument."""
    return _checked(key, value, SCHEMA[key][1], where)


def parse_data_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["batch_size=256", "root=/data"]`` (``blockkd eval --data``) -> a checked dict of data keys."""
    defaults, out = _data_defaults(), {}
    for item in items:
        key, sep, text = item.partition("=")
        where = f"--data {item!r}"
        if not sep:
            raise BlockKDError(f"{where} must look like key=value, e.g. batch_size=256")
        if key not in defaults:
            raise _unknown_key(f"data.{key}", where, [f"data.{k}" for k in defaults])
        out[key] = _checked(f"data.{key}", parse_value(text), DATA_CHECKS.get(key) or like(defaults[key]), where)
    return out


SYNTHETIC_MAX_BYTES = 1 << 33


def _check_synthetic_size(data: dict, where: Callable[[str], str]) -> None:
    """Synthetic images are generated in host memory: refuse sizes that cannot fit before trying (an
    allocation failure deep inside torch would be a traceback, not a message)."""
    if data["name"] != "synthetic":
        return
    side = data["image_size"] or 32
    images = data["train_size"] + data["test_size"] + data["num_classes"]  # class templates too
    size = 4 * images * data["channels"] * side * side  # float32 while generated
    if size > SYNTHETIC_MAX_BYTES:
        raise BlockKDError(f"synthetic data of {data['train_size']}+{data['test_size']} images of "
                           f"{data['channels']}x{side}x{side} in {data['num_classes']} classes would need "
                           f"{size / 2**30:.3g} GiB (in {where('data')}); the limit is "
                           f"{SYNTHETIC_MAX_BYTES >> 30} GiB: lower data.train_size, test_size, image_size "
                           f"or num_classes")


def _check_teacher(cfg: dict, source: str) -> None:
    from . import methods

    name, teacher = cfg["method"]["name"], cfg["teacher"]
    if not methods.needs_teacher(name):
        return
    if teacher["name"] is None:
        raise BlockKDError(f"method {name!r} needs a teacher: set teacher.name in {source} or on the command line")
    if teacher["checkpoint"] is None and not teacher["allow_random"]:
        raise BlockKDError(f"method {name!r} needs the teacher's weights: set teacher.checkpoint in {source} or on "
                           f"the command line, e.g. teacher.checkpoint=path/to/{teacher['name']}.pth")


def run_name(cfg: Mapping) -> str:
    """Default run folder name: dataset, teacher (when used), model, method and a non-zero seed."""
    from . import methods

    method = cfg["method"]["name"]
    teacher = cfg["teacher"]["name"] if methods.needs_teacher(method) else None
    parts = [cfg["data"]["name"], teacher, cfg["model"]["name"], method]
    seed = cfg["train"]["seed"]
    return "-".join(p for p in parts if p) + (f"-seed{seed}" if seed else "")


class _Dumper(yaml.SafeDumper):
    """Block-style mappings, flow-style lists (``milestones: [150, 180, 210]``)."""


def _flow_list(dumper: yaml.SafeDumper, value: list | tuple) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_Dumper.add_representer(list, _flow_list)
_Dumper.add_representer(tuple, _flow_list)


def dump(cfg: Mapping) -> str:
    """``cfg`` as YAML, sections in schema order (``load`` of the result gives ``cfg`` back)."""
    return yaml.dump(dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def fingerprint(cfg: Mapping, ignore: Iterable[str] = ("output",)) -> str:
    """A short stable hash of ``cfg`` without the ``ignore``d sections/dotted keys.

    Why: a cached artefact (the demo's teacher) is reused only when the recipe that made it is the same.
    """
    import hashlib
    import json

    flat = {k: v for k, v in flatten(cfg).items()
            if not any(k == i or k.startswith(i + ".") for i in ignore)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings stay leaves)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
