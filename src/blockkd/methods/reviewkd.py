"""Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021 (ReviewKD).

Levels: the n matched blocks' outputs (:func:`blockkd.blocks.match`) then the globally pooled last one
(a 1x1 map), as mdistiller's ``feats[1:] + [pooled_feat]``. From the deepest level up, an attention-based
fusion (ABF) module maps the student's feature to the teacher's shape, fusing it with the residual
output of the level below (1x1 conv+BN, then two sigmoid attention maps over [own, upsampled residual],
then 3x3 conv+BN); the hierarchical context loss (HCL) compares each output with the teacher's
PRE-ReLU feature at that level (its pooled feature at the last):

    HCL(f_s, f_t) = [MSE(f_s, f_t) + Σ_{l in (4, 2, 1), l < h} 2^-k · MSE(pool_l(f_s), pool_l(f_t))] / (1 + Σ 2^-k)
    L = ce_weight · CE + weight · min(epoch / warmup, 1) · Σ_levels HCL

Channel widths and sizes come from probing both views. Defaults: mdistiller (CFG.REVIEWKD: CE_WEIGHT 1.0,
REVIEWKD_WEIGHT 1.0, WARMUP_EPOCHS 20, MAX_MID_CHANNEL 512, STU_PREACT False); its CIFAR-100 recipe
(configs/cifar100/reviewkd.yaml) sets REVIEWKD_WEIGHT 5.0, as ours does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..schema import BOOL, integer, number, option
from .registry import register
from .feature import FeatureDistiller
from .kd import WEIGHT
from .losses import cross_entropy, linear_warmup

PYRAMID = (4, 2, 1)


def hcl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Hierarchical context loss of one level: MSE at full size and at 4x4, 2x2, 1x1 (those smaller than the
    map's height), weighted 1, 1/2, 1/4, ... and normalised by the sum of the weights."""
    student, teacher = student.float(), teacher.float()  # float32 whatever the autocast dtype
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for size in PYRAMID:
        if size >= student.shape[2]:
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size))
        total += weight
    return loss / total


def hcl_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> torch.Tensor:
    return sum(hcl(s, t) for s, t in zip(students, teachers))


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv+BN to ``mid``; with ``fuse``, a 1x1 conv + sigmoid gives one weight
    map for the feature and one for the residual (nearest-upsampled to its size); resize (nearest) to the
    teacher's size; 3x3 conv+BN to ``out``. Returns (output, residual for the next level)."""

    def __init__(self, c_in: int, mid: int, c_out: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, x.shape[-2:], mode="nearest")
            att = self.att_conv(torch.cat([x, residual], 1))
            x = x * att[:, :1] + residual * att[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


@dataclass(frozen=True)
class ReviewKDOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    weight: float = option(1.0, WEIGHT, "weight of Σ HCL (mdistiller: 1.0; its CIFAR-100 recipe: 5.0)")
    warmup: float = option(20.0, number(0), "epochs over which the HCL term ramps up linearly from 0")
    max_mid_channels: int = option(512, integer(1), "width of the ABFs' fused features: min(this, the student's "
                                   "last width)")
    student_preact: bool = option(False, BOOL, "feed the student's pre-ReLU block outputs to the ABFs")


@register("reviewkd")
class ReviewKD(FeatureDistiller):
    """ReviewKD: ABF fusion of the student's features, deepest first, matched to the teacher's by HCL."""

    Options = ReviewKDOptions
    paper = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)  # matched views, probed (FeatureDistiller)
        s_view, t_view = self._views
        s_shapes, t_shapes = self.student_shapes, self.teacher_shapes
        s_view.preact_points(self.input_shape)
        t_view.preact_points(self.input_shape)
        s_shapes = [*s_shapes, (s_shapes[-1][0], 1, 1)]
        t_shapes = [*t_shapes, (t_shapes[-1][0], 1, 1)]
        self.out_sizes = [tuple(t[1:]) for t in t_shapes]
        mid = min(self.opts.max_mid_channels, s_shapes[-1][0])
        last = len(s_shapes) - 1
        # abfs[i] serves level i (shallow to deep); the deepest (pooled) level has nothing to fuse.
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], i < last) for i, (s, t) in enumerate(zip(s_shapes, t_shapes)))

    @staticmethod
    def pooled(view, feats: list[torch.Tensor], preact: bool) -> torch.Tensor:
        """The globally pooled post-ReLU output of the last block (mdistiller's ``pooled_feat``) as (N, C, 1, 1)."""
        last = feats[-1]
        if preact and view.preact_points()[-1] is not None:
            last = F.relu(last)
        return F.adaptive_avg_pool2d(last, 1)

    def fuse(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ABF outputs for the student's levels (shallow to deep), computed deepest first."""
        out, residual = [], None
        for i in reversed(range(len(feats))):
            y, residual = self.abfs[i](feats[i], residual, self.out_sizes[i])
            out.insert(0, y)
        return out

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_view, t_view = self._views
        s_feats, logits = s_view.features(x, preact=o.student_preact)
        with torch.no_grad():
            t_feats, _ = t_view.preact_features(x)
        # Teacher: its pre-ReLU block outputs and its pooled (post-ReLU) last output, as mdistiller.
        t_levels = [*t_feats, self.pooled(t_view, t_feats, True)]
        results = self.fuse([*s_feats, self.pooled(s_view, s_feats, o.student_preact)])
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_reviewkd": o.weight * linear_warmup(epoch, o.warmup) * hcl_loss(results, t_levels),
        }
