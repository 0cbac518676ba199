"""Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching" (WTTM), ICLR 2024.

TTM drops the temperature on the student and matches it to a power-transformed teacher,
p̃_t = p_t^γ / U_γ(p_t) with U_γ(p_t) = Σ_k p_t,k^γ (the same as a teacher at temperature 1/γ). WTTM weights
each sample by U_γ(p_t), which is large where the teacher is unsure, so those samples count more:

    L = ce_weight · CE(z_s, y) + beta · mean_i U_γ(p_t,i) · KL(p̃_t,i ‖ softmax(z_s,i))

This is the loss of the authors' code (zkxufo/TTM, ``distiller_zoo/wttm.py``, combined in
``helper/loops.py`` as ``gamma · CE + beta · WTTM``), equal to the paper's. The teacher is a constant.
Defaults: the README's WTTM example (γ = ``--ttm_l`` 0.2); the weight β of that example (4) is the one it
uses next to CRD; the per-pair (γ, β) of the paper's appendix are not in their repository and were not
readable here, so no CIFAR-100 recipe ships for WTTM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import number, option
from .registry import register
from .base import Distiller
from .kd import WEIGHT
from .losses import cross_entropy


def wttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float) -> torch.Tensor:
    """mean_i U_γ(p_t,i) · KL(p̃_t,i ‖ p_s,i), in float32, computed in log space (p^γ = exp(γ log p))."""
    log_p_s = F.log_softmax(student_logits.float(), dim=1)
    scaled = F.log_softmax(teacher_logits.float(), dim=1) * float(power)  # log p_t^γ
    log_u = scaled.logsumexp(1)  # log U_γ
    log_p_tilde = scaled - log_u[:, None]
    kl = (log_p_tilde.exp() * (log_p_tilde - log_p_s)).sum(1)
    return (log_u.exp() * kl).mean()


@dataclass(frozen=True)
class WTTMOptions:
    power: float = option(0.2, number(0, strict=True), "γ: the exponent of the teacher's power transform "
                                                         "(the authors' --ttm_l)")
    beta: float = option(4.0, WEIGHT, "β: weight of the U_γ-weighted KL to the transformed teacher")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")


@register("wttm")
class WTTM(Distiller):
    """WTTM: ce_weight · CE + beta · mean U_γ(p_t) · KL(p_t^γ / U_γ ‖ p_s)."""

    Options = WTTMOptions
    paper = "Zheng & Yang, Knowledge Distillation Based on Transformed Teacher Matching, ICLR 2024"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_wttm": o.beta * wttm_loss(logits, t_logits, o.power),
        }
