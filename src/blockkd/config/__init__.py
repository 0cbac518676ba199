"""Recipes: ``load(path, overrides) -> Config``, a typed, fully validated run description.

Why: a mistyped key or a bad value must stop a run before any work starts, with one line that names
the key, the file it came from and what is expected (or the closest valid key or name). Every section
is declared once as a dataclass (``sections``; ``data``/``optim``/``schedule`` beside their registries;
each method's options in its own file), so validation, ``blockkd methods`` and ``docs/config.md``
(:func:`reference`) come from the same declarations. The engine receives a :class:`Config` and
trusts it; ``Config.to_dict()`` is what runs store (only the keys that apply to the run).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from .. import data, methods, models, optim, schema
from . import paths
from ..errors import BlockKDError
from ..registry import UnknownNameError, unknown
from .keys import PLAIN, declared_keys, named
from .recipe import (SECTIONS, check_keys, compose, dump as _dump, origin, parse_overrides, parse_value, _show,
                     _unknown_key)
from .sections import MethodSection, ModelSection, OutputSection, TeacherSection, TrainSection

__all__ = ["Config", "load", "validate", "dump", "run_name", "parse_overrides", "parse_value", "parse_data_overrides",
           "check", "fingerprint", "flat_keys", "reference", "SECTIONS"]

@dataclasses.dataclass(frozen=True)
class Config:
    """A validated recipe. ``origins`` maps dotted keys to the file or override that set them."""

    model: ModelSection
    teacher: TeacherSection
    method: MethodSection
    data: Any  # blockkd.data.DataSection
    optim: Any  # sections.OptimSection
    schedule: Any  # sections.ScheduleSection
    train: TrainSection
    output: OutputSection
    source: str = dataclasses.field(default="config", compare=False)
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def where(self, key: str) -> str:
        """The file or override that set the dotted ``key`` (the recipe itself for defaults)."""
        return origin(self.origins, key, self.source)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The recipe as stored in ``config.yaml`` and checkpoints: every key that applies to this run."""
        out: dict[str, dict[str, Any]] = {}
        for section in SECTIONS:
            value = getattr(self, section)
            if section == "method":
                out[section] = {"name": value.name, "options": schema.to_dict(value.options)}
            elif section in PLAIN:
                out[section] = schema.to_dict(value)
            else:
                out[section] = schema.named_to_dict(value)
        return out

    def __getitem__(self, section: str) -> dict[str, Any]:
        """``cfg["optim"]``: a section in its stored form (a copy; the typed sections are the attributes)."""
        return self.to_dict()[section]

    def __iter__(self):
        return iter(SECTIONS)

    def keys(self):
        return list(SECTIONS)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)

    @property
    def needs_teacher(self) -> bool:
        return methods.needs_teacher(self.method.name)


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """The validated config of the recipe at ``path`` with ``key=value`` ``overrides``."""
    path = Path(path)
    if not path.is_file():
        folder = " (it is a folder)" if path.is_dir() else ""
        raise BlockKDError(f"recipe file not found: {_show(path.absolute())}{folder}")
    raw, origins = compose(path, overrides)
    return validate(raw, origins=origins, source=_show(path.resolve()))


def validate(cfg: Mapping | Config, *, origins: Mapping[str, str] | None = None, source: str = "config") -> Config:
    """A :class:`Config` from a nested mapping (idempotent: a Config, or its ``to_dict()``, validates to itself).

    Checks every key and value, the model, teacher, method, dataset, optimizer and schedule names
    (closest-name errors) and the method's options, without building anything.
    """
    if isinstance(cfg, Config):
        return cfg
    origins = dict(origins or {})
    where = lambda key: origin(origins, key, source)  # noqa: E731
    check_keys(cfg, where)
    raw = {s: dict(cfg.get(s) or {}) for s in SECTIONS}

    def recipe_of(key: str) -> Path | None:
        """The recipe file that set ``key``; None for an override or a mapping given in Python."""
        src = origin(origins, key, "")
        return Path(src) if src and not src.startswith("override ") and Path(src).is_file() else None

    paths.resolve(raw, recipe_of)  # relative paths -> absolute, once (config/paths.py)
    sections: dict[str, Any] = {}
    for name, cls in PLAIN.items():
        sections[name] = schema.parse(cls, raw[name], prefix=f"{name}.", where=where)
    order = list(origins.pop("__order__", []))

    def set_before_name(key: str) -> bool:
        """A choice's key set by an earlier layer than the section's name: it was meant for the old choice."""
        name_key = key.rsplit(".", 1)[0] + ".name"
        if name_key not in origins:  # the name is the default: nothing changed it
            return False
        a, b = origin(origins, key, source), origins[name_key]
        return a in order and b in order and order.index(a) < order.index(b)

    for name in ("data", "optim", "schedule"):
        cls, registry, kind = named(name)
        sections[name] = schema.parse_named(cls, registry, raw[name], prefix=f"{name}.", where=where, kind=kind,
                                            drop_foreign=set_before_name)
    sections["method"] = _method(raw["method"], where)
    _check_models(sections, where)
    config = Config(**sections, source=source, origins=origins)
    _check_teacher(config)
    _check_optimizer(config)
    if config.output.name is None:
        config = config.replace(output=dataclasses.replace(config.output, name=run_name(config)))
    return config


