"""The classic torchvision input pipeline (PIL + transforms in DataLoader workers) on the same data.

Why it exists: it is the baseline the on-device pipeline is benchmarked against, so it must read the
very same in-memory images and split, and differ only in where and how augmentation runs.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from blockkd import data as data_lib
from blockkd.data.device_loader import apply_splits
from blockkd.data.folder import DeviceBatches, make_loader


class PILArrays(Dataset):
    """uint8 NCHW images served one by one as PIL images, as torchvision's CIFAR/MNIST classes do."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        hwc = x.permute(0, 2, 3, 1).numpy()
        self.x = hwc[..., 0] if hwc.shape[-1] == 1 else hwc  # mode "L" for grey images
        self.y, self.transform = y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(np.ascontiguousarray(self.x[i]))), self.y[i]


def reference_loader(cfg: dict, *, device: torch.device, num_workers: int, seed: int = 0) -> DeviceBatches:
    """RandomCrop(padding) + RandomHorizontalFlip + ToTensor + Normalize over the training split of the
    in-memory dataset ``cfg`` (a flat data section): the same images as ``blockkd.data.build``."""
    cfg = data_lib.parse(cfg).flat()
    data = data_lib.arrays(cfg)
    train_x, train_y, _, _ = apply_splits(data, cfg)
    steps = []
    if cfg["augment"]:
        steps = [T.RandomCrop(train_x.shape[-1], padding=data.padding)]
        steps += [T.RandomHorizontalFlip()] if data.flip else []
    tf = T.Compose(steps + [T.ToTensor(), T.Normalize(data.mean, data.std)])
    return make_loader(PILArrays(train_x, train_y, tf), batch_size=cfg["batch_size"], train=True,
                       num_workers=num_workers, device=device, drop_last=cfg["drop_last"], seed=seed,
                       rank=0, world_size=1, normalize=None)
