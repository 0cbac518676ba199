"""What several test files share: tiny distillers, dotted recipe changes, and reading a run's metrics.

Why one module: a helper copied into several files drifts. Tests import these (``from helpers import ...``;
conftest.py puts tests/ on the path). What the benchmarks also use lives in benchmarks/ and tests import
it from there, never a copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import blockkd

SHAPE = (3, 32, 32)
# Wall-clock fields of metrics rows and summaries: they differ between runs that are otherwise equal.
TIMING = ("images_per_s", "train_time_s", "epoch_time_s", "wall_time_s")


def make(method: str, student: str = "resnet8", teacher: str = "resnet14", num_classes: int = 10,
         shape=SHAPE, **options) -> blockkd.methods.Distiller:
    """``method`` on fresh CIFAR-zoo models (tiny by default: resnet14 teaches resnet8)."""
    s = blockkd.models.create(student, num_classes=num_classes, in_channels=shape[0])
    t = blockkd.models.create(teacher, num_classes=num_classes, in_channels=shape[0])
    return blockkd.methods.create(method, s, t, input_shape=shape, **options)


def step_kwargs(d: nn.Module, n: int, x: torch.Tensor | None = None) -> dict[str, Any]:
    """The extra keywords of a training step on ``n`` samples, as the trainer passes them: their indices, for
    methods with per-sample state (``needs_index``: CRD's memory bank), and a second view of the batch ``x``
    for methods that ask for one (``needs_strong_view``: MLKD; here the flipped images stand in for it)."""
    kwargs: dict[str, Any] = {"index": torch.arange(n)} if getattr(d, "needs_index", False) else {}
    if getattr(d, "needs_strong_view", False) and x is not None:
        kwargs["x_strong"] = x.flip(-1)
    return kwargs


def with_changes(cfg: dict, **dotted: Any) -> dict:
    """``cfg`` with ``section__key=value`` changes applied in place (``method__options__gamma=2``)."""
    for key, value in dotted.items():
        *path, leaf = key.split("__")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def rows(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def untimed(obj: Any) -> Any:
    """Metrics rows or a summary without the wall-clock fields (and without the run folder's path)."""
    if isinstance(obj, list):
        return [untimed(r) for r in obj]
    return {k: v for k, v in obj.items() if k not in TIMING and k != "run_dir"}


def assert_shares(view: nn.Module, model: nn.Module) -> None:
    """Every parameter of the view is one of the model's (no copies), and all of them are used."""
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
