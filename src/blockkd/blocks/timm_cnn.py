"""Splitter for timm models, registered for every class of the ``timm`` package (``"timm.*"``).

Why through ``feature_info``: every timm CNN records which of its modules output its feature maps and at
which reduction (stride); the stages end there, whatever the architecture (ResNet, ConvNeXt, MobileNetV3,
EfficientNet, RegNet ...). Features at reduction 2 join the first stage, as in the torchvision splitters,
so that stages end at strides 4, 8, 16, 32 and timm, torchvision and zoo models pair block for block.
The cut assumes the model's forward runs its children in order (true of timm's CNNs); each split checks
that the block view reproduces ``model(x)`` and says to register a splitter where it does not. ViTs and
Swin have splitters of their own (:mod:`.vit`), found first.
timm itself is not imported here: only attributes of an existing model are read.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import BlockKDError
from .core import HOW_TO_REGISTER, Blocks, _chain, register_splitter, verify_view

PROBE_SIZE = 64  # spatial size of the exactness check: 2x2 maps at stride 32


def _sequence(module: nn.Module, cuts: list[str], prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``module``'s children in order, with each container that holds a cut expanded until the cut is an item."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = prefix + name
        if any(c.startswith(full + ".") for c in cuts):
            if not isinstance(child, (nn.Sequential, nn.ModuleList)):
                raise BlockKDError(f"feature module {next(c for c in cuts if c.startswith(full + '.'))} is inside "
                                   f"{full} ({type(child).__name__}), which does not run its children in order")
            out += _sequence(child, cuts, full + ".")
        else:
            out.append((full, child))
    return out


def _stage_ends(model: nn.Module) -> list[str]:
    """The last feature module of each reduction >= 4, in order."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise BlockKDError(f"timm model {type(model).__name__} has no feature_info")
    last: dict[int, str] = {}
    for f in info:
        if f["reduction"] >= 4:
            last[f["reduction"]] = f["module"]
    return list(last.values())


@torch.no_grad()
def _check_exact(model: nn.Module, stages: list[nn.Module], head: nn.Module) -> None:
    """The chained view must equal ``model(x)`` on a probe input (eval mode; modes and RNG untouched)."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    gen = torch.Generator(param.device).manual_seed(0)
    x = torch.randn(2, channels, PROBE_SIZE, PROBE_SIZE, generator=gen, device=param.device, dtype=param.dtype)
    verify_view(model, Blocks(stages, head), x, what="at its feature_info stages")


@register_splitter("timm.*")
def split_timm(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """Stages end at the ``feature_info`` modules; everything after the last one is the head.

    timm applies ``drop_rate`` functionally in ``forward_head``; the head here has no such dropout, so
    models created with ``drop_rate > 0`` are refused (blockkd creates them with 0).
    """
    if getattr(model, "drop_rate", 0.0):
        raise BlockKDError(f"timm model {type(model).__name__} has drop_rate={model.drop_rate}, which its "
                           f"forward_head applies outside any module; create it with drop_rate=0 to split it")
    ends = _stage_ends(model)
    seq = _sequence(model, ends)
    names = [n for n, _ in seq]
    missing = [e for e in ends if e not in names]
    if missing or not ends:
        raise BlockKDError(f"cannot split timm model {type(model).__name__}: feature module {missing[:1] or ends} "
                           f"is not one of its top-level steps; {HOW_TO_REGISTER.format(cls=type(model).__name__)}")
    cuts = [names.index(e) + 1 for e in ends]
    if any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise BlockKDError(f"timm model {type(model).__name__}: feature modules {ends} are not in forward order")
    if cuts[-1] == len(seq):
        raise BlockKDError(f"timm model {type(model).__name__} has no head after its last feature module {ends[-1]}")
    stages = [_chain(seq[a:b]) for a, b in zip([0, *cuts], cuts)]
    head = _chain(seq[cuts[-1]:])
    _check_exact(model, stages, head)
    return stages, head
