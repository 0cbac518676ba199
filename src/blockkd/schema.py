"""Typed, self-describing option sets: the one source of truth for every configurable thing.

Why: a recipe section (``optim``, ``train`` ...), a method's options and a dataset's own keys are each
declared once, as a frozen dataclass whose fields carry their default, their check (type, bounds,
choices as data) and a one-line help. Validation (:func:`parse`), the ``blockkd methods`` listing and
``docs/config.md`` (:func:`describe`) are all generated from that declaration, so they cannot drift.

    @dataclasses.dataclass(frozen=True)
    class KDOptions:
        temperature: float = option(4.0, number(0, strict=True), "T of the softened softmax")
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import yaml

from .errors import BlockKDError
from .registry import closest, unknown

__all__ = ["Check", "OptionError", "option", "parse", "to_dict", "describe", "fields", "number", "integer",
           "choice", "optional", "BOOL", "STRING", "ANY", "format_value", "REQUIRED"]

REQUIRED = dataclasses.MISSING  # the default of a key that every recipe must set


def format_value(value: Any) -> str:
    """``value`` as the user would write it in YAML, on one short line."""
    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
        text = text.removesuffix("...").strip()
    except (yaml.YAMLError, RecursionError):
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


class OptionError(BlockKDError):
    """A bad value for the option ``key``: the config layer adds the file or override that set it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A value check: ``ok(value)`` says whether the value is valid, ``cast`` normalises it (int ->
    float), ``what`` is the expectation shown to the user, ``choices`` the valid values of a closed set
    (for "did you mean")."""

    what: str
    ok: Callable[[Any], bool]
    cast: Callable[[Any], Any] = lambda v: v
    choices: tuple = ()

    def __call__(self, value: Any) -> Any:
        if not self.ok(value):
            hint = closest(value, [str(c) for c in self.choices]) if isinstance(value, str) and self.choices else None
            raise ValueError(self.what, f"; did you mean {hint!r}?" if hint else "")
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


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    bounds = ([f">= {lo}"] if lo is not None else []) + ([f"<= {hi}"] if hi is not None else [])
    return Check("an integer" + (" " + " and ".join(bounds) if bounds else ""),
                 lambda v: _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def choice(*options: Any) -> Check:
    """One of ``options``, compared type-strictly (so that 1 is not taken for true)."""
    return Check("one of " + ", ".join(format_value(o) for o in options),
                 lambda v: any(type(v) is type(o) and v == o for o in options), choices=tuple(options))


def registered(registry) -> Check:
    """A name of ``registry``, checked when parsed: names registered after import are accepted and listed."""
    return _Registered(registry)


class _Registered(Check):
    """The check of :func:`registered`: its expectation and choices follow the registry as it is now."""

    def __init__(self, registry):  # a frozen dataclass: set fields directly; what/choices are live properties
        object.__setattr__(self, "registry", registry)
        object.__setattr__(self, "ok", lambda v: isinstance(v, str) and v in registry)
        object.__setattr__(self, "cast", lambda v: v)

    @property
    def what(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.registry.names())

    @property
    def choices(self) -> tuple:  # type: ignore[override]
        return tuple(self.registry.names())


def optional(check: Check) -> Check:
    return Check(f"{check.what} or null", lambda v: v is None or check.ok(v),
                 lambda v: None if v is None else check.cast(v), check.choices)


def list_of(check: Check, *, increasing: bool = False) -> Check:
    what = (f"a list of {check.what.removeprefix('a ').removeprefix('an ')}s"
            + (", strictly increasing" if increasing else ""))
    return Check(what, lambda v: isinstance(v, (list, tuple)) and all(check.ok(x) for x in v)
                 and (not increasing or all(a < b for a, b in zip(v, v[1:]))),
                 lambda v: [check.cast(x) for x in v])


ANY = Check("anything", lambda v: True)
BOOL = Check("true or false", lambda v: isinstance(v, bool))
STRING = Check("a non-empty string", lambda v: isinstance(v, str) and v != "")
MAPPING = Check("a mapping", lambda v: v is None or isinstance(v, Mapping), lambda v: dict(v or {}))


# ------------------------------------------------------------------------------------------- fields
def option(default: Any, check: Check, help: str, *, doc_default: str | None = None):
    """A dataclass field with its check and help (``REQUIRED`` as default: the key must be set)."""
    meta = {"check": check, "help": help, "doc_default": doc_default}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields(cls) -> list[dataclasses.Field]:
    """The declared options of ``cls`` (an options dataclass), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "check" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return REQUIRED


