"""MobileNetV1 for ImageNet (Howard et al. 2017) with mdistiller's state_dict keys (``model.<i>.<j>``, ``fc``).

Why these exact attribute names: the ResNet50 -> MobileNetV1 ImageNet benchmark of mdistiller (and of the
KD papers that use it) trains this model; its checkpoints load with no key mapping. Differences from the
original: logits only (no feature dict), a global adaptive pool in place of ``AvgPool2d(7)`` (the same at
224x224, no parameters either way), ``num_classes`` and ``in_channels`` arguments. PyTorch's default
initialisation, as in the original.

stages (stride 4, 8, 16, 32): model[0:4] | model[4:6] | model[6:12] | model[12:14]; head: model[14], flatten, fc
"""
from __future__ import annotations

import torch
import torch.nn as nn

# (output channels, stride) of the 13 depthwise-separable layers after the stride-2 stem (32 channels).
LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))
STAGE_ENDS = (4, 6, 12, 14)  # model[:4], model[4:6], model[6:12], model[12:14]


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _conv_dw(cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, 32, 2)]
        cin = 32
        for cout, stride in LAYERS:
            layers.append(_conv_dw(cin, cout, stride))
            cin = cout
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.model(x), 1))
