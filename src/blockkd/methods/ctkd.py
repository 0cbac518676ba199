"""Li et al., "Curriculum Temperature for Knowledge Distillation" (CTKD), AAAI 2023.

CTKD learns the distillation temperature adversarially: a temperature module predicts τ, and a gradient
reversal layer (identity forward, gradient times λ ≤ 0 backward) makes it *maximise* the distillation loss
the student minimises. λ follows an easy-to-hard curriculum, a cosine from ``lambda_max`` (0) to
``lambda_min`` (−1) over ``curriculum_epochs``:

    τ = t_start + t_range · sigmoid(GRL_λ(θ)),   λ(e) = λ_min + (λ_max − λ_min) · (cos(π · min(e, E) / E) + 1) / 2
    L = ce_weight · CE + kd_weight · D_τ(z_s, z_t)

with D_τ the KD loss (τ²·KL) or DKD's α·TCKD + β·NCKD at the learned τ. Follows the authors' code
(zhengli97/CTKD: ``models/temp_global.py`` — the global θ starts at 1 —, ``helper/loops.py``
``t_start + t_end · sigmoid``, ``train_student.py`` ``CosineDecay`` evaluated at the 1-based epoch, which is
``floor(epoch) + 1`` here; the DKD term is theirs, without DKD's warm-up, as in their loop). With
``logit_standardization`` both sets of logits are z-scored first, as in the logit-standardisation authors'
CTKD+LS (sunshangquan/logit-standardization-KD, ``CTKD/distiller_zoo/KD.py``, whose z-score has no 1e-7).

``mode: instance`` predicts one τ per sample. Its code is distributed by the authors as a download only
(README), not in their repository; it follows the paper: a two-layer MLP on the concatenated (detached)
student and teacher logits, and a per-sample τ² KL averaged over the batch, as their README's per-sample
``KL_Loss`` (whose +1e-7 on the teacher's probabilities is left out here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.core import call_model, example_input
from ..errors import BlockKDError
from ..schema import choice, integer, number, option
from .registry import register
from .base import Distiller
from .divergences import logit_standardization_option, standardize
from .kd import WEIGHT
from .losses import cross_entropy, dkd_per_sample


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def reverse_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient times ``scale`` backward (Ganin & Lempitsky's GRL with scale = λ ≤ 0)."""
    return _ReverseGrad.apply(x, scale)


def curriculum_lambda(epoch: float, epochs: float, lo: float, hi: float) -> float:
    """The authors' ``CosineDecay`` at their 1-based epoch: hi at the start, lo from ``epochs`` on."""
    i = min(max(math.floor(epoch) + 1, 0), epochs)
    return (math.cos(i * math.pi / epochs) + 1.0) * 0.5 * (hi - lo) + lo if epochs > 0 else lo


@dataclass(frozen=True)
class CTKDOptions:
    base: str = option("kd", choice("kd", "dkd"), "the loss whose temperature is learned: kd (τ²·KL) or dkd")
    mode: str = option("global", choice("global", "instance"), "one learned τ, or one per sample (an MLP on "
                                                               "the student's and teacher's logits)")
    t_start: float = option(1.0, number(0), "the lowest temperature: τ = t_start + t_range · sigmoid(θ)")
    t_range: float = option(20.0, number(0, strict=True), "the span of τ above t_start (the authors' t_end)")
    lambda_max: float = option(0.0, number(), "the gradient reversal's λ at the start of the curriculum")
    lambda_min: float = option(-1.0, number(), "λ at its end (negative: the temperature maximises the loss)")
    curriculum_epochs: float = option(10.0, number(0, strict=True), "epochs of the cosine from lambda_max to "
                                                                   "lambda_min (the authors' decay_loops)")
    ce_weight: float = option(0.1, WEIGHT, "weight of the cross-entropy with the labels")
    kd_weight: float = option(0.9, WEIGHT, "weight of the distillation term at the learned τ")
    dkd_alpha: float = option(1.0, WEIGHT, "base dkd: weight of TCKD")
    dkd_beta: float = option(2.0, WEIGHT, "base dkd: weight of NCKD (the authors' default)")
    hidden: int = option(256, integer(1), "mode instance: hidden width of the temperature MLP")
    logit_standardization: bool = logit_standardization_option()


@register("ctkd")
class CTKD(Distiller):
    """CTKD: ce_weight · CE + kd_weight · D_τ, τ learned through a gradient reversal layer."""

    Options = CTKDOptions
    paper = "Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023"

    def __init__(self, student, teacher=None, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        if self.opts.mode == "global":
            self.global_t = nn.Parameter(torch.ones(1))
        else:
            if teacher is None:
                raise BlockKDError("method ctkd needs a teacher")
            with torch.no_grad():  # the number of classes: the MLP reads both sets of logits
                was = self.student.training
                device = next(self.student.parameters()).device
                classes = call_model(self.student.eval(), example_input(self.input_shape, device=device)).shape[1]
                self.student.train(was)
            h = self.opts.hidden
            self.temperature_mlp = nn.Sequential(nn.Linear(2 * classes, h), nn.ReLU(), nn.Linear(h, 1))

    def temperature(self, logits: torch.Tensor, t_logits: torch.Tensor, epoch: float) -> torch.Tensor:
        """τ: shape (1,) (global) or (B, 1) (instance), with the reversed, λ-scaled gradient."""
        o = self.opts
        lam = curriculum_lambda(epoch, o.curriculum_epochs, o.lambda_min, o.lambda_max)
        if o.mode == "global":
            theta = self.global_t
        else:
            theta = self.temperature_mlp(torch.cat([logits.detach(), t_logits.detach()], 1).float())
        return o.t_start + o.t_range * torch.sigmoid(reverse_grad(theta, lam))

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        logits = self.student_logits(x)
        t_logits = self.teacher_logits(x)
        tau = self.temperature(logits, t_logits, epoch)
        s, t = logits.float(), t_logits.float()
        if o.logit_standardization:
            s, t = standardize(s), standardize(t)
        t_col = tau.view(-1, 1)
        if o.base == "kd":
            log_q, log_p = F.log_softmax(s / t_col, 1), F.log_softmax(t / t_col, 1)
            distill = ((log_p.exp() * (log_p - log_q)).sum(1) * tau.view(-1) ** 2).mean()
        else:
            tckd, nckd = dkd_per_sample(s, t, y, t_col)
            distill = (o.dkd_alpha * tckd + o.dkd_beta * nckd).mean()
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_kd": o.kd_weight * distill,
        }

    def diagnostics(self, x, y, *, epoch):
        if self.opts.mode != "global":
            return {}
        return {"temperature": float(self.opts.t_start + self.opts.t_range * torch.sigmoid(self.global_t.detach()))}