def _method(raw: dict, where) -> MethodSection:
    base = schema.parse(MethodSection, {k: v for k, v in raw.items() if k == "name"}, prefix="method.", where=where)
    if base.name not in methods.names():
        err = unknown("method", base.name, methods.names())
        raise type(err)(str(err).replace(repr(base.name), f"{base.name!r} (method.name in {where('method.name')})", 1))
    options = raw.get("options")
    if options is not None and not isinstance(options, Mapping):
        raise BlockKDError(f"invalid method.options={schema.format_value(options)} in {where('method.options')}: "
                           f"expected a mapping")
    return dataclasses.replace(base, options=methods.parse_options(base.name, options, where=where))


def _check_models(sections: dict, where) -> None:
    """Model and teacher names must be creatable (closest-name errors naming the key and its source)."""
    for key, kind in (("model", "model"), ("teacher", "teacher model")):
        value = sections[key].name
        if value is None:
            continue
        try:
            models.check_name(value)
        except UnknownNameError as err:
            message = str(err).replace("unknown model", f"unknown {kind}", 1)
            raise UnknownNameError(message.replace(repr(value), f"{value!r} ({key}.name in {where(key + '.name')})", 1)
                                   ) from None
        kwargs = sections[key].kwargs
        if kwargs and models.external.family(value) not in ("torchvision", "timm"):
            raise BlockKDError(f"{key}.kwargs (in {where(key + '.kwargs')}) are a torchvision.* or timm.* model's "
                               f"constructor arguments; {key}.name is {value}: remove them or register a model "
                               f"(blockkd.models.register) that takes them")
        reserved = [k for k in kwargs if k in models.external.RESERVED_KWARGS]
        if reserved:
            raise BlockKDError(f"{key}.kwargs.{reserved[0]} (in {where(key + '.kwargs')}) is set by blockkd from the "
                               f"data and the checkpoint keys; remove it")


def _check_teacher(cfg: Config) -> None:
    name, teacher = cfg.method.name, cfg.teacher
    if not cfg.needs_teacher:
        return
    if teacher.cache is not None:  # the cached logits stand for the teacher (checked against the data in build)
        return
    if teacher.name is None:
        raise BlockKDError(f"method {name!r} needs a teacher: set teacher.name in {cfg.source} or on the command line")
    if teacher.checkpoint is None and not teacher.allow_random and not teacher.name.startswith("hf."):
        # (hf.<id or folder>: from_pretrained loads the weights named, e.g. a teacher fine-tuned elsewhere)
        raise BlockKDError(f"method {name!r} needs the teacher's weights: set teacher.checkpoint in {cfg.source} or on "
                           f"the command line, e.g. teacher.checkpoint=path/to/{teacher.name}.pth")


def _check_optimizer(cfg: Config) -> None:
    """An optimizer that takes the task and distillation gradients apart (DOT) refuses fp16 loss scaling
    and gradient clipping (see ``blockkd.engine.trainer.backward_split``)."""
    if not optim.OPTIMIZERS.get(cfg.optim.name).needs_loss_split:
        return
    for key, bad, fix in (("train.amp", cfg.train.amp == "fp16", "bf16 or off"),
                          ("train.grad_clip", cfg.train.grad_clip is not None, "null")):
        if bad:
            raise BlockKDError(f"optim.name={cfg.optim.name!r} (in {cfg.where('optim.name')}) keeps the task and "
                               f"distillation gradients apart and does not work with {key}="
                               f"{schema.format_value(getattr(cfg.train, key.split('.')[1]))} (in {cfg.where(key)}); "
                               f"set {key} to {fix}")


def run_name(cfg: Config) -> str:
    """Default run folder name: dataset, teacher (when used), model, method and a non-zero seed."""
    teacher = cfg.teacher.name if cfg.needs_teacher else None
    parts = [cfg.data.name, paths.short(teacher), paths.short(cfg.model.name), cfg.method.name]
    seed = cfg.train.seed
    name = "-".join(p for p in parts if p) + (f"-seed{seed}" if seed else "")
    return name.replace("/", "_")  # hf.google/bert_... and hf-config.<path> name no sub-folders


