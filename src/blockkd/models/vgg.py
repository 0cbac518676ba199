"""VGG with BatchNorm (vgg8, vgg11, vgg13, vgg16, vgg19) with RepDistiller's state_dict keys.

Why these exact attribute names (``block0.0.weight`` ...): public CIFAR-100 teachers load with no key
mapping. As in the original, each block drops its last ReLU (so block outputs are pre-activations); here
that ReLU is an ``nn.ReLU`` module so the model is a plain sequence of its modules.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._common import init_weights


class TinyImageNetPool(nn.MaxPool2d):
    """RepDistiller's ``if h == 64: x = pool3(x)``: a 2x2 max pool applied only to 8-px-high maps.

    Why a module: the rule becomes part of the module sequence. Here the map is the input downsampled 8x,
    so it is 8 px high exactly for 64-px inputs (Tiny-ImageNet; also 65..71 px, which the original did
    not pool); CIFAR (32) and Fashion-MNIST (28) pass through unchanged.
    """

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if x.shape[-2] == 8 else x


def _make_layers(widths: list[int], cin: int) -> nn.Sequential:
    """conv3x3 (with bias) + BN + ReLU per width, minus the final ReLU (the original's ``layers[:-1]``)."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks (widths from ``cfg``), max pools between them, global pool, one Linear(512).

    stages: block0, relu0 | pool0, block1, relu1 | pool1, block2, relu2 | pool2, block3, relu3, pool3, block4, relu4;
    head: pool4, flatten, classifier
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        cins = [in_channels] + [widths[-1] for widths in cfg[:-1]]
        # Registered in forward order: running the children in order equals forward().
        self.block0, self.relu0, self.pool0 = _make_layers(cfg[0], cins[0]), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.block1, self.relu1, self.pool1 = _make_layers(cfg[1], cins[1]), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.block2, self.relu2, self.pool2 = _make_layers(cfg[2], cins[2]), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.block3, self.relu3, self.pool3 = _make_layers(cfg[3], cins[3]), nn.ReLU(), TinyImageNetPool()
        self.block4, self.relu4, self.pool4 = _make_layers(cfg[4], cins[4]), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.pool3(self.relu3(self.block3(x)))
        x = self.pool4(self.relu4(self.block4(x)))
        return self.classifier(self.flatten(x))


CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
