"""MobileNetV2 for CIFAR (RepDistiller's ``mobile_half``: expansion T=6, width 0.5) with its state_dict keys.

Why these exact attribute names (``blocks.1.0.conv.3.weight`` ...): checkpoints from RepDistiller and
mdistiller load with no key mapping. Differences: logits only, global adaptive pool (the original's
``AvgPool2d(2, ceil_mode=True)`` is global for 32x32), and no debug print.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import init_weights

# (channels before width scaling, repeats, stride of the first repeat); the first group does not expand.
GROUPS = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand, 3x3 depthwise, 1x1 linear projection (``.conv``, 8 layers); residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """Stride-2 stem, seven groups of inverted residuals (``blocks``, a ModuleList), 1x1 conv to 1280.

    stages: conv1+blocks[0:2] | blocks[2] | blocks[3:5] | blocks[5:7]+conv2; head: avgpool, flatten, classifier
    """

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        cin = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for g, (c, n, s) in enumerate(GROUPS):
            cout, layers = int(c * width_mult), []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, 1 if g == 0 else expansion))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.conv2(x)
        return self.classifier(self.flatten(self.avgpool(x)))
