"""CIFAR-10/100 in torchvision's on-disk format (``cifar-10-batches-py`` / ``cifar-100-python``).

Reading goes through torchvision's own classes; only the md5 check of every file is skipped when
reading (it costs a second per start and rejects re-packed copies); downloads are still verified.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import functools

import torch

from ..errors import BlockKDError
from ..utils import data_home
from .device_loader import ArrayData

STATS = {  # per-channel mean/std of the training images, the values every CIFAR KD paper uses
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def torchvision_class(num_classes: int) -> type:
    """torchvision's CIFAR10 or CIFAR100 (imported on first use: a recipe check needs no torchvision)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    return {10: CIFAR10, 100: CIFAR100}[num_classes]


@functools.cache
def reader(num_classes: int) -> type:
    """torchvision's class reading the same files, checking they exist but not their md5."""
    cls = torchvision_class(num_classes)
    return type(f"Unchecked{cls.__name__}", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def default_root() -> Path:
    return data_home() / "cifar"


def load(cfg: dict, num_classes: int) -> ArrayData:
    """CIFAR-``num_classes`` as uint8 (N, 3, 32, 32) tensors from ``cfg['root']``."""
    root = Path(cfg.get("root") or default_root()).expanduser()
    folder = root / torchvision_class(num_classes).base_folder
    if cfg.get("download"):
        try:
            torchvision_class(num_classes)(root, train=True, download=True)
        except Exception as e:  # network errors come in many types; all mean the same to the user
            raise BlockKDError(f"downloading CIFAR-{num_classes} into {root} failed: {e}") from None
    if not folder.is_dir():
        raise BlockKDError(f"CIFAR-{num_classes} not found: expected {folder} (torchvision's format); "
                           f"set data.root to its parent folder or data.download=true")
    try:
        train, test = (reader(num_classes)(root, train=t) for t in (True, False))
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
        raise BlockKDError(f"cannot read CIFAR-{num_classes} from {folder}: {e}") from None

    def tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)

    (train_x, train_y), (test_x, test_y) = tensors(train), tensors(test)
    if max(int(train_y.max()), int(test_y.max())) >= num_classes:
        raise BlockKDError(f"CIFAR-{num_classes} in {folder} has labels >= {num_classes}: is it the other CIFAR?")
    mean, std = STATS[num_classes]
    return ArrayData(train_x, train_y, test_x, test_y, num_classes=num_classes, mean=mean, std=std,
                     padding=4, flip=True, classes=list(train.classes))
