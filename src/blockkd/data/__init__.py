"""Datasets for blockkd: ``build(cfg, device=...) -> DataBundle``.

Small datasets (Fashion-MNIST, CIFAR-10/100, synthetic, user-registered) are held whole on the
training device as uint8 and augmented there in batches (``device_loader``); image folders go through
a DataLoader with workers (``folder``). Both yield ``(x, y)`` already on the device, x normalised
float32 NCHW, y int64, and reshuffle deterministically per epoch via ``.set_epoch(e)``.

Batch sizes: ``batch_size`` is the GLOBAL batch size; each of ``world_size`` ranks gets
``batch_size // world_size`` (it must divide). Training shards are disjoint slices of one permutation
shared by all ranks; test shards are contiguous, not dropped, and cover the test set exactly once.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ..errors import BlockKDError
from ..registry import Registry, unknown
from . import cifar, fashion_mnist, folder, synthetic
from .common import DataBundle, Loader
from .device_loader import ArrayData, DeviceLoader, build_in_memory, crop_flip, sample_crop_flip
from .reference import reference_loader

__all__ = ["DEFAULTS", "DataBundle", "ArrayData", "DeviceLoader", "Loader", "build", "names", "register",
           "torchvision_reference_loader", "crop_flip", "sample_crop_flip"]

DEFAULTS: dict = {
    "name": "cifar100",  # fashion_mnist | cifar10 | cifar100 | imagefolder | synthetic | a registered name
    "root": None,  # None: per-dataset default (see each module)
    "batch_size": 64,  # global, split over ranks
    "eval_batch_size": 256,  # global, split over ranks
    "num_workers": 4,  # DataLoader workers (imagefolder and the torchvision reference loader only)
    "augment": True,
    "train_subset": None,  # int: train on the first k images of a fixed permutation
    "val_split": 0,  # >0: hold out that many training images as the "test" split (for tuning)
    "download": False,
    "drop_last": True,  # training loader only
    "num_classes": 10,  # synthetic only
    "image_size": None,  # synthetic (default 32) and imagefolder (default 224)
    "channels": 3,  # synthetic only
    "train_size": 512,  # synthetic only
    "test_size": 256,  # synthetic only
}

# In-memory datasets: ``cfg -> ArrayData`` functions. ``imagefolder`` is handled by ``folder.build``.
ARRAYS: Registry[Callable[[dict], ArrayData]] = Registry("dataset")
ARRAYS.register("fashion_mnist", fashion_mnist.load)
ARRAYS.register("cifar10", functools.partial(cifar.load, num_classes=10))
ARRAYS.register("cifar100", functools.partial(cifar.load, num_classes=100))
ARRAYS.register("synthetic", synthetic.load)


def register(name: str):
    """Decorator: register ``fn(cfg) -> ArrayData`` as an in-memory dataset called ``name``."""
    return ARRAYS.register(name)


def names() -> list[str]:
    return ARRAYS.names() + ["imagefolder"]


def _complete(cfg: dict) -> dict:
    """``cfg`` over DEFAULTS; unknown keys and names get closest-match errors."""
    for key in cfg:
        if key not in DEFAULTS:
            raise unknown("data key", key, DEFAULTS)
    cfg = {**DEFAULTS, **cfg}
    if cfg["name"] not in names():
        raise unknown("dataset", str(cfg["name"]), names())
    return cfg


def build(cfg: dict, *, device: torch.device | str, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataBundle:
    """Train and test loaders for ``cfg`` (keys as in ``DEFAULTS``) on ``device``, for rank ``rank``."""
    cfg = _complete(cfg)
    if not 0 <= rank < world_size:
        raise BlockKDError(f"rank {rank} is outside world_size {world_size}")
    device = torch.device(device)
    make = folder.build if cfg["name"] == "imagefolder" else build_in_memory(ARRAYS.get(cfg["name"]))
    return make(cfg, device=device, rank=rank, world_size=world_size, seed=seed)


def torchvision_reference_loader(cfg: dict, *, device: torch.device | str, seed: int = 0) -> folder.FolderLoader:
    """The classic DataLoader + PIL transforms pipeline over the same in-memory training data (benchmarks)."""
    cfg = _complete(cfg)
    if cfg["name"] == "imagefolder":
        raise BlockKDError("the torchvision reference loader is for in-memory datasets; image folders already "
                           "use a DataLoader")
    return reference_loader(ARRAYS.get(cfg["name"])(cfg), cfg, device=torch.device(device), seed=seed)
