"""Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019 (OFD).

Per matched block i (n blocks, from :func:`blockkd.blocks.match`), on PRE-ReLU features
(:meth:`blockkd.blocks.Blocks.preact_features`):

    s_i = C_i(student pre-ReLU feature)          C_i: conv (1x1 by default) + BN
    t_i = teacher pre-ReLU feature, average-pooled to s_i's size
    L_i = Σ_{c,h,w} mean_batch d_p(s_i, max(t_i, m_i))²      (partial L2: no loss where s <= t <= 0)
    L   = ce_weight · CE + feat_weight · Σ_i L_i / 2^(n-i)    (i = 1..n)

The margin m_i (per channel) is E[x | x < 0] for x ~ N(β, γ²), from the affine parameters (γ, β) of the
teacher's BatchNorm before the ReLU:
    m = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|) when Φ(−β/|γ|) > 0.001, else −3|γ|.
Where a teacher block has no BN before a final ReLU (WRN's pre-activation residual stream between
stages, MobileNetV2's linear bottlenecks), the same formula is applied to the per-channel mean and standard
deviation of the teacher's feature on the first training batch (a warning says which blocks).
Defaults: mdistiller (CFG.OFD: CE_WEIGHT 1.0, FEAT_WEIGHT 0.001, CONNECTOR.KERNEL_SIZE 1).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schema import choice, option
from .registry import register
from .feature import FeatureDistiller
from .connectors import Connector
from .kd import WEIGHT
from .losses import cross_entropy

_LOW_MASS = 0.001  # below this Φ(−β/|γ|), the original takes −3|γ| as the margin
_EPS = 1e-12


def gaussian_margin(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per channel E[x | x < 0] for x ~ N(mean, std²) (−3·std where P(x < 0) <= 0.001), as OFD."""
    mean, std = mean.double(), std.double().abs().clamp_min(_EPS)
    z = -mean / std
    mass = torch.special.ndtr(z)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    margin = mean - std * density / mass.clamp_min(_EPS)
    return torch.where(mass > _LOW_MASS, margin, -3 * std).float()


def bn_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """OFD's margin from a BatchNorm's affine parameters (weight as std, bias as mean)."""
    return gaussian_margin(bn.bias.detach(), bn.weight.detach())


@torch.no_grad()
def feature_margin(feat: torch.Tensor) -> torch.Tensor:
    """The margin from a batch of features' per-channel mean and std (averaged over ranks under DDP)."""
    flat = feat.detach().double().transpose(0, 1).reshape(feat.shape[1], -1)
    moments = torch.stack([flat.mean(1), (flat * flat).mean(1)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(moments)
        moments /= torch.distributed.get_world_size()
    mean, sq = moments
    return gaussian_margin(mean, (sq - mean * mean).clamp_min(0).sqrt())


def ofd_partial_l2(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's distance: (s − max(t, m))² except where s <= max(t, m) <= 0; mean over the batch, sum over the rest.

    ``margin`` has one value per channel (shape (C,)).
    """
    source = source.float()  # float32 whatever the autocast dtype: a sum of many squares
    m = margin.to(source).view(1, -1, *([1] * (source.dim() - 2)))
    t = torch.maximum(target.to(source), m)
    mask = (source > t) | (t > 0)
    return ((source - t) ** 2 * mask).sum() / source.shape[0]


@dataclass(frozen=True)
class OFDOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(0.001, WEIGHT, "weight of Σ_i partial-L2_i / 2^(n-i) (mdistiller: 0.001)")
    kernel_size: int = option(1, choice(1, 3), "kernel of the connector conv (then BN) on the student side")


@register("ofd")
class OFD(FeatureDistiller):
    """OFD: conv+BN connectors on pre-ReLU features, partial L2 to the teacher's, clipped at BN-derived margins.

    The margins are buffers (saved with the run); see the module docstring for the formula.
    """

    Options = OFDOptions
    paper = "Heo et al., A Comprehensive Overhaul of Feature Distillation, ICCV 2019"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)  # matched views, probed (FeatureDistiller)
        s_view, t_view = self._views
        s_shapes, t_shapes = self.student_shapes, self.teacher_shapes
        s_view.preact_points(self.input_shape)
        points = t_view.preact_points(self.input_shape)
        self.sizes = [tuple(min(a, b) for a, b in zip(s[1:], t[1:])) for s, t in zip(s_shapes, t_shapes)]
        kind = "conv1x1_bn" if self.opts.kernel_size == 1 else "conv3x3_bn"
        self.connectors = nn.ModuleList(Connector(s, (t[0], *size), kind)
                                        for s, t, size in zip(s_shapes, t_shapes, self.sizes))
        self.from_data: list[int] = []
        self._ready: set[int] = set()
        for i, (p, t) in enumerate(zip(points, t_shapes)):
            if p is not None and p.bn is not None and p.bn.affine:
                margin = bn_margin(p.bn)
            else:
                margin = torch.full((t[0],), float("nan"))
                self.from_data.append(i)
            self.register_buffer(f"margin{i}", margin)
        if self.from_data:
            warnings.warn(f"OFD: teacher {type(teacher).__name__} has no BatchNorm before a final ReLU at block(s) "
                          f"{[i + 1 for i in self.from_data]}; their margins come from the teacher's feature "
                          f"statistics on the first training batch", stacklevel=2)

    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return self._views[1].preact_features(x)

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits = self._views[0].preact_features(x)
        t_feats, _ = self.teacher_features(x)
        n = len(s_feats)
        loss = 0.0
        for i, (fs, ft, conn, margin) in enumerate(zip(s_feats, t_feats, self.connectors, self.margins())):
            ft = F.adaptive_avg_pool2d(ft, self.sizes[i]) if tuple(ft.shape[-2:]) != self.sizes[i] else ft
            if i in self.from_data and i not in self._ready:
                if torch.isnan(margin).any():  # first batch: margin from the teacher's feature statistics
                    margin.copy_(feature_margin(ft))
                self._ready.add(i)
            loss = loss + ofd_partial_l2(conn(fs), ft.detach(), margin) / 2 ** (n - 1 - i)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_ofd": o.feat_weight * loss,
        }
