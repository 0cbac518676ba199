"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import number, option
from .registry import register
from .base import Distiller
from .divergences import LogitDivergence, logit_standardization_option
from .losses import cross_entropy

TEMPERATURE = number(0, strict=True)
WEIGHT = number(0)


@dataclass(frozen=True)
class KDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of the softened softmax (KL scaled by T²)")
    ce_weight: float = option(0.1, WEIGHT, "weight of the cross-entropy with the labels")
    kd_weight: float = option(0.9, WEIGHT, "weight of T²·KL(teacher ‖ student)")
    logit_standardization: bool = logit_standardization_option()


@register("kd")
class KD(Distiller):
    """Classic KD: ce_weight · CE + kd_weight · T² · KL(teacher ‖ student) (mdistiller's CIFAR defaults).

    With ``logit_standardization`` both sets of logits are z-scored per sample before the softmax
    (:mod:`blockkd.methods.divergences`).
    """

    Options = KDOptions
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, 2015"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        kl = LogitDivergence("kl", o.temperature, o.logit_standardization)
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_kd": o.kd_weight * kl(logits, t_logits),
        }
