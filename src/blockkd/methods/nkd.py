"""Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
Loss and Customized Soft Labels" (NKD), ICCV 2023.

NKD splits KD into the target class and the normalised non-target distribution, each matched on its own:

    L_NKD = − mean_i T_t,i · log S_t,i  −  γ · τ² · mean_i Σ_{k≠t} T̂_k,i(τ) · log Ŝ_k,i(τ)

with T_t, S_t the teacher's and student's target-class probabilities at temperature 1 (the teacher's a
constant) and T̂, Ŝ the softmax over the non-target logits only at temperature τ. The loss is the one of the
authors' code (yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``), which the paper writes the same way: both
terms are cross-entropies, not KL divergences (they differ from KL by the teacher's entropy, a constant, so
the gradients are the same; the value logged is the code's). The student's own cross-entropy is separate
(``ce_weight``, 1 in their distiller). Defaults are the ``NKDLoss`` defaults, which their ImageNet CNN recipes
use (τ = 1, γ = 1.5; ``configs/distillers/imagenet/res34_distill_res18_img.py``); their CIFAR-100 recipe
(res34 → res18 there, not a standard pair) uses τ = 3, γ = 3.5. On ViTs (the paper's DeiT results) their code
applies the same loss to the student's class-token logits (``head.layers.head(pre_logits)``, the class token)
with γ = 1 (``deit-s3_distill_deit-t_img.py``): a timm ViT's head reads the class token (``global_pool='token'``,
also the zoo's ``vit_tiny_p4``), so ``nkd`` with ``gamma: 1`` is that variant
(configs/imagenet/deit_small_deit_tiny/nkd.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import option
from .registry import register
from .base import Distiller
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy


def nkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
                   temperature: float, gamma: float) -> torch.Tensor:
    """(B,): each sample's NKD loss, −T_t log S_t − γ τ² Σ_{k≠t} T̂_k log Ŝ_k (float32)."""
    s, t = student_logits.float(), teacher_logits.float()
    label = target.view(-1, 1)
    s_t = F.log_softmax(s, dim=1).gather(1, label).squeeze(1)
    t_t = F.softmax(t, dim=1).gather(1, label).squeeze(1).detach()
    gt = F.one_hot(target, s.shape[1]).bool()
    # The softmax over the non-target classes: the target logit masked out of both distributions.
    tau = float(temperature)
    neg = torch.finfo(s.dtype).min
    log_q_s = F.log_softmax(s.div(tau).masked_fill(gt, neg), dim=1)
    q_t = F.softmax(t.div(tau).masked_fill(gt, neg), dim=1)
    non_target = (q_t * log_q_s).masked_fill(gt, 0.0).sum(1)
    return -t_t * s_t - gamma * tau * tau * non_target


@dataclass(frozen=True)
class NKDOptions:
    temperature: float = option(1.0, TEMPERATURE, "τ of the non-target softmax (that term scaled by τ²)")
    gamma: float = option(1.5, WEIGHT, "γ: weight of the normalised non-target term")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")


@register("nkd")
class NKD(Distiller):
    """NKD: ce_weight · CE + (target-class term + γ τ² · normalised non-target term)."""

    Options = NKDOptions
    paper = "Yang et al., From Knowledge Distillation to Self-Knowledge Distillation (NKD), ICCV 2023"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_nkd": nkd_per_sample(logits, t_logits, y, o.temperature, o.gamma).mean(),
        }
