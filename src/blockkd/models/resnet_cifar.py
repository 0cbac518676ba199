"""CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) with RepDistiller's state_dict keys.

Why these exact attribute names: public CIFAR-100 teachers (RepDistiller, mdistiller) load with no key
mapping. Differences from the original: logits only, and a global adaptive pool so 28x28 inputs work.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import init_weights


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block; ``downsample`` (1x1 conv + BN) when shape changes, else None."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2 with three stages of n BasicBlocks (widths ``widths[1:]``).

    stages: [conv1, bn1, relu]+layer1 | layer2 | layer3; head: avgpool, flatten, fc
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    @staticmethod
    def _stage(cin: int, cout: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_THIN, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
CONFIGS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    **{f"resnet{d}": (d, _THIN) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
}
