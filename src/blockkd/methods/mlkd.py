"""Jin et al., "Multi-Level Logit Distillation" (MLKD), CVPR 2023.

MLKD aligns the student's and the teacher's predictions at three levels, each at several temperatures τ:
the instance level (τ²·KL of each sample's softened prediction), the batch level (the B×B Gram matrix
P Pᵀ of the batch's predictions: which samples look alike) and the class level (the C×C matrix Pᵀ P: which
classes are predicted together), on the usual (weak) view and on a second, strongly augmented view of each
sample (RandAugment + Cutout, :mod:`blockkd.data.strong`; the trainer passes it as ``x_strong``). With
P_v,τ = softmax(z_v / τ), w the weak view, s the strong one and Σ over the temperatures:

    L = ce_weight · (CE(z_s^w, y) + CE(z_s^s, y))
      + kd_weight · Σ [ m · τ²KL_w,τ + τ²KL_v(τ),τ ]                          (loss_kd)
      + kd_weight · m_c · Σ ‖Pᵀ_t P_t − Pᵀ_s P_s‖² / C  (weak view)            (loss_cc)
      + kd_weight · m · Σ ‖P_t Pᵀ_t − P_s Pᵀ_s‖² / B  (weak view)             (loss_bc)

Follows the authors' code (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``,
trainer ``ours`` = ``AugTrainer``) rather than the paper where they differ, because the published numbers
come from it:

- the temperatures are ``KD.TEMPERATURE`` then 3, 5, 2, 6 (the paper says 2–6; at ImageNet's T = 1 the
  code uses 1, 3, 5, 2, 6); ``temperatures`` lists them;
- the strong-view instance term compares the strong view at the first three temperatures and the weak view
  again at the last two (``v(τ)`` above; ``strong_view_temperatures`` = 3; set it to the number of
  temperatures for the paper's all-strong form);
- the class and batch terms are taken on the weak view only (the code computes strong-view ones and drops
  them from its loss dict);
- the "confidence-based masking": the code thresholds the teacher's weak-view confidence (max softmax, T 1)
  at its batch median and multiplies the batch-*averaged* loss by the mask before averaging again, so each
  masked term is scaled by m, the fraction of samples whose confidence is at most the median (½ for an
  even batch of distinct values), not restricted to those samples as the paper describes; the class term
  likewise by m_c, the fraction of classes whose summed teacher probability is at most its median. The
  median is numpy's percentile 50 (linear interpolation), here ``torch.quantile``.

With ``logit_standardization`` (MLKD+LS, Sun et al., CVPR 2024; sunshangquan/logit-standardization-KD
``mdistiller/distillers/MLKD.py``) both sets of logits are z-scored per sample in the instance terms only,
as there; the masks, class and batch terms use the raw logits. Losses are computed in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BlockKDError
from ..schema import integer, list_of, option
from .registry import register
from .base import Distiller
from .divergences import LogitDivergence, logit_standardization_option
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy


def class_alignment(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """‖Pᵀ_t P_t − Pᵀ_s P_s‖² / C: how the batch's predictions co-activate the classes (C×C)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2).sum() / p_s.shape[1]


def batch_alignment(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """‖P_t Pᵀ_t − P_s Pᵀ_s‖² / B: how alike the batch's samples are predicted (B×B)."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2).sum() / p_s.shape[0]


def below_median_fraction(values: torch.Tensor) -> torch.Tensor:
    """The fraction of ``values`` at most their median (numpy's percentile 50): the authors' mask, averaged."""
    return (values <= torch.quantile(values, 0.5)).float().mean()


@dataclass(frozen=True)
class MLKDOptions:
    temperatures: list = option([4.0, 3.0, 5.0, 2.0, 6.0], list_of(TEMPERATURE),
                                "the temperatures of every level (the authors' KD.TEMPERATURE, then 3, 5, 2, 6)")
    strong_view_temperatures: int = option(3, integer(0), "how many of the first temperatures compare the strong "
                                                          "view in its instance term (the others the weak view "
                                                          "again, as the authors' code)")
    ce_weight: float = option(0.1, WEIGHT, "weight of the cross-entropy of each view with the labels")
    kd_weight: float = option(0.9, WEIGHT, "weight of every instance, batch and class term")
    logit_standardization: bool = logit_standardization_option()


@register("mlkd")
class MLKD(Distiller):
    """MLKD: CE on both views + instance, batch and class alignment at several temperatures (see the module)."""

    Options = MLKDOptions
    paper = "Jin et al., Multi-Level Logit Distillation, CVPR 2023"
    needs_strong_view = True

    def __init__(self, student, teacher=None, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        if not self.opts.temperatures:
            raise BlockKDError("method.options.temperatures is empty: MLKD needs at least one temperature")

    def forward_train(self, x, y, *, epoch, x_strong=None):
        if x_strong is None:
            raise BlockKDError("mlkd compares a second, strongly augmented view of each sample: pass it as "
                               "x_strong=... (the trainer passes its training loader's)")
        o = self.opts
        s_w, s_s = self.student_logits(x), self.student_logits(x_strong)
        t_w, t_s = self.teacher_logits(x), self.teacher_logits(x_strong)
        with torch.no_grad():
            p_t = F.softmax(t_w.float(), dim=1)
            m = below_median_fraction(p_t.amax(1))  # samples the teacher is least sure of (see the module)
            m_c = below_median_fraction(p_t.sum(0))  # classes the teacher predicts least
        loss_kd = loss_cc = loss_bc = 0.0
        for k, tau in enumerate(o.temperatures):
            kl = LogitDivergence("kl", tau, o.logit_standardization)
            strong = k < o.strong_view_temperatures
            loss_kd = loss_kd + m * kl(s_w, t_w) + (kl(s_s, t_s) if strong else kl(s_w, t_w))
            loss_cc = loss_cc + class_alignment(s_w, t_w, tau)
            loss_bc = loss_bc + batch_alignment(s_w, t_w, tau)
        return s_w, {
            "loss_ce": o.ce_weight * (cross_entropy(s_w, y) + cross_entropy(s_s, y)),
            "loss_kd": o.kd_weight * loss_kd,
            "loss_cc": o.kd_weight * m_c * loss_cc,
            "loss_bc": o.kd_weight * m * loss_bc,
        }