def parse(cls, values: Mapping[str, Any] | None, *, prefix: str, where: Callable[[str], str],
          owner: str = "") -> Any:
    """An instance of the options dataclass ``cls`` from ``values``: unknown keys get the closest valid
    key, bad values one line naming the key (``prefix`` + name), the source (``where(key)``) and what is
    expected; missing keys take their defaults. ``owner`` ("method 'kd'") is named in messages."""
    values = dict(values or {})
    known = {f.name: f for f in fields(cls)}
    for name in values:
        if name not in known:
            key = f"{prefix}{name}"
            if name in removed_options(cls):
                raise BlockKDError(f"{key} was removed in blockkd {cls.removed_in} ({cls.removed[name][0]}: see "
                                   f"docs/blockkd.md); delete it from {where(key)}")
            if not known:
                raise BlockKDError(f"{owner or prefix.rstrip('.')} takes no options, got {key} in {where(key)}")
            hint = closest(str(name), known) or _prefixed(str(name), known)
            tip = f"; did you mean {prefix + hint!r}?" if hint else f"; valid keys: {', '.join(known)}"
            raise BlockKDError(f"unknown key {key!r} in {where(key)}{tip}")
    out = {}
    for name, f in known.items():
        key = f"{prefix}{name}"
        if name not in values:
            default = default_of(f)
            if default is REQUIRED:
                raise BlockKDError(f"missing required key {key!r} in {where(key)}: {f.metadata['help']}")
            out[name] = default
            continue
        try:
            out[name] = f.metadata["check"](values[name])
        except ValueError as e:
            what, hint = (e.args + ("", ""))[:2]
            context = f" for {owner}" if owner else ""
            raise BlockKDError(f"invalid {key}={format_value(values[name])} in {where(key)}: expected {what}{context}"
                               f"{hint}") from None
    instance = cls(**out)
    post = getattr(instance, "check", None)  # cross-field checks declared by the dataclass
    if callable(post):
        try:
            post()
        except OptionError as e:
            raise BlockKDError(f"invalid {prefix}{e.key} in {where(prefix + e.key)}: {e}") from None
    return instance


def removed_options(cls) -> dict[str, tuple[str, Any]]:
    """``{name: (why, saved values that train as today's code does)}``: the options ``cls`` once had (a recipe
    that names one gets one line; the trainer refuses to resume a run whose saved value trained otherwise)."""
    return getattr(cls, "removed", {})


def _prefixed(name: str, known: Iterable[str]) -> str | None:
    """A known key that ``name`` abbreviates or extends (``T`` -> ``temperature``)."""
    low = name.lower()
    hits = [k for k in known if low and (k.lower().startswith(low) or low.startswith(k.lower()))]
    return max(hits, key=len, default=None)


def to_dict(instance: Any) -> dict[str, Any]:
    """The options as a plain mapping (what YAML and checkpoint metadata store)."""
    return {f.name: getattr(instance, f.name) for f in fields(type(instance))}


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, default, expected, help)`` rows for docs and listings."""
    rows = []
    for f in fields(cls):
        default = default_of(f)
        shown = f.metadata.get("doc_default") or ("(required)" if default is REQUIRED else format_value(default))
        rows.append((f"{prefix}{f.name}", shown, f.metadata["check"].what, f.metadata["help"]))
    return rows


def parse_named(cls, registry, values: Mapping[str, Any] | None, *, prefix: str, where: Callable[[str], str],
                kind: str, drop_foreign: bool | Callable[[str], bool] = False) -> Any:
    """A section whose ``name`` picks an entry of ``registry`` that declares further keys of its own
    (``entry.options``), written flat beside the common keys of ``cls``: ``optim: {name: sgd, lr: 0.1,
    momentum: 0.9}``. Returns ``cls`` with ``options`` set to the entry's options instance.

    A key of another entry is refused with the keys that apply (``null`` drops it instead: how an
    override switches ``schedule.name`` away from a base that set ``milestones``); ``drop_foreign``
    (a bool, or a function of the dotted key) drops such keys silently: a key set before the name was
    changed (by a base, for another choice), or a config saved by an older version, which stored every key."""
    values = dict(values or {})
    name_field = next(f for f in fields(cls) if f.name == "name")
    name = values.get("name", default_of(name_field))
    name_key = f"{prefix}name"
    if not isinstance(name, str) or not name:
        raise BlockKDError(f"invalid {name_key}={format_value(name)} in {where(name_key)}: expected a {kind} name")
    if name not in registry:
        err = unknown(kind, name, registry.names())
        raise type(err)(str(err).replace(repr(name), f"{name!r} ({name_key} in {where(name_key)})", 1)) from None
    own = registry.get(name).options
    common_names = {f.name for f in fields(cls)}
    own_names = {f.name for f in fields(own)}
    common, specific = {}, {}
    for key, value in values.items():
        if key in common_names:
            common[key] = value
        elif key in own_names:
            specific[key] = value
        elif value is None or ((drop_foreign(f"{prefix}{key}") if callable(drop_foreign) else drop_foreign)
                               and any(key in {f.name for f in fields(registry.get(o).options)}
                                       for o in registry.names())):
            continue
        elif any(key in {f.name for f in fields(registry.get(other).options)} for other in registry.names()):
            valid = ", ".join(sorted(common_names | own_names))
            raise BlockKDError(f"{prefix}{key} (set in {where(prefix + str(key))}) does not apply to {kind} {name!r}; "
                               f"its keys: {valid} (set {prefix}{key}=null to drop it)")
        else:  # unknown everywhere: the usual closest-key error among what applies
            parse(_merged(cls, own), {key: value}, prefix=prefix, where=where)
    base = parse(cls, common, prefix=prefix, where=where)
    return dataclasses.replace(base, options=parse(own, specific, prefix=prefix, where=where))


def _merged(cls, own) -> type:
    """A throw-away dataclass with the fields of both (for closest-key suggestions)."""
    spec = [(f.name, Any, dataclasses.field(default=None, metadata=f.metadata)) for f in fields(cls) + fields(own)]
    return dataclasses.make_dataclass("Keys", spec)


def named_to_dict(instance: Any) -> dict[str, Any]:
    """The flat mapping of a :func:`parse_named` section (common keys, then the entry's own)."""
    return {**to_dict(instance), **to_dict(instance.options)}
