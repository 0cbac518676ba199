"""Connectors C_i: map a student block's output into the teacher's feature space at that block.

Why a module of its own: the stepping-stones of Block-KD need one per block, and any feature-based
method (FitNets, ...) needs the same thing. Shapes come from probing both networks once.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BlockKDError

# name -> the layers after resampling, as (kernel, relu after BN) per conv: each conv is followed by BN.
LAYERS = {
    "conv1x1_bn": [(1, False)],
    "conv3x3_bn": [(3, False)],
    "conv1x1_bn_relu": [(1, True)],
    # A two-layer adapter: a 3x3 conv + BN + ReLU at the teacher's width, then a 1x1 conv + BN.
    "conv3x3_bn_relu_conv1x1_bn": [(3, True), (1, False)],
}
KINDS = tuple(LAYERS)


class Connector(nn.Module):
    """Resample (if spatial sizes differ) + conv + BN from (c_in, h_in, w_in) to (c_out, h_out, w_out).

    Resampling is done on the cheaper side of the conv: pooling before it when the student's map is
    larger (adaptive average pooling), bilinear upsampling after it when the student's map is smaller.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], kind: str = "conv1x1_bn"):
        super().__init__()
        if kind not in KINDS:
            raise BlockKDError(f"unknown connector {kind!r}; choose from {', '.join(KINDS)}")
        (c_in, *self.in_size), (c_out, *self.out_size) = in_shape, out_shape
        layers: list[nn.Module] = []
        for j, (k, relu) in enumerate(LAYERS[kind]):
            conv = nn.Conv2d(c_in if j == 0 else c_out, c_out, k, padding=k // 2, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(c_out)] + ([nn.ReLU(inplace=True)] if relu else [])
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.out_size)
        if tuple(x.shape[-2:]) == size:
            return self.proj(x)
        if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
            return self.proj(F.adaptive_avg_pool2d(x, size))
        return F.interpolate(self.proj(x), size=size, mode="bilinear", align_corners=False)


def build_connectors(student_shapes, teacher_shapes, kind: str = "conv1x1_bn") -> nn.ModuleList:
    """One connector per block, from the probed (C, H, W) output shapes of both sides."""
    return nn.ModuleList(Connector(tuple(s), tuple(t), kind) for s, t in zip(student_shapes, teacher_shapes))