def dump(cfg: Config | Mapping) -> str:
    """``cfg`` as YAML, sections in schema order (``load`` of the result gives ``cfg`` back)."""
    return _dump(cfg.to_dict() if isinstance(cfg, Config) else dict(cfg))


def check(key: str, value: Any, where: str = "the command line") -> Any:
    """``value`` checked (and normalised) as the key ``key`` of a plain section, e.g. ``--device``."""
    section, name = key.split(".", 1)
    return getattr(schema.parse(PLAIN[section], {name: value}, prefix=f"{section}.", where=lambda k: where), name)


def data_overrides(items: Iterable[str]) -> dict[str, tuple[Any, str]]:
    """``["batch_size=256", "root=/data"]`` (``blockkd eval --data``) -> ``{key: (value, item)}``; syntax and
    key names checked (closest key) before any run is read."""
    known = [f"data.{k}" for k in declared_keys("data")]
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise BlockKDError(f"--data {item!r} must look like key=value, e.g. batch_size=256")
        if f"data.{key}" not in known:
            raise _unknown_key(f"data.{key}", f"--data {item!r}", known)
        out[key] = (parse_value(text), item)
    return out


def parse_data_overrides(items: Iterable[str] | Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` (a run's flat data section) with the overrides applied and checked (``blockkd eval --data``):
    ``["batch_size=256", "root=/data"]``, or a mapping of keys to values."""
    if isinstance(items, Mapping):
        items = [f"{k}={schema.format_value(v)}" for k, v in items.items()]
    values = dict(base)
    sources = {}
    for key, (value, item) in data_overrides(items).items():
        values[key] = value
        sources[f"data.{key}"] = f"--data {item!r}"
    # The run's own keys of another dataset (an older version stored them all) are dropped; a --data key
    # that does not apply to the run's dataset is refused, as train refuses it.
    return data.parse(values, where=lambda k: sources.get(k, "the run's config"),
                      drop_foreign=lambda k: k not in sources).flat()


def flat_keys(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (empty mappings stay leaves)."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, Mapping) and v:
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys added after fingerprints named cached teachers and benchmark runs, with the value that trains as before
# they existed: left out of the fingerprint at that value, so what was cached keeps its name.
ADDED_KEYS = {"train.precise_bn": 0}


def fingerprint(cfg: Config | Mapping, ignore: Iterable[str] = ("output",)) -> str:
    """A short stable hash of ``cfg`` without the ``ignore``d sections/dotted keys.

    Why: a cached artefact (the demo's teacher) is reused only when the recipe that made it is the same.
    """
    d = cfg.to_dict() if isinstance(cfg, Config) else cfg
    flat = {k: v for k, v in flat_keys(d).items() if not any(k == i or k.startswith(i + ".") for i in ignore)
            and not (k in ADDED_KEYS and v == ADDED_KEYS[k])}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:12]


def reference() -> str:
    """The markdown tables of every key, generated from the declarations (``docs/config.md``)."""
    def table(rows) -> list[str]:
        out = ["| key | default | expected | meaning |", "|---|---|---|---|"]
        return out + [f"| `{k}` | {d} | {e} | {h} |".replace("\n", " ") for k, d, e, h in rows]

    lines: list[str] = []
    for section in SECTIONS:
        lines += [f"### `{section}`", ""]
        if section in PLAIN:
            lines += table(schema.describe(PLAIN[section], f"{section}."))
        elif section == "method":
            lines += table(schema.describe(MethodSection, "method."))
            lines += ["", "`method.options` are the chosen method's own (`blockkd methods`):", ""]
            for name in methods.names():
                rows = schema.describe(methods.get(name).Options, "")
                lines += [f"- `{name}`: " + ("; ".join(f"`{k}` ({d}): {h}" for k, d, _, h in rows) or "no options")]
        else:
            cls, registry, kind = named(section)
            lines += table(schema.describe(cls, f"{section}."))
            lines += ["", f"Keys of each {kind} (`{section}.name`), beside the ones above:", ""]
            for name in registry.names():
                entry = registry.get(name)
                rows = schema.describe(entry.options, "")
                own = "; ".join(f"`{k}` ({d}): {h}" for k, d, _, h in rows) if section != "optim" else \
                    ", ".join(f"`{k}` ({d})" for k, d, _, _ in rows)
                lines += [f"- `{name}` — {entry.help}" + (f": {own}" if own else "")]
        lines.append("")
    return "\n".join(lines)
