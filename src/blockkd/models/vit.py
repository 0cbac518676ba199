"""A small Vision Transformer for 28 and 32 px inputs (Fashion-MNIST, CIFAR): ``vit_tiny_p4``.

Why: the CNN -> ViT pairs of the paper need a ViT student, and timm's smallest (``vit_tiny_patch16_224``) takes
224 px images and 5.7M parameters. This one is timm's own ``VisionTransformer`` (so the ViT splitter of
:mod:`blockkd.blocks.vit` and the token connectors serve it unchanged) with 4 px patches (a 7x7 grid at 28 px,
8x8 at 32 px, any size via timm's ``dynamic_img_size``), width 64, 6 blocks of 2 heads and an MLP ratio of 2:
about 0.2M parameters, the size of the zoo's small CNN students. timm is imported when the model is built.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import BlockKDError

# name -> (patch, width, depth, heads, mlp ratio)
CONFIGS = {"vit_tiny_p4": (4, 64, 6, 2, 2.0)}


def create(name: str, num_classes: int = 100, in_channels: int = 3) -> nn.Module:
    """The zoo ViT ``name`` (randomly initialised, timm's ViT initialisation)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        raise BlockKDError(f"model {name!r} is a timm VisionTransformer: pip install 'blockkd[timm]'") from None
    patch, width, depth, heads, mlp = CONFIGS[name]
    return VisionTransformer(img_size=32, patch_size=patch, in_chans=in_channels, num_classes=num_classes,
                             embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp, dynamic_img_size=True)
