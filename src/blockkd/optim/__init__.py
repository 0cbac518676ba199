"""Optimizers and learning-rate schedules, each chosen by name (``optim.name``, ``schedule.name``).

``OPTIMIZERS`` holds ``torch.optim``'s classes with typed options read from their signatures;
``dot`` adds DOT, the Distillation-Oriented Trainer (its own momenta for the task and the distillation
gradients); ``SCHEDULES`` the per-step lr schedules (multistep, cosine, linear, constant, each after an optional
linear warm-up). Both are registries, so a mistyped name gets the closest valid one.
"""
from .dot import DOT, DOTOptions
from .optimizers import OPTIMIZERS, Optimizer, build_optimizer
from .schedules import SCHEDULES, Schedule, build_scheduler, lr_factor

__all__ = ["DOT", "DOTOptions", "OPTIMIZERS", "Optimizer", "build_optimizer", "SCHEDULES", "Schedule",
           "build_scheduler", "lr_factor"]
