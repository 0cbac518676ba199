"""Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

The student keeps the teacher's pairwise similarities within a batch: with G = Q Qᵀ (Q: the last
block's output flattened per sample) and each row of G L2-normalised,

    L = ce_weight · CE(y^S, y) + feat_weight · ‖G^T − G^S‖²_F / b²

Defaults are mdistiller's CIFAR-100 ones (``cfg.SP``: CE_WEIGHT 1, FEAT_WEIGHT 3000) on the last
stage's output (``feats[-1]``); no logit-KD term. Channels and sizes may differ: only b x b matrices
are compared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import option
from .registry import register
from .feature import FeatureDistiller
from .kd import WEIGHT
from .losses import cross_entropy


def similarity_matrix(feat: torch.Tensor) -> torch.Tensor:
    """(b, b): Q Qᵀ with Q the per-sample flattened activations, each row L2-normalised."""
    q = feat.float().flatten(1)
    return F.normalize(q @ q.t(), p=2.0, dim=1)


def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """‖G_t − G_s‖²_F / b², the squared Frobenius distance of the normalised similarity matrices."""
    b = f_s.shape[0]
    diff = similarity_matrix(f_t) - similarity_matrix(f_s)
    return diff.pow(2).sum() / (b * b)


@dataclass(frozen=True)
class SPOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(3000.0, WEIGHT, "weight of the similarity-preserving loss")


@register("sp")
class SP(FeatureDistiller):
    """Similarity preserving on the last block: ce_weight · CE + feat_weight · SP."""

    Options = SPOptions
    paper = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019"
    needs_maps = False  # any per-sample output works: only the last block's, flattened
    matched = False  # the last block of the natural stages is the last one of the matched views too

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_sp": o.feat_weight * sp_loss(s_feats[-1], t_feats[-1]),
        }
