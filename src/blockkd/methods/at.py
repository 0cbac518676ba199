"""Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017.

Each block's output F (B, C, H, W) gives a spatial attention map Q = vec(mean_c |F_c|^p), L2-normalised
per sample; the student matches the teacher's maps at every block:

    L = ce_weight · CE(y^S, y) + feat_weight · Σ_blocks mean((Q^S − Q^T)²)

Defaults are mdistiller's CIFAR-100 ones (``cfg.AT``: P 2, CE_WEIGHT 1, FEAT_WEIGHT 1000), on every
stage output as mdistiller (``feats[1:]``); no logit-KD term. Maps of different sizes are compared at
the smaller one (adaptive average pooling of the larger), as mdistiller does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..schema import number, option
from .registry import register
from .feature import FeatureDistiller, same_size
from .kd import WEIGHT
from .losses import cross_entropy


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """(B, H·W): mean over channels of |F|^p, flattened and L2-normalised per sample.

    |F|^p is the paper's form; on post-ReLU features it equals mdistiller's ``F.pow(p)``.
    """
    a = feat.float().abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(a, p=2.0, dim=1)


def at_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One block's attention-transfer loss: mean over batch and positions of the squared map difference."""
    f_s, f_t = same_size(f_s, f_t)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@dataclass(frozen=True)
class ATOptions:
    p: float = option(2.0, number(0, strict=True), "exponent p of the attention map mean_c |F_c|^p")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(1000.0, WEIGHT, "weight of the attention loss (summed over blocks)")


@register("at")
class AT(FeatureDistiller):
    """Attention transfer on every matched block: ce_weight · CE + feat_weight · Σ_i AT_i."""

    Options = ATOptions
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_at": o.feat_weight * sum(at_loss(fs, ft, o.p) for fs, ft in zip(s_feats, t_feats)),
        }
