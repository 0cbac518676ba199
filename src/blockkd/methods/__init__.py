"""Distillation methods: one module per method, one common interface (:class:`Distiller`).

``create(name, student, teacher=None, input_shape=None, **options)`` builds a distiller;
each method declares its options once, as a dataclass (``get(name).Options``, see
:mod:`blockkd.schema`): ``parse_options`` validates a recipe's options against it before any work
starts, ``describe(name)`` lists them for the CLI and the docs.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch.nn as nn

from .. import schema
from ..blocks.core import as_input_spec, text_input
from ..errors import BlockKDError
from ..registry import Registry
from .base import Distiller

METHODS: Registry[type[Distiller]] = Registry("method")


def register(name: str):
    """Class decorator registering a :class:`Distiller` subclass under ``name``."""
    return METHODS.register(name)


def names() -> list[str]:
    return METHODS.names()


def get(name: str) -> type[Distiller]:
    return METHODS.get(name)


def parse_options(name: str, values: Mapping[str, Any] | None, *,
                  where: Callable[[str], str] = lambda key: "the method's options") -> Any:
    """Method ``name``'s options dataclass from ``values`` (defaults filled in, every value checked)."""
    return schema.parse(get(name).Options, values, prefix="method.options.", where=where,
                        owner=f"method {name!r}")


def defaults(name: str) -> dict[str, Any]:
    """The options of method ``name`` and their default values."""
    return schema.to_dict(get(name).Options())


def describe(name: str) -> list[tuple[str, str, str, str]]:
    """``(option, default, expected, help)`` for each option of method ``name``."""
    return schema.describe(get(name).Options)


def needs_teacher(name: str) -> bool:
    return get(name).needs_teacher


def default_input(*models: nn.Module | None) -> Any:
    """The input spec ``create`` assumes without one: token ids and a mask for Hugging Face text models (they
    say so with ``main_input_name``), 16 tokens or the shortest ``max_position_embeddings``; else 32-px RGB."""
    text = [m for m in models if getattr(m, "main_input_name", None) == "input_ids"]
    if not text:
        return (3, 32, 32)
    limits = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in text]
    return text_input(min([16, *(n for n in limits if isinstance(n, int) and n > 0)]))


def create(name: str, student: nn.Module, teacher: nn.Module | None = None,
           input_shape: Any = None, options: Any = None, **values) -> Distiller:
    """Build the distiller ``name`` around ``student`` (and ``teacher``).

    ``input_shape`` is the input spec: an image shape (C, H, W), or for text a mapping of per-sample
    shapes such as ``blockkd.blocks.text_input(128)`` (``{"input_ids": (128,), "attention_mask": (128,)}``);
    None: :func:`default_input` (text for Hugging Face text models, else ``(3, 32, 32)``).

    Options come either validated (``options``: the method's ``Options`` instance, as the engine passes
    them) or as keywords, checked here: ``create("kd", s, t, temperature=2)``.
    """
    cls = get(name)
    if options is None:
        options = parse_options(name, values)
    elif values:
        raise BlockKDError("pass the options either as an Options instance or as keywords, not both")
    if cls.needs_teacher and teacher is None:
        raise BlockKDError(f"method {name!r} needs a teacher (set teacher.name and teacher.checkpoint)")
    spec = default_input(student, teacher) if input_shape is None else input_shape
    return cls(student, teacher, options, as_input_spec(spec))


# Registration happens on import of each method module.
from . import ce, kd, dkd, blockkd, fitnet, at, sp, rkd, pkt, nst, kdsvd, dist, ofd, reviewkd, crd, vid, lm, lm_blockkd  # noqa: E402,F401

__all__ = ["Distiller", "create", "defaults", "describe", "get", "names", "needs_teacher", "parse_options",
           "register"]
