"""Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) with RepDistiller's state_dict keys.

Why these exact attribute names (``block1.layer.0.convShortcut`` ...): public CIFAR-100 teachers load with
no key mapping. Differences from the original: logits only, global adaptive pool, no dropout option.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import init_weights


class BasicBlock(nn.Module):
    """Pre-activation block. When the shape changes, the 1x1 ``convShortcut`` (else None) takes the
    *activated* input, exactly as in the original."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A stage: ``n`` BasicBlocks in ``.layer`` (the extra level exists only for the original's keys)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*(BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: three stages of (depth-4)/6 pre-activation blocks, widths 16k, 32k, 64k.

    stages: conv1+block1 | block2 | block3+[bn1, relu]; head: avgpool, flatten, fc
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n, k = (depth - 4) // 6, widen_factor
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, 16, 16 * k, 1)
        self.block2 = NetworkBlock(n, 16 * k, 32 * k, 2)
        self.block3 = NetworkBlock(n, 32 * k, 64 * k, 2)
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(64 * k, num_classes)
        init_weights(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.flatten(self.avgpool(x)))


CONFIGS: dict[str, tuple[int, int]] = {f"wrn_{d}_{k}": (d, k) for d in (16, 40) for k in (1, 2)}
