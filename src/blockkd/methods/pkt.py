"""Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

The cosine similarities of the penultimate embeddings within a batch, mapped to [0, 1] and normalised
per row, are conditional probabilities p(j | i); the student matches the teacher's with a KL divergence:

    L = ce_weight · CE(y^S, y) + feat_weight · mean_{i,j} p^T_{j|i} · log((p^T_{j|i} + ε) / (p^S_{j|i} + ε))

Defaults: mdistiller's CIFAR-100 ones (``cfg.PKT``: CE_WEIGHT 1, FEAT_WEIGHT 30000, as RepDistiller's
``-b 30000``), on ``pooled_feat`` (the last block's output, pooled), ε = 1e-7 as in both; no logit-KD term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import option
from .registry import register
from .feature import FeatureDistiller, embedding
from .kd import WEIGHT
from .losses import cross_entropy

EPS = 1e-7


def cosine_probabilities(e: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(b, b): (cos(e_i, e_j) + 1) / 2, normalised to sum 1 over j; a zero row has cosines 0."""
    e = e.float()
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    e = torch.nan_to_num(e, nan=0.0)
    sim = (e @ e.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """PKT's KL between the teacher's and the student's conditional probabilities, mean over all b² pairs."""
    p_s = cosine_probabilities(f_s.flatten(1), eps)
    p_t = cosine_probabilities(f_t.flatten(1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


@dataclass(frozen=True)
class PKTOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(30000.0, WEIGHT, "weight of the probabilistic-transfer (KL) loss")


@register("pkt")
class PKT(FeatureDistiller):
    """Probabilistic knowledge transfer on the penultimate embedding: ce_weight · CE + feat_weight · PKT."""

    Options = PKTOptions
    paper = "Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge Transfer, ECCV 2018"
    matched = False
    needs_maps = False
    needs_embedding = True

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_pkt": o.feat_weight * pkt_loss(embedding(s_feats[-1]), embedding(t_feats[-1])),
        }
