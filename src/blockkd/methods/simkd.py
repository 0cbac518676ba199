"""Chen et al., "Knowledge Distillation with the Reused Teacher Classifier" (SimKD), CVPR 2022.

SimKD trains the student's last feature map, through a projector, to equal the teacher's, and then classifies
with the teacher's own (frozen) classifier: the deployed student is student backbone + projector + teacher
head. The only loss is

    L = feat_weight · MSE(P(f_s), f_t)     (mean over every element; ce_weight 0 in the authors' runs)

with the two maps first brought to the smaller spatial size (adaptive average pooling of the larger one).
Follows the authors' code (DefangChen/SimKD, ``models/util.py`` ``SimKD``, ``helper/loops.py``, README
commands ``-c 0 -d 0 -b 1``): the projector is their bottleneck (1x1 conv to C_t/factor, BN, ReLU, 3x3 conv,
BN, ReLU, 1x1 conv to C_t, BN, ReLU; factor 2), the student's map is pooled before it when larger, the
teacher's map is pooled to the student's size when that is smaller, and the prediction is the teacher's
classifier on the globally pooled projection. ``ce_weight`` (0 by default) adds a cross-entropy on that
prediction, an option the authors' loop also has (``--cls``).

The student's own classifier is not used (it receives no gradient and is not part of the deployed model).
The teacher's head is copied into the distiller (``teacher_head``, frozen), so a run's checkpoint holds the
whole deployed classifier without the teacher; :meth:`SimKD.deployed_model` is that classifier, and its
extra inference parameters (projector + teacher head) are what ``extra_inference_params`` reports.
Needs a (C, H, W) last map on both sides and a teacher head that is global average pooling + classifier.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BlockKDError
from ..schema import integer, option
from .registry import register
from .base import freeze
from .feature import FeatureDistiller, check_pooling_head
from .kd import WEIGHT
from .losses import cross_entropy


def projector(c_in: int, c_out: int, factor: int) -> nn.Sequential:
    """The authors' bottleneck: 1x1 (c_in → c_out/factor), 3x3, 1x1 (→ c_out), each conv + BN + ReLU."""
    mid = max(c_out // factor, 1)

    def unit(a, b, k):
        return [nn.Conv2d(a, b, k, padding=k // 2, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

    return nn.Sequential(*unit(c_in, mid, 1), *unit(mid, mid, 3), *unit(mid, c_out, 1))


class SimKDClassifier(nn.Module):
    """The deployed student: its blocks, the projector and the teacher's head (``pool_to``: the teacher's map
    size, to which a larger student map is pooled before the projector, as in training)."""

    def __init__(self, blocks, project: nn.Module, head: nn.Module, pool_to: tuple[int, int] | None):
        super().__init__()
        self.blocks, self.project, self.head = blocks, project, head
        self.pool_to = pool_to

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The projected student map P(f_s), at the size the loss compares."""
        h = x
        for i in range(len(self.blocks.blocks)):
            h = self.blocks.run_block(i, h, x)
        if self.pool_to is not None:
            h = F.adaptive_avg_pool2d(h, self.pool_to)
        return self.project(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass(frozen=True)
class SimKDOptions:
    feat_weight: float = option(1.0, WEIGHT, "weight of the MSE between the projected student map and the "
                                             "teacher's (the authors' -b)")
    factor: int = option(2, integer(1), "bottleneck factor of the projector: its middle width is C_t / factor")
    ce_weight: float = option(0.0, WEIGHT, "weight of a cross-entropy on the deployed prediction (authors: 0)")


@register("simkd")
class SimKD(FeatureDistiller):
    """SimKD: feat_weight · MSE(projector(f_s), f_t); the student then classifies with the teacher's head."""

    Options = SimKDOptions
    paper = "Chen et al., Knowledge Distillation with the Reused Teacher Classifier, CVPR 2022"
    matched = False
    needs_maps = False

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        s_shape, t_shape = self.student_shapes[-1], self.teacher_shapes[-1]
        for side, shape in (("student", s_shape), ("teacher", t_shape)):
            if len(shape) != 3:
                raise BlockKDError(f"method simkd needs a (C, H, W) last feature map, but the {side}'s last block "
                                   f"outputs {shape}")
        check_pooling_head(self._views[1], t_shape, "simkd", "teacher")
        self.projector = projector(s_shape[0], t_shape[0], int(self.opts.factor))
        self.teacher_head = freeze(copy.deepcopy(self._views[1].head))
        pool_to = tuple(t_shape[1:]) if s_shape[1] > t_shape[1] else None
        self.target_size = tuple(s_shape[1:]) if s_shape[1] < t_shape[1] else None
        # A plain attribute: the modules are registered already (student, projector, teacher_head).
        self._deployed = (SimKDClassifier(self._views[0], self.projector, self.teacher_head, pool_to),)

    @property
    def untrained_student_parameters(self) -> tuple[str, ...]:
        """The student's own head, unused: SimKD classifies with the teacher's (see the base class)."""
        head = {id(p) for p in self._views[0].head.parameters()}
        return tuple(n for n, p in self.student.named_parameters() if id(p) in head)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_head.eval()  # frozen, like the teacher it comes from
        return self

    def deployed_model(self) -> nn.Module:
        return self._deployed[0]

    def student_logits(self, x):
        return self._deployed[0](x)

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        deployed = self._deployed[0]
        projected = deployed.features(x)
        with torch.no_grad():
            t_feats, _ = self._views[1].features(x)
            target = t_feats[-1]
            if self.target_size is not None:
                target = F.adaptive_avg_pool2d(target, self.target_size)
        logits = deployed.head(projected)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_feat": o.feat_weight * F.mse_loss(projected.float(), target.float()),
        }
