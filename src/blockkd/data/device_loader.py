"""Whole small datasets held on the training device, batched and augmented there.

Why: for CIFAR/Fashion-MNIST-sized data, per-image PIL work in DataLoader workers, not the GPU, limits
a small model's training speed. Keeping the dataset as one uint8 tensor on the device and augmenting a
whole batch with a few vectorised kernels (one gather does random crop + flip, one fused multiply-add
normalises) removes the input pipeline from the critical path.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .._hooks import debug_log
from .common import (AUGMENT, SHUFFLE, STRONG, DataBundle, Normalize, check_not_empty, eval_shard, generator,
                     per_rank_batch, per_rank_eval_batch, split_indices)
from .strong import rand_augment


@dataclasses.dataclass
class ArrayData:
    """A small dataset as uint8 NCHW / int64 CPU tensors plus how to augment and normalise it."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int  # random-crop padding used by augmentation
    flip: bool = True  # horizontal flips are label-preserving for this data
    classes: list[str] | None = None


def sample_crop_flip(n: int, padding: int, flip: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample (top, left, flip) augmentation parameters, drawn on ``gen``'s device."""
    dev = gen.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
    flips = torch.randint(0, 2, (n,), generator=gen, device=dev).bool()
    return top, left, flips if flip else torch.zeros_like(flips)


def crop_flip(x: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Crop each image of ``x`` (B, C, H, W) at (top, left) of its zero-padded copy, mirrored where ``flip``.

    Same semantics as torchvision's RandomCrop(H, padding) + RandomHorizontalFlip, as one gather for the
    whole batch: the flip is folded into the column indices.
    """
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = top[:, None] + torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    cols = left[:, None] + torch.where(flip[:, None], cols.flip(0), cols)
    return x[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


class DeviceLoader:
    """Batches ``(normalised float32 x, int64 y)`` cut from tensors that already live on the device.

    Training (``shuffle=True``): each epoch permutes all samples with a generator seeded from
    (seed, epoch), the same permutation on every rank; rank r takes its r-th slice of every global batch,
    so ranks are disjoint and together cover the epoch. Crop/flip draws come from a generator on the
    device seeded from (seed, epoch, rank), so any epoch can be replayed exactly (resume).
    Evaluation (``shuffle=False``): rank r reads the r-th contiguous 1/world_size of the data in order,
    nothing dropped, so per-rank sums reduce to exact metrics. ``with_index``: batches are
    ``(x, y, index)``, each sample's index in the split (methods with a memory bank, CRD). ``strong_view``
    (training): each batch ends with a second view of the same samples, its own crop/flip then RandAugment +
    Cutout (:mod:`blockkd.data.strong`), drawn from (seed, epoch, rank) on a stream of its own, so the first
    view is the same with or without it (methods that declare ``needs_strong_view``: MLKD).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, normalize: Normalize,
                 shuffle: bool, padding: int = 0, flip: bool = False, augment: bool = False,
                 drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.x, self.y = x, y
        self.batch_size, self.normalize = batch_size, normalize
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment, self.padding, self.flip = augment and (padding > 0 or flip), padding, flip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.with_index, self.strong_view = 0, False, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _train_counts(self) -> tuple[int, int]:
        """(full global batches, samples this rank gets from the last partial batch)."""
        full, rest = divmod(len(self.y), self.batch_size * self.world_size)
        # A partial last batch is kept only if every rank gets at least one sample of it (DDP needs the
        # same number of steps on all ranks); it is cut like ``tensor_split``: the first ranks get one more.
        if self.drop_last or rest < self.world_size:
            return full, 0
        return full, rest // self.world_size + (self.rank < rest % self.world_size)

    def _plan(self) -> tuple[torch.Tensor, list[int]]:
        """This rank's sample indices for the epoch, in order, and the batch sizes that cut them."""
        if not self.shuffle:
            idx = eval_shard(len(self.y), self.rank, self.world_size)
            return idx, [len(t) for t in idx.split(self.batch_size)]
        full, tail = self._train_counts()
        perm = torch.randperm(len(self.y), generator=generator(self.seed, self.epoch, SHUFFLE))
        step = self.batch_size * self.world_size
        idx = perm[: full * step].view(full, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        sizes = [self.batch_size] * full
        if tail:
            idx = torch.cat([idx, perm[full * step:].tensor_split(self.world_size)[self.rank]])
            sizes.append(tail)
        return idx, sizes

    def __len__(self) -> int:
        if not self.shuffle:
            return -(-len(eval_shard(len(self.y), self.rank, self.world_size)) // self.batch_size)
        full, tail = self._train_counts()
        return full + int(tail > 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx, sizes = self._plan()
        idx = idx.to(self.x.device)  # one small copy per epoch; everything below stays on the device
        params = None
        if self.augment:  # the whole epoch's draws at once: three kernels instead of three per batch
            gen = generator(self.seed, self.epoch, self.rank, AUGMENT, device=self.x.device)
            params = zip(*(p.split(sizes) for p in sample_crop_flip(len(idx), self.padding, self.flip, gen)))
        strong = self.strong_view and self.shuffle
        if strong:  # the second view's crop/flip and RandAugment on a stream of their own
            sgen = generator(self.seed, self.epoch, self.rank, STRONG, device=self.x.device)
            sparams = zip(*(p.split(sizes) for p in sample_crop_flip(len(idx), self.padding, self.flip, sgen)))
        for i in idx.split(sizes):
            if self.shuffle:
                debug_log(self.rank, lambda: {"epoch": self.epoch, "indices": i.tolist()})
            x = self.x[i]
            batch: tuple = (self.y[i], i) if self.with_index else (self.y[i],)
            if strong:
                batch += (self.normalize(rand_augment(crop_flip(x, self.padding, *next(sparams)), sgen)),)
            if params is not None:
                x = crop_flip(x, self.padding, *next(params))
            yield (self.normalize(x), *batch)


def apply_splits(data: ArrayData, cfg: dict) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, test_x, test_y) after ``train_subset`` / ``val_split`` (see ``split_indices``)."""
    train_idx, val_idx = split_indices(len(data.train_y), cfg["val_split"], cfg["train_subset"])
    train_x, train_y, test_x, test_y = data.train_x, data.train_y, data.test_x, data.test_y
    if val_idx is not None:
        test_x, test_y = train_x[val_idx], train_y[val_idx]
    if train_idx is not None:
        train_x, train_y = train_x[train_idx], train_y[train_idx]
    return train_x, train_y, test_x, test_y


def build_in_memory(load: Callable[[dict], ArrayData]) -> Callable[..., DataBundle]:
    """Turn a ``cfg -> ArrayData`` loader into a ``build`` function for the dataset registry."""

    def build(cfg: dict, *, device: torch.device, rank: int, world_size: int, seed: int) -> DataBundle:
        data = load(cfg)
        train_x, train_y, test_x, test_y = apply_splits(data, cfg)
        norm = Normalize(data.mean, data.std, device)

        def loader(x, y, train: bool) -> DeviceLoader:
            return DeviceLoader(
                x.to(device).contiguous(), y.to(device=device, dtype=torch.int64), normalize=norm, shuffle=train,
                batch_size=per_rank_batch(cfg["batch_size"], world_size) if train
                else per_rank_eval_batch(cfg["eval_batch_size"], world_size),
                padding=data.padding, flip=data.flip, augment=train and cfg["augment"],
                drop_last=train and cfg["drop_last"], seed=seed, rank=rank, world_size=world_size)

        train = loader(train_x, train_y, True)
        check_not_empty(train, f"the {cfg['name']} training set", len(train_y), cfg["batch_size"])
        return DataBundle(train=train, test=loader(test_x, test_y, False), num_classes=data.num_classes,
                          input_shape=tuple(train_x.shape[1:]), name=cfg["name"], train_size=len(train_y),
                          test_size=len(test_y), mean=tuple(data.mean), std=tuple(data.std), classes=data.classes)

    return build
