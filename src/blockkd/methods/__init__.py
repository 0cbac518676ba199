"""Distillation methods: one module per method, one common interface (:class:`Distiller`).

``create(name, student, teacher=None, input_shape=(3, 32, 32), **options)`` builds a distiller;
each method declares its options once, as a dataclass (``get(name).Options``, see
:mod:`blockkd.schema`): ``parse_options`` validates a recipe's options against it before any work
starts, ``describe(name)`` lists them for the CLI and the docs.

Adding a method is adding a file: every module of this package is imported here, in name order, and
must register at least one :class:`Distiller` with ``@register`` from :mod:`.registry`, except the
shared helpers named in ``HELPERS`` (tests/test_method_contract.py checks both rules).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Distiller
from .registry import (METHODS, create, default_input, defaults, describe, get, names, needs_teacher, parse_options,
                       register)

# Modules that hold what several methods share and register no method.
HELPERS = ("base", "connectors", "divergences", "feature", "losses", "registry", "stone_grad", "stones")


def method_modules() -> list[str]:
    """The names of the modules that define methods: every module of this package but the ``HELPERS``."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in HELPERS)


for _module in method_modules():
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Distiller", "METHODS", "HELPERS", "create", "default_input", "defaults", "describe", "get",
           "method_modules", "names", "needs_teacher", "parse_options", "register"]
