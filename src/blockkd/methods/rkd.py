"""Park et al., "Relational Knowledge Distillation", CVPR 2019.

The student's penultimate embeddings (the last block's output, pooled as the head pools it) keep the
teacher's relations within a batch: pairwise distances, normalised by their mean (RKD-D), and the
angles of every triplet (RKD-A), each compared with the Huber (smooth L1) loss:

    L = ce_weight · CE(y^S, y) + feat_weight · (distance_weight · RKD-D + angle_weight · RKD-A)

Defaults are mdistiller's CIFAR-100 ones (``cfg.RKD``: DISTANCE_WEIGHT 25, ANGLE_WEIGHT 50,
CE_WEIGHT 1, FEAT_WEIGHT 1, PDIST.EPSILON 1e-12, PDIST.SQUARED False) on ``pooled_feat``; no
logit-KD term. Embeddings of different widths are fine: only b x b (and b x b x b) relations are compared.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import BOOL, number, option
from .registry import register
from .feature import FeatureDistiller, embedding
from .kd import WEIGHT
from .losses import cross_entropy


def pairwise_distances(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """(b, b) Euclidean distances between rows (squared ones if ``squared``), clamped below at ``eps``
    before the square root; the diagonal is exactly 0."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    off_diagonal = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d * off_diagonal


def rkd_distance_loss(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """RKD-D: Huber loss between the distance matrices, each divided by its mean over distinct pairs."""
    s, t = f_s.float().flatten(1), f_t.float().flatten(1)
    off_diagonal = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    with torch.no_grad():
        d_t = pairwise_distances(t, squared, eps)
        d_t = d_t / d_t[off_diagonal].mean()
    d_s = pairwise_distances(s, squared, eps)
    d_s = d_s / d_s[off_diagonal].mean()
    return F.smooth_l1_loss(d_s, d_t)


def triplet_cosines(e: torch.Tensor) -> torch.Tensor:
    """(b, b, b): cos of the angle at vertex i between j and k, <(e_j − e_i)/‖·‖, (e_k − e_i)/‖·‖>
    (0 where a difference vanishes)."""
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2)  # diff[i, j] = unit(e_j - e_i)
    return diff @ diff.transpose(1, 2)


def rkd_angle_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD-A: Huber loss between the triplet cosines of student and teacher, mean over all b³ triplets."""
    s, t = f_s.float().flatten(1), f_t.float().flatten(1)
    with torch.no_grad():
        a_t = triplet_cosines(t)
    return F.smooth_l1_loss(triplet_cosines(s), a_t)


@dataclass(frozen=True)
class RKDOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(1.0, WEIGHT, "overall weight of the relational terms")
    distance_weight: float = option(25.0, WEIGHT, "weight of RKD-D (distance-wise relation)")
    angle_weight: float = option(50.0, WEIGHT, "weight of RKD-A (angle-wise relation)")
    squared: bool = option(False, BOOL, "RKD-D on squared distances")
    eps: float = option(1e-12, number(0, strict=True), "lower clamp of the squared distances (before the root)")


@register("rkd")
class RKD(FeatureDistiller):
    """Relational KD on the penultimate embedding: CE + distance- and angle-wise relations."""

    Options = RKDOptions
    paper = "Park et al., Relational Knowledge Distillation, CVPR 2019"
    matched = False
    needs_maps = False
    needs_embedding = True

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        e_s, e_t = embedding(s_feats[-1]), embedding(t_feats[-1])
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_rkd_distance": o.feat_weight * o.distance_weight * rkd_distance_loss(e_s, e_t, o.squared, o.eps),
            "loss_rkd_angle": o.feat_weight * o.angle_weight * rkd_angle_loss(e_s, e_t),
        }
