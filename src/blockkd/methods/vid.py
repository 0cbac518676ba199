"""Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019 (VID).

Per matched block i (:func:`blockkd.blocks.match`), the teacher's output t is modelled as a Gaussian
whose mean a regressor μ_i (1x1 conv, ReLU, 1x1 conv, ReLU, 1x1 conv, no biases) predicts from the
student's output s, with a learned per-channel variance σ²_c = softplus(α_c) + eps:

    L_i = mean_{b,c,h,w} ½ · [ (μ_i(s) − t)² / σ²_c + log σ²_c ]      (the larger map average-pooled first)
    L   = ce_weight · CE + weight · Σ_i L_i

α is initialised so that σ² starts at ``init_pred_var``. Defaults: RepDistiller (VIDLoss: init_pred_var 5.0,
eps 1e-5, regressor widths = the teacher's; ``-r 1 -a 0 -b 1``), the same as mdistiller's CFG.VID. As in
RepDistiller the variances are trained (mdistiller keeps them in a plain list, so they stay at their
initial value there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import match
from ..schema import OptionError, number, option
from .registry import register
from .base import Distiller
from .kd import WEIGHT
from .feature import require_maps
from .losses import cross_entropy


def vid_nll(mean: torch.Tensor, target: torch.Tensor, log_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Mean over all elements of the Gaussian negative log-likelihood (without ½log 2π), σ² = softplus(α) + eps."""
    mean, target = mean.float(), target.float()  # float32 whatever the autocast dtype
    var = (F.softplus(log_scale.float()) + eps).view(1, -1, *([1] * (mean.dim() - 2)))
    return (0.5 * ((mean - target) ** 2 / var + torch.log(var))).mean()


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, bias=False)


def regressor(c_in: int, mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(_conv1x1(c_in, mid), nn.ReLU(), _conv1x1(mid, mid), nn.ReLU(), _conv1x1(mid, c_out))


@dataclass(frozen=True)
class VIDOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    weight: float = option(1.0, WEIGHT, "weight of Σ_i VID negative log-likelihood_i")
    init_pred_var: float = option(5.0, number(0, strict=True), "initial variance σ² of every channel")
    eps: float = option(1e-5, number(0, strict=True), "floor added to the variance")

    def check(self) -> None:
        if self.init_pred_var <= self.eps:
            raise OptionError("init_pred_var", f"init_pred_var must exceed eps ({self.eps:g})")


@register("vid")
class VID(Distiller):
    """VID: per block, a regressor predicting the teacher's output and a learned per-channel variance."""

    Options = VIDOptions
    paper = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        o = self.opts
        s_view, t_view = match(student, self.teacher, self.input_shape)
        self._views = (s_view, t_view)  # plain tuple: the views share the models' modules
        s_shapes, t_shapes = s_view.probe(self.input_shape), t_view.probe(self.input_shape)
        require_maps(type(self).__name__, s_shapes, t_shapes)
        self.regressors = nn.ModuleList(regressor(s[0], t[0], t[0]) for s, t in zip(s_shapes, t_shapes))
        alpha = math.log(math.expm1(o.init_pred_var - o.eps))  # softplus(alpha) + eps = init_pred_var
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t[0],), alpha)) for t in t_shapes)

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits = self._views[0].features(x)
        with torch.no_grad():
            t_feats, _ = self._views[1].features(x)
        loss = 0.0
        for fs, ft, reg, alpha in zip(s_feats, t_feats, self.regressors, self.log_scales):
            size = tuple(min(a, b) for a, b in zip(fs.shape[-2:], ft.shape[-2:]))
            fs = fs if tuple(fs.shape[-2:]) == size else F.adaptive_avg_pool2d(fs, size)
            ft = ft if tuple(ft.shape[-2:]) == size else F.adaptive_avg_pool2d(ft, size)
            loss = loss + vid_nll(reg(fs), ft, alpha, o.eps)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_vid": o.weight * loss,
        }
