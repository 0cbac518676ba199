"""Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022."""
from __future__ import annotations

from . import register
from .base import Distiller
from .losses import cross_entropy, dkd_parts, linear_warmup


@register("dkd")
class DKD(Distiller):
    """DKD: ce_weight · CE + warm-up · (alpha · TCKD + beta · NCKD).

    The KD terms ramp up linearly, ``min(epoch / warmup, 1)``, with ``epoch`` the float training
    progress passed by the trainer (1.0 at the end of the first epoch, as in mdistiller).
    """

    defaults = {"temperature": 4.0, "alpha": 1.0, "beta": 8.0, "ce_weight": 1.0, "warmup": 20.0}

    def __init__(self, student, teacher, input_shape=(3, 32, 32), *, temperature, alpha, beta, ce_weight, warmup):
        super().__init__(student, teacher, input_shape)
        self.temperature, self.alpha, self.beta = float(temperature), float(alpha), float(beta)
        self.ce_weight, self.warmup = float(ce_weight), float(warmup)

    def warmup_factor(self, epoch: float) -> float:
        return linear_warmup(epoch, self.warmup)

    def forward_train(self, x, y, *, epoch):
        logits = self.student(x)
        t_logits = self.teacher_logits(x)
        tckd, nckd = dkd_parts(logits, t_logits, y, self.temperature)
        ramp = self.warmup_factor(epoch)
        return logits, {
            "loss_ce": self.ce_weight * cross_entropy(logits, y),
            "loss_tckd": ramp * self.alpha * tckd,
            "loss_nckd": ramp * self.beta * nckd,
        }
