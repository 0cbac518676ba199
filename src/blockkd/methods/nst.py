"""Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017.

Each channel of a block's output, flattened over positions and L2-normalised, is a sample of that
network's "neuron selectivity" distribution; the student matches the teacher's with the squared MMD
under the polynomial kernel k(a, b) = (aᵀb)² (d = 2, c = 0):

    MMD² = mean_{i,i'} k(t_i, t_i') + mean_{j,j'} k(s_j, s_j') − 2 mean_{i,j} k(s_j, t_i)
    L = ce_weight · CE(y^S, y) + feat_weight · Σ_blocks MMD²

(each mean also over the batch). Defaults: mdistiller's CIFAR-100 ones (``cfg.NST``: CE_WEIGHT 1,
FEAT_WEIGHT 50, as RepDistiller's ``-b 50``) on every stage output (``feats[1:]``); no logit-KD term.
Channel counts may differ; maps of different sizes are compared at the smaller one, as mdistiller.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import option
from .registry import register
from .feature import FeatureDistiller, same_size
from .kd import WEIGHT
from .losses import cross_entropy


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C_a, C_b): (a_i · b_j)² for every pair of rows of a (B, C_a, N) and b (B, C_b, N)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One block's squared MMD between the channel distributions (polynomial kernel of degree 2)."""
    f_s, f_t = same_size(f_s.float(), f_t.float())
    s = F.normalize(f_s.flatten(2), p=2.0, dim=2)
    t = F.normalize(f_t.flatten(2), p=2.0, dim=2)
    return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2.0 * poly_kernel(s, t).mean()


@dataclass(frozen=True)
class NSTOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(50.0, WEIGHT, "weight of the MMD loss (summed over blocks)")


@register("nst")
class NST(FeatureDistiller):
    """Neuron selectivity transfer on every matched block: ce_weight · CE + feat_weight · Σ_i MMD²_i."""

    Options = NSTOptions
    paper = "Huang & Wang, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer, arXiv 2017"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_nst": o.feat_weight * sum(nst_loss(fs, ft) for fs, ft in zip(s_feats, t_feats)),
        }
