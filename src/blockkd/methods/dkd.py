"""Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022."""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import number, option
from .registry import register
from .base import Distiller
from .kd import TEMPERATURE, WEIGHT
from .divergences import LogitDivergence, logit_standardization_option
from .losses import cross_entropy, linear_warmup


@dataclass(frozen=True)
class DKDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of the softened softmax (KL scaled by T²)")
    alpha: float = option(1.0, WEIGHT, "weight of TCKD (target vs. non-target)")
    beta: float = option(8.0, WEIGHT, "weight of NCKD (among the non-target classes)")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    warmup: float = option(20.0, number(0), "epochs over which TCKD and NCKD ramp up linearly from 0")
    logit_standardization: bool = logit_standardization_option()


@register("dkd")
class DKD(Distiller):
    """DKD: ce_weight · CE + warm-up · (alpha · TCKD + beta · NCKD).

    The KD terms ramp up linearly, ``min(epoch / warmup, 1)``, with ``epoch`` the float training
    progress passed by the trainer (1.0 at the end of the first epoch, as in mdistiller). With
    ``logit_standardization`` both sets of logits are z-scored per sample first (Sun et al., CVPR 2024).
    """

    Options = DKDOptions
    paper = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"

    def warmup_factor(self, epoch: float) -> float:
        return linear_warmup(epoch, self.opts.warmup)

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        tckd, nckd = LogitDivergence("dkd", o.temperature, o.logit_standardization).parts(logits, t_logits, y)
        ramp = self.warmup_factor(epoch)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_tckd": ramp * o.alpha * tckd,
            "loss_nckd": ramp * o.beta * nckd,
        }
