"""blockkd: Block-wise Logit Distillation (Block-KD) and a knowledge-distillation toolkit.

Why the lazy attributes: ``import blockkd`` (and so ``blockkd --help``/``--version``) must not pay for
importing torch; ``blockkd.models``, ``blockkd.methods``, ``blockkd.Blocks`` and ``blockkd.split`` are
imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Blocks", "split", "models", "methods"]
__version__ = "0.1.0"

_LAZY = {"models": ".models", "methods": ".methods", "Blocks": ".blocks", "split": ".blocks"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'blockkd' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name in ("models", "methods") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
