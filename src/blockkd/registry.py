"""A tiny name -> factory registry shared by models, methods and splitters.

Why: every user-facing name (``blockkd train model=resnet8x4``) must give a one-line
error with the closest valid name when mistyped; one helper does that for all registries.
"""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from .errors import BlockKDError

T = TypeVar("T")


class UnknownNameError(BlockKDError, KeyError):
    """Raised for a name that is not registered; ``str()`` is one readable line."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


def closest(name: str, choices) -> str | None:
    """The closest valid choice to ``name`` (case-insensitive), or None."""
    choices = list(choices)
    lower = {c.lower(): c for c in choices}
    if name.lower() in lower:
        return lower[name.lower()]
    match = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.5)
    return lower[match[0]] if match else None


def unknown(kind: str, name: str, choices) -> UnknownNameError:
    """The error for an unknown ``name`` of a ``kind`` (model, method, key ...)."""
    hint = closest(name, choices)
    tip = f"; did you mean {hint!r}?" if hint else f"; choose from: {', '.join(sorted(choices))}"
    return UnknownNameError(f"unknown {kind} {name!r}{tip}")


class Registry(Generic[T]):
    """Ordered mapping of names to objects, with a decorator to fill it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """``registry.register("x", f)`` or ``@registry.register("x")``."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def deco(o: T) -> T:
            self._items[name] = o
            return o

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise unknown(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()
