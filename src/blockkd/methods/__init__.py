"""Distillation methods: one module per method, one common interface (:class:`Distiller`).

``create(name, student, teacher=None, input_shape=(3, 32, 32), **options)`` builds a distiller;
``defaults(name)`` lists a method's options with their default values (the config layer validates
recipes against it before any work starts).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ..errors import BlockKDError
from ..registry import Registry, unknown
from .base import Distiller

METHODS: Registry[type[Distiller]] = Registry("method")


def register(name: str):
    """Class decorator registering a :class:`Distiller` subclass under ``name``."""
    return METHODS.register(name)


def names() -> list[str]:
    return METHODS.names()


def get(name: str) -> type[Distiller]:
    return METHODS.get(name)


def defaults(name: str) -> dict[str, Any]:
    """The options of method ``name`` and their default values."""
    return dict(get(name).defaults)


def needs_teacher(name: str) -> bool:
    return get(name).needs_teacher


def create(name: str, student: nn.Module, teacher: nn.Module | None = None,
           input_shape: tuple[int, ...] = (3, 32, 32), **options) -> Distiller:
    """Build the distiller ``name`` around ``student`` (and ``teacher``), validating ``options``."""
    cls = get(name)
    for key in options:
        if key not in cls.defaults:
            raise unknown(f"option of method {name!r}", key, cls.defaults)
    if cls.needs_teacher and teacher is None:
        raise BlockKDError(f"method {name!r} needs a teacher (set teacher.name and teacher.checkpoint)")
    opts = {**cls.defaults, **options}
    return cls(student, teacher, input_shape=tuple(input_shape), **opts)


# Registration happens on import of each method module.
from . import ce, kd, dkd, blockkd  # noqa: E402,F401

__all__ = ["Distiller", "create", "defaults", "get", "names", "needs_teacher", "register"]
