"""Learning-rate schedules by name, as a multiplier of the base lr per optimizer step.

Why per step and a LambdaLR: warm-up must ramp within an epoch, and a LambdaLR over the global step
keeps the whole schedule state in one integer (``last_epoch``), so a resumed run continues exactly.
Milestones are given in epochs (mdistiller's recipes) and fall on epoch boundaries. Every schedule
starts with an optional linear warm-up (``schedule.warmup_epochs``); each declares its own keys.
A resumed run with another ``train.epochs`` takes the new schedule from the resumed step on (see
``Trainer.apply_schedule`` and docs/running.md).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..registry import Registry
from ..schema import Check, integer, number, option

MILESTONES = Check("a list of strictly increasing integers >= 1",
                   lambda v: isinstance(v, (list, tuple)) and all(integer(1).ok(m) for m in v)
                   and all(a < b for a, b in zip(v, v[1:])), list)
MIN_LR = option(0.0, number(0), "lr at the end of the decay (absolute, not a factor)")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A schedule: its own keys (``options``) and ``main(progress_step, total_steps, opts, steps_per_epoch,
    floor) -> factor`` after the warm-up (``floor``: min_lr / base lr)."""

    options: type
    main: Callable[..., float]
    help: str


@dataclasses.dataclass(frozen=True)
class MultistepOptions:
    milestones: list = option([150, 180, 210], MILESTONES, "epochs at which lr *= gamma")
    gamma: float = option(0.1, number(0, strict=True), "decay factor at each milestone")


@dataclasses.dataclass(frozen=True)
class DecayOptions:
    min_lr: float = MIN_LR


@dataclasses.dataclass(frozen=True)
class NoOptions:
    pass


def _multistep(step, t, total, o, steps_per_epoch, floor):
    return o.gamma ** sum(step >= m * steps_per_epoch for m in o.milestones)


def _cosine(step, t, total, o, steps_per_epoch, floor):
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _linear(step, t, total, o, steps_per_epoch, floor):
    return floor + (1 - floor) * (1 - t)


SCHEDULES: Registry[Schedule] = Registry("schedule")
SCHEDULES.register("multistep", Schedule(MultistepOptions, _multistep, "lr × gamma at each milestone epoch"))
SCHEDULES.register("cosine", Schedule(DecayOptions, _cosine, "cosine decay to min_lr after the warm-up"))
SCHEDULES.register("linear", Schedule(DecayOptions, _linear, "linear decay to min_lr after the warm-up "
                                      "(transformer fine-tuning)"))
SCHEDULES.register("constant", Schedule(NoOptions, lambda *a: 1.0, "constant lr after the warm-up"))


def lr_factor(step: int, *, name: str, options, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0,
              base_lr: float = 1.0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based: the lr the step-th update uses)."""
    warmup = round(warmup_epochs * steps_per_epoch)
    warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    total = max(1, epochs * steps_per_epoch - warmup)
    t = min(1.0, max(0, step - warmup) / total)
    floor = getattr(options, "min_lr", 0.0) / base_lr if base_lr else 0.0
    return warm * SCHEDULES.get(name).main(step, t, total, options, steps_per_epoch, floor)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule, *, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """A LambdaLR for the validated ``schedule`` section, to be stepped once per optimizer step."""
    kwargs = dict(name=schedule.name, options=schedule.options, steps_per_epoch=steps_per_epoch, epochs=epochs,
                  warmup_epochs=schedule.warmup_epochs, base_lr=optimizer.param_groups[0]["lr"])

    def factor(step: int) -> float:  # a plain function: LambdaLR then saves no closure state (no pickle)
        return lr_factor(step, **kwargs)

    return LambdaLR(optimizer, factor)
