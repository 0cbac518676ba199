"""Wei et al., "Scale Decoupled Distillation" (SDD), CVPR 2024.

SDD distils the logits of regions as well as of the whole image: the last feature map is average-pooled at
several scales (1x1, 2x2, 4x4: 1 + 4 + 16 regions), each region's pooled feature goes through the model's
own classifier, and a logit divergence (KD, DKD or NKD: the paper's SD-KD, SD-DKD, SD-NKD) is taken between
the student's and the teacher's logits of each region. A region whose teacher prediction is right while the
whole image's is wrong, or the reverse (a "complementary" region), weighs ``complementary_weight`` (2) in
the mean; the others weigh 1:

    L = ce_weight · CE(z_s, y) + weight · ramp · (1 / (R·B)) Σ_{r,i} w_r,i · d(z_s^{r,i}, z_t^{r,i}, y_i)

Follows the authors' code (shicaiwei123/SDD-CVPR2024, ``mdistiller/distillers/KD.py`` ``sdd_kd_loss``,
``SDD_DKD.py`` ``multi_dkd``, ``SDD_nkd.py`` ``multi_nkd_loss``; ``mdistiller/models/cifar/utils.py``
``SPP``): the map is pooled to the largest scale first and the smaller scales pool that; regions are ordered
scale by scale (the whole image first); each sample's term is summed over the classes and the weighted sum
is divided by R·B; the student's cross-entropy uses the model's own logits. One difference, on the paper's
side: their SD-NKD builds its "non-target" mask with ``scatter_(1, label, 1)`` on a tensor of ones, so the
target class stays in the normalised non-target distribution; here NKD is the NKD paper's (and its
authors' code, :mod:`blockkd.methods.nkd`), with the target class removed.

Any pair works whose last block outputs a (C, H, W) map and whose head is global average pooling followed by
a classifier (CIFAR zoo, torchvision and timm CNNs): the head is run on each region's pooled feature as a
1x1 map. A ViT or text model has no feature map to pool into regions: a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BlockKDError
from ..schema import choice, integer, list_of, number, option
from .registry import register
from .feature import FeatureDistiller, check_pooling_head
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy, dkd_per_sample, linear_warmup
from .nkd import nkd_per_sample


def region_features(feat: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """(R·B, C, 1, 1): each region's average, scale by scale (smallest first), regions row-major, samples inner."""
    largest = F.adaptive_avg_pool2d(feat, max(scales))
    pooled = [largest if s == max(scales) else F.adaptive_avg_pool2d(largest, s) for s in scales]
    regions = torch.cat([p.flatten(2) for p in pooled], dim=2)  # (B, C, R)
    b, c, r = regions.shape
    return regions.permute(2, 0, 1).reshape(r * b, c, 1, 1)


def complementary_mask(t_region_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R·B,) bool: regions whose teacher prediction is right where the whole image's is wrong, or the reverse.

    The whole image is region 0 (the first B rows)."""
    b = y.shape[0]
    right = t_region_logits.argmax(1) == y.repeat(t_region_logits.shape[0] // b)
    return right != right[:b].repeat(t_region_logits.shape[0] // b)


@dataclass(frozen=True)
class SDDOptions:
    divergence: str = option("dkd", choice("kd", "dkd", "nkd"), "the divergence of every region: kd (SD-KD), "
                                                                "dkd (SD-DKD) or nkd (SD-NKD)")
    scales: list = option([1, 2, 4], list_of(integer(1), increasing=True),
                          "pooling grids of the last feature map (1: the whole image; the authors' --M)")
    temperature: float = option(4.0, TEMPERATURE, "T of the softened softmax (kd, dkd) or of NKD's non-target term")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    weight: float = option(1.0, WEIGHT, "weight of the region distillation term")
    alpha: float = option(1.0, WEIGHT, "dkd: weight of TCKD")
    beta: float = option(8.0, WEIGHT, "dkd: weight of NCKD; nkd: γ, weight of the non-target term")
    complementary_weight: float = option(2.0, WEIGHT, "weight of a region whose teacher prediction disagrees "
                                                      "in correctness with the whole image's")
    warmup: float = option(20.0, number(0), "epochs over which the distillation term ramps up linearly from 0")


@register("sdd")
class SDD(FeatureDistiller):
    """SDD: ce_weight · CE + weight · ramp · mean over regions and samples of w · d(region logits)."""

    Options = SDDOptions
    paper = "Wei et al., Scale Decoupled Distillation, CVPR 2024"
    matched = False
    needs_maps = False

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        for side, view, shapes in (("student", self._views[0], self.student_shapes),
                                   ("teacher", self._views[1], self.teacher_shapes)):
            if len(shapes[-1]) != 3:
                raise BlockKDError(f"method sdd pools the last feature map into regions, but the {side}'s last "
                                   f"block outputs {shapes[-1]} (expected (C, H, W))")
            check_pooling_head(view, shapes[-1], "sdd", side)

    def region_logits(self, view, feat: torch.Tensor) -> torch.Tensor:
        return view.run_head(region_features(feat, list(self.opts.scales)))

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        s_regions = self.region_logits(self._views[0], s_feats[-1])
        with torch.no_grad():
            t_regions = self.region_logits(self._views[1], t_feats[-1]).float()
        y_r = y.repeat(s_regions.shape[0] // y.shape[0])
        if o.divergence == "kd":
            t = o.temperature
            log_q = F.log_softmax(s_regions.float() / t, 1)
            log_p = F.log_softmax(t_regions / t, 1)
            per = (log_p.exp() * (log_p - log_q)).sum(1) * t * t
        elif o.divergence == "dkd":
            tckd, nckd = dkd_per_sample(s_regions, t_regions, y_r, o.temperature)
            per = o.alpha * tckd + o.beta * nckd
        else:
            per = nkd_per_sample(s_regions, t_regions, y_r, o.temperature, o.beta)
        w = 1.0 + (o.complementary_weight - 1.0) * complementary_mask(t_regions, y).float()
        ramp = linear_warmup(epoch, o.warmup)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            f"loss_sd_{o.divergence}": o.weight * ramp * (w * per).mean(),
        }
