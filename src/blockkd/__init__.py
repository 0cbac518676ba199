"""blockkd: Block-wise Logit Distillation (Block-KD) and a knowledge-distillation toolkit.

Why the lazy attributes: ``import blockkd`` (and so ``blockkd --help``/``--version``) must not pay for
importing torch; ``blockkd.models``, ``blockkd.methods`` (any submodule) and ``blockkd.Blocks``/``blockkd.split``
are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Blocks", "split", "models", "methods"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Blocks", "split"):
        value = getattr(importlib.import_module(".blocks", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'blockkd' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
