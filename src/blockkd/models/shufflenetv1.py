"""ShuffleNetV1 for CIFAR (``ShuffleV1``: groups 3, widths 240/480/960) with RepDistiller's state_dict keys.

Why these exact attribute names: checkpoints from RepDistiller and mdistiller load with no key mapping.
Differences: logits only, global adaptive pool, ``nn.ChannelShuffle`` for the shuffle (no parameters).
PyTorch's default initialisation, as in the original.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1. With stride 2 the 3x3-avg-pooled input
    is concatenated (so the branch makes ``cout`` minus the input's channels), else added."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        mid = cout // 4
        g = 1 if cin == 24 else groups  # the stem's 24 channels are not grouped
        self.stride = stride
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = nn.ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return self.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    """1x1 stem to 24 channels, three stages each starting with a stride-2 block.

    stages: [conv1, bn1, relu]+layer1 | layer2 | layer3; head: avgpool, flatten, linear
    """

    def __init__(self, out_planes: tuple[int, int, int] = (240, 480, 960), num_blocks: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        cin, stages = 24, []
        for planes, n in zip(out_planes, num_blocks):
            stages.append(nn.Sequential(*(
                Bottleneck(cin if i == 0 else planes, planes - cin if i == 0 else planes, 2 if i == 0 else 1, groups)
                for i in range(n))))
            cin = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(out_planes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))
