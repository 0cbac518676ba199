"""Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"."""
from __future__ import annotations

from . import register
from .base import Distiller
from .losses import cross_entropy, kl_div


@register("kd")
class KD(Distiller):
    """Classic KD: ce_weight · CE + kd_weight · T² · KL(teacher ‖ student) (mdistiller's CIFAR defaults)."""

    defaults = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}

    def __init__(self, student, teacher, input_shape=(3, 32, 32), *, temperature, ce_weight, kd_weight):
        super().__init__(student, teacher, input_shape)
        self.temperature, self.ce_weight, self.kd_weight = float(temperature), float(ce_weight), float(kd_weight)

    def forward_train(self, x, y, *, epoch):
        logits = self.student(x)
        t_logits = self.teacher_logits(x)
        return logits, {
            "loss_ce": self.ce_weight * cross_entropy(logits, y),
            "loss_kd": self.kd_weight * kl_div(logits, t_logits, self.temperature),
        }
