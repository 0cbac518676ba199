"""Splitters for the zoo: one stage per spatial resolution, the first including the stem.

Every zoo model's forward runs its children in registration order (see ``blockkd.models``), so a
splitter only names the children where stages and head begin.
"""
from __future__ import annotations

import torch.nn as nn

from ..models import mobilenetv1, mobilenetv2, resnet_cifar, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn
from .core import children_splitter, register_splitter

_AFTER_STEM = {
    resnet_cifar.CifarResNet: (["layer2", "layer3"], "avgpool"),
    resnetv2.ResNetV2: (["layer2", "layer3", "layer4"], "avgpool"),
    wrn.WideResNet: (["block2", "block3"], "avgpool"),
    # Pools open the next stage, so every stage ends at its own resolution (pre-pool features).
    vgg.VGG: (["pool0", "pool1", "pool2"], "pool4"),
    # One stage per output resolution: blocks[0:2] share the stem's, blocks[3:5] and blocks[5:7] too.
    mobilenetv2.MobileNetV2: (["blocks.2", "blocks.3", "blocks.5"], "avgpool"),
    shufflenetv1.ShuffleNetV1: (["layer2", "layer3"], "avgpool"),
    shufflenetv2.ShuffleNetV2: (["layer2", "layer3"], "avgpool"),
}

for _cls, (_starts, _head) in _AFTER_STEM.items():
    register_splitter(_cls)(children_splitter(_starts, _head))


@register_splitter(mobilenetv1.MobileNetV1)
def split_mobilenet_v1(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """Stages ending at strides 4, 8, 16, 32 (mdistiller's feat1..feat4), so it pairs with ResNets block for block."""
    ends = mobilenetv1.STAGE_ENDS
    stages = [model.model[a:b] for a, b in zip((0, *ends[:-1]), ends)]
    return stages, nn.Sequential(model.model[ends[-1]:], nn.Flatten(1), model.fc)
