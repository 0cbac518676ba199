"""Learning-rate schedules as a multiplier of the base lr per optimizer step.

Why per step and a LambdaLR: warm-up must ramp within an epoch, and a LambdaLR over the global step
keeps the whole schedule state in one integer (``last_epoch``), so a resumed run continues exactly.
Milestones are given in epochs (mdistiller's recipes) and fall on epoch boundaries.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import BlockKDError

NAMES = ("multistep", "cosine", "constant")


def lr_factor(step: int, *, name: str, steps_per_epoch: int, epochs: int, milestones=(), gamma: float = 0.1,
              warmup_epochs: float = 0, min_lr: float = 0.0, base_lr: float = 1.0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based: the lr the step-th update uses)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if name == "constant":
        main = 1.0
    elif name == "multistep":
        main = gamma ** sum(step >= m * steps_per_epoch for m in milestones)
    elif name == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup)
        t = min(1.0, max(0, step - warmup) / total)
        floor = min_lr / base_lr if base_lr else 0.0
        main = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    else:
        raise BlockKDError(f"unknown schedule.name {name!r}; choose from {', '.join(NAMES)}")
    return warm * main


def schedule_fn(schedule_cfg: dict, *, steps_per_epoch: int, epochs: int, base_lr: float) -> Callable[[int], float]:
    """``step -> factor`` for the recipe's ``schedule`` section."""
    c = schedule_cfg
    name = c.get("name", "multistep")
    if name not in NAMES:
        raise BlockKDError(f"unknown schedule.name {name!r}; choose from {', '.join(NAMES)}")
    kwargs = dict(name=name, steps_per_epoch=steps_per_epoch, epochs=epochs,
                  milestones=tuple(c.get("milestones") or ()), gamma=float(c.get("gamma", 0.1)),
                  warmup_epochs=float(c.get("warmup_epochs") or 0), min_lr=float(c.get("min_lr") or 0.0),
                  base_lr=base_lr)

    def factor(step: int) -> float:  # a plain function: LambdaLR then saves no closure state (no pickle)
        return lr_factor(step, **kwargs)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: dict, *, steps_per_epoch: int,
                    epochs: int) -> LambdaLR:
    """A LambdaLR to be stepped once per optimizer step."""
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, schedule_fn(schedule_cfg, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                           base_lr=base_lr))
