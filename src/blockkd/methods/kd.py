"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import number, option
from . import register
from .base import Distiller
from .losses import cross_entropy, kl_div

TEMPERATURE = number(0, strict=True)
WEIGHT = number(0)


@dataclass(frozen=True)
class KDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of the softened softmax (KL scaled by T²)")
    ce_weight: float = option(0.1, WEIGHT, "weight of the cross-entropy with the labels")
    kd_weight: float = option(0.9, WEIGHT, "weight of T²·KL(teacher ‖ student)")


@register("kd")
class KD(Distiller):
    """Classic KD: ce_weight · CE + kd_weight · T² · KL(teacher ‖ student) (mdistiller's CIFAR defaults)."""

    Options = KDOptions
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_kd": o.kd_weight * kl_div(logits, t_logits, o.temperature),
        }
