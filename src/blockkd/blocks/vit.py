"""Splitters for timm's Vision Transformers (ViT, DeiT and every ``VisionTransformer`` subclass) and Swin.

ViT natural blocks are single transformer blocks: block 1 is the patch embedding, the class / distillation
/ register tokens and position embedding (timm's ``_pos_embed``), ``patch_drop``, ``norm_pre`` and
transformer block 1; block k is transformer block k; the head is the final ``norm`` then the model's own
``forward_head`` (pooling, ``fc_norm``, ``head_drop``, classifier; DeiT's two heads averaged). Features are
tokens ``(L, D)``: ``Blocks.prefix_tokens`` (the model's ``num_prefix_tokens``) tells connectors which
tokens form the square patch grid. :func:`blockkd.blocks.match` groups consecutive blocks by depth.

Swin's (v1 and v2) stages output NHWC maps; its blocks are the stages with their output permuted to NCHW (and back at
the next stage's input), so a Swin is a CNN to the rest of blockkd: stages at strides 4, 8, 16, 32, matched
to CNNs by resolution. The head is the final norm and ``head`` (NHWC average pooling, classifier).

Both splitters take precedence over the generic timm CNN splitter (exact classes before ``"timm.*"``)
and check that the view reproduces the model's logits. timm is not imported here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import BlockKDError
from .core import Blocks, Chain, register_splitter, verify_view

_EMBED = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


class _ModelPart(nn.Module):
    """Runs a method of ``model``; registers (shares) only the given children and direct parameters.

    The model itself is held outside the module tree, so the part's parameters are just its own share.
    """

    def __init__(self, model: nn.Module, children: list[str], params: bool = False):
        super().__init__()
        object.__setattr__(self, "_model", model)
        for name in children:
            child = getattr(model, name, None)
            if isinstance(child, nn.Module):
                self.add_module(name, child)
        if params:
            for name, p in model.named_parameters(recurse=False):
                self.register_parameter(name, p)


class ViTEmbed(_ModelPart):
    """Image -> tokens: patch embedding, prefix tokens + position embedding, patch dropout, pre-norm."""

    def __init__(self, model: nn.Module):
        super().__init__(model, list(_EMBED), params=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self._model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


class ViTHead(_ModelPart):
    """Tokens -> logits: the final norm, then the model's ``forward_head``."""

    def __init__(self, model: nn.Module):
        rest = [n for n, _ in model.named_children() if n not in (*_EMBED, "blocks")]
        super().__init__(model, rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model.forward_head(self._model.norm(x))


@torch.no_grad()
def _check_exact(model: nn.Module, view: Blocks, image_size) -> None:
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    gen = torch.Generator(param.device).manual_seed(0)
    x = torch.randn(2, channels, *image_size, generator=gen, device=param.device, dtype=param.dtype)
    verify_view(model, view, x, what="into its transformer blocks")


def _image_size(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.patch_embed, "img_size", None) or (224, 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


@register_splitter("timm.models.vision_transformer.VisionTransformer")
def split_vit(model: nn.Module) -> Blocks:
    """One block per transformer block (block 1 with the embeddings), then norm + ``forward_head``."""
    blocks = list(model.blocks)
    if not blocks:
        raise BlockKDError(f"{type(model).__name__} has no transformer blocks")
    view = Blocks([Chain(ViTEmbed(model), blocks[0]), *blocks[1:]], ViTHead(model),
                  prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))
    _check_exact(model, view, _image_size(model))
    return view


class ToNCHW(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class ToNHWC(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


@register_splitter("timm.models.swin_transformer_v2.SwinTransformerV2")
@register_splitter("timm.models.swin_transformer.SwinTransformer")
def split_swin(model: nn.Module) -> Blocks:
    """One block per stage, NCHW between blocks; the head is the final norm and the NHWC classifier head."""
    stages = list(model.layers)
    blocks = [Chain(model.patch_embed, stages[0], ToNCHW()), *(Chain(ToNHWC(), s, ToNCHW()) for s in stages[1:])]
    view = Blocks(blocks, Chain(ToNHWC(), model.norm, model.head))
    _check_exact(model, view, _image_size(model))
    return view
