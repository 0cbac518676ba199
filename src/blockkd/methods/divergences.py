"""Divergences between a student's logits and target logits, shared by every logit method.

Why a module of its own: KD, DKD and every KL term of Block-KD (the student's and each stone's distill
term, the L_cross terms) compare two sets of logits; which divergence they use, and whether the logits
are standardised first, is one choice made once here (``LogitDivergence``) and declared once as options
(the ``*_option()`` helpers below), so the methods do not copy either.

- ``kl``: Hinton et al.'s T²·KL(softmax(target/T) ‖ softmax(student/T)), batch-averaged.
- ``dkd``: Zhao et al. (CVPR 2022): dkd_alpha·TCKD + dkd_beta·NCKD, each T²-scaled. It needs labels:
  the "target class" that splits the distribution.
- ``logit_standardization`` (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024):
  z-score each sample's logits over the classes, (z − mean) / (std + 1e-7), for the student AND the
  target, before the temperature softmax. As in the authors' code (sunshangquan/logit-standardization-KD,
  ``normalize``): the std is the unbiased one (Bessel's correction, ``Tensor.std``'s default), the 1e-7 is
  added to the std, not under the square root, and the T² scaling of the KL terms remains. Their CIFAR-100
  KD+LS recipe uses T = 2 with KD weight 9 (CE weight 0.1); this library's defaults are unchanged — choose T
  and the weights on a validation split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..registry import Registry
from ..schema import BOOL, option
from .losses import dkd_parts, kl_div

LS_EPS = 1e-7  # the authors' epsilon, added to the standard deviation


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score over the classes (dim 1), in float32: (z − mean) / (std + 1e-7), unbiased std."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + LS_EPS)


# name -> fn(student_logits, target_logits, labels, divergence) -> scalar; registered below.
DIVERGENCES: Registry[Callable[..., torch.Tensor]] = Registry("divergence")


@DIVERGENCES.register("kl")
def _kl(student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None, d: "LogitDivergence"):
    return kl_div(student, target, d.temperature)


@DIVERGENCES.register("dkd")
def _dkd(student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None, d: "LogitDivergence"):
    if labels is None:
        raise ValueError("the dkd divergence needs labels (the target class of each sample)")
    tckd, nckd = dkd_parts(student, target, labels, d.temperature)
    return d.dkd_alpha * tckd + d.dkd_beta * nckd


@dataclass(frozen=True)
class LogitDivergence:
    """``d(student_logits, target_logits, labels)``: the chosen divergence, batch-averaged, as a scalar.

    Both sets of logits are standardised first when ``standardize`` is set; ``labels`` are used by ``dkd``
    only. Every per-sample term is averaged over the batch, so the value on a random subset of the batch is
    an unbiased estimate of the value on the whole batch (Block-KD's ``split`` sampling relies on it).
    """

    kind: str = "kl"
    temperature: float = 4.0
    standardize: bool = False
    dkd_alpha: float = 1.0
    dkd_beta: float = 8.0

    def prepare(self, logits: torch.Tensor) -> torch.Tensor:
        return standardize(logits) if self.standardize else logits

    def __call__(self, student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None):
        return DIVERGENCES.get(self.kind)(self.prepare(student), self.prepare(target), labels, self)

    def parts(self, student: torch.Tensor, target: torch.Tensor, labels: torch.Tensor):
        """DKD's unweighted (TCKD, NCKD) after the optional standardisation (the ``dkd`` method's terms)."""
        return dkd_parts(self.prepare(student), self.prepare(target), labels, self.temperature)


# --------------------------------------------------------------------------- the shared option declarations
def logit_standardization_option():
    return option(False, BOOL, "z-score each sample's logits (student and target) before the softmax "
                               "(Sun et al., CVPR 2024; their KD recipe: T 2, KD weight 9)")
