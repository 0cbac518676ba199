"""Splitters for torchvision's ResNet family and MobileNetV2, registered by dotted class name.

Why by name: importing torchvision.models costs seconds, and only models that are already torchvision
instances need these splitters. Stages end at strides 4, 8, 16 and 32, so that ResNets and MobileNetV2
match block for block (MobileNetV2's stride-2 part joins the stem, as ResNet's does).
"""
from __future__ import annotations

import torch.nn as nn

from .core import register_splitter


@register_splitter("torchvision.models.resnet.ResNet")
def split_resnet(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    return [stem, model.layer2, model.layer3, model.layer4], nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)


@register_splitter("torchvision.models.mobilenetv2.MobileNetV2")
def split_mobilenet_v2(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    # features[i] is stride-2 for i in (0, 2, 4, 7, 14); slicing a Sequential shares its modules.
    f = model.features
    return [f[:4], f[4:7], f[7:14], f[14:]], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
