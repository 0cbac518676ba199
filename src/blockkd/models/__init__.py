"""The CIFAR model zoo, torchvision and timm models by prefix: names, factories and checkpoint loading.

Why the names and keys of RepDistiller/mdistiller: every KD paper on CIFAR-100 starts from their public
teachers, so ``load_weights(create("resnet32x4"), "ckpt_epoch_240.pth")`` must work with no key mapping.
Every zoo model ends with a global ``nn.AdaptiveAvgPool2d(1)``, so 28x28 and 32x32 inputs both work, and
its forward is a plain sequence of its child modules (in registration order), which the block splitter uses.
``torchvision.<name>``, ``timm.<name>``, ``hf.<id>`` and ``hf-config.<config>`` (see ``external``) are resolved
by prefix, not registered.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn

from ..errors import BlockKDError
from ..registry import Registry, UnknownNameError
from . import external, mobilenetv1, mobilenetv2, resnet_cifar, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["names", "create", "check_name", "register", "load_weights", "num_params", "read_state_dict",
           "torchvision_state_dict", "timm_state_dict", "prefixes"]

Factory = Callable[..., nn.Module]  # fn(num_classes, in_channels) -> nn.Module
_MODELS: Registry[Factory] = Registry("model")


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator adding a user model: ``fn(num_classes, in_channels) -> nn.Module`` under ``name``."""
    return _MODELS.register(name)


torchvision_state_dict = external.torchvision_state_dict
timm_state_dict = external.timm_state_dict


def names() -> list[str]:
    """Every registered model name (the zoo first, in registration order): each one ``create`` accepts."""
    return _MODELS.names()


def prefixes() -> list[str]:
    """The prefixes that name any model of a library (``torchvision.``, ``timm.``, ``hf.``, ``hf-config.``):
    ``create("timm.convnext_atto")``; their models are listed by the libraries (``torchvision.models.list_models()``,
    ``timm.list_models()``, the Hugging Face hub)."""
    return [f"{f}." for f in external.FAMILIES]


def check_name(name: str) -> None:
    """Raise ``UnknownNameError`` with the closest valid name unless ``create(name)`` would find the model."""
    if external.family(name):
        external.check(name)
    elif name not in _MODELS:
        import torchvision.models as tvm

        if name in tvm.list_models(module=tvm):  # ImageNet users type the bare torchvision name
            raise UnknownNameError(f"unknown model {name!r}; did you mean 'torchvision.{name}'?")
        _MODELS.get(name)  # the registry's closest-name error


def create(name: str, num_classes: int = 100, in_channels: int | None = 3, **kwargs) -> nn.Module:
    """A freshly initialised model; unknown names raise with the closest valid name.

    ``torchvision.<name>`` / ``timm.<name>``: that library's model, ``kwargs`` passed to its constructor
    (``model.kwargs``: ``img_size=32, patch_size=4`` for a timm ViT); ``hf.<id or folder>`` (pretrained) /
    ``hf-config.<config.json>``: a Hugging Face text classifier (see ``external.create``).
    ``in_channels=None``: the data is text (``DataBundle.in_channels``); only text models take it.
    """
    check_name(name)
    fam = external.family(name)
    factory = partial(external.create, name) if fam else _MODELS.get(name)
    if in_channels is None and fam not in external.TEXT_FAMILIES:
        raise BlockKDError(f"model {name!r} takes images, but the data is text: use a Hugging Face model "
                           f"(hf.<hub id or folder>, hf-config.<config.json>)")
    for what, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if what == "in_channels" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BlockKDError(f"{what} must be a positive integer, got {value!r}")
    if kwargs and fam not in ("torchvision", "timm"):
        raise BlockKDError(f"model {name!r} takes no constructor arguments ({', '.join(kwargs)}): only torchvision.* "
                           f"and timm.* models do")
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)


def num_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _register_zoo() -> None:
    for name, (depth, widths) in resnet_cifar.CONFIGS.items():
        _MODELS.register(name, partial(resnet_cifar.CifarResNet, depth, widths))
    for name, (depth, k) in wrn.CONFIGS.items():
        _MODELS.register(name, partial(wrn.WideResNet, depth, k))
    for name, cfg in vgg.CONFIGS.items():
        _MODELS.register(name, partial(vgg.VGG, cfg))
    for name, (block, blocks) in resnetv2.CONFIGS.items():
        _MODELS.register(name, partial(resnetv2.ResNetV2, block, blocks))
    for name in ("MobileNetV2", "mobile_half"):  # mdistiller's and RepDistiller's names for the same model
        _MODELS.register(name, partial(mobilenetv2.MobileNetV2, 6, 0.5))
    _MODELS.register("ShuffleV1", shufflenetv1.ShuffleNetV1)
    _MODELS.register("ShuffleV2", shufflenetv2.ShuffleNetV2)
    _MODELS.register("MobileNetV1", mobilenetv1.MobileNetV1)  # mdistiller's ImageNet student


_register_zoo()


# --- checkpoints --------------------------------------------------------------------------------------

_WRAPPERS = ("model", "state_dict", "net")  # RepDistiller/mdistiller: {"model": sd, "epoch": ...}


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and without a DDP ``module.`` prefix; no code is run.

    ``.safetensors`` via safetensors; anything else via ``torch.load(weights_only=True)``, so a pickle
    that needs more than tensors and plain containers is refused rather than executed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise BlockKDError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj: object = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise BlockKDError(f"weights file {path} is not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler's refusal, or a truncated / non-torch file
            msg = str(e)
            if "Weights only load failed" in msg or "WeightsUnpickler" in msg:
                found = re.search(r"GLOBAL (\S+) was not an allowed global", msg)
                needs = f"it would import {found.group(1)}" if found else "it holds more than tensors"
                raise BlockKDError(f"weights file {path} was refused for safety: {needs} (only torch.load's "
                                   f"weights_only=True is used, no code is run); re-save its state_dict from a "
                                   f"trusted environment or convert it to .safetensors") from None
            first = msg.strip().splitlines()[0] if msg.strip() else ""
            raise BlockKDError(f"weights file {path} is not a readable PyTorch checkpoint "
                               f"({type(e).__name__}: {first})") from None
    for _ in range(3):  # e.g. {"state_dict": {"model": sd}}; bounded, as a pickle may hold cycles
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        obj = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), obj)
    if not _is_state_dict(obj):
        keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, Mapping) else type(obj).__name__
        raise BlockKDError(f"weights file {path} holds no state_dict (found: {keys}); expected tensors "
                           f"directly or under one of {', '.join(_WRAPPERS)}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint into ``model`` in place (and return it); every mismatch is one BlockKDError line.

    BatchNorm ``num_batches_tracked`` counters may be absent (old checkpoints): they do not affect outputs.
    """
    sd = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (file {_shape(sd[k])}, model {_shape(own[k])})"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = [f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
                if items]
    if problems:
        raise BlockKDError(f"weights file {path} does not fit the {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=False)
    return model
