"""Image folders (ImageNet layout ``root/train/<class>/*``, ``root/val/<class>/*``) through a DataLoader.

Why this split of work: decoding and RandomResizedCrop must happen per image on the CPU (worker
processes; PIL decodes, torch's uint8 antialiased resize crops: ~1.5x the images/s of PIL's resize
per core here), but everything that can be batched is left to the device: workers emit uint8 tensors
(4x less to copy than float32), the copy is asynchronous from pinned memory, and the horizontal flip
(one ``where`` over the batch) and normalisation (one fused multiply-add) run on the device.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import (DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, SequentialSampler,
                              Subset, default_collate)

from ..errors import BlockKDError
from ..utils import data_home
from ..schema import BOOL, STRING, integer, option, optional
from .common import (AUGMENT, SHUFFLE, STRONG, DataBundle, Normalize, check_not_empty, eval_shard, generator,
                     mix_seed, per_rank_batch, per_rank_eval_batch, split_indices)
from .strong import rand_augment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
LOG = logging.getLogger("blockkd.engine.data")  # under the run's logger: warnings reach train.log and the console


@dataclasses.dataclass(frozen=True)
class FolderOptions:
    root: str | None = option(None, optional(STRING), "folder holding train/ and val/ (null: $BLOCKKD_DATA/imagenet)")
    image_size: int = option(224, integer(8), "side of the training crop and of the evaluation center crop")
    num_workers: int = option(4, integer(0), "DataLoader worker processes per rank")
    skip_unreadable: bool = option(False, BOOL, "skip image files that cannot be read (truncated, corrupt) with a "
                                   "warning each, instead of stopping the run")


class UnreadableImage(BlockKDError):
    """An image file PIL cannot decode; it names the file (``path``) and how to get past it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path} ({reason}): remove or replace it, or set "
                         f"data.skip_unreadable=true to skip unreadable images")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # pickled back from a DataLoader worker
        return type(self), (self.path, self.reason)


def read_rgb(path: str) -> torch.Tensor:
    """An image file as a (3, H, W) uint8 tensor (PIL decodes; the transforms then work on tensors)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as image:
            return pil_to_tensor(image.convert("RGB"))
    except Exception as e:  # PIL reports damage in many types: OSError, SyntaxError, zlib.error, struct.error ...
        reason = f"{type(e).__name__}: {e}".replace(f" {str(path)!r}", "")  # the path is named once, up front
        raise UnreadableImage(path, " ".join(reason.split())) from None


def transforms(image_size: int, train: bool):
    """Train: RandomResizedCrop (the flip follows on the device); eval: resize to size*256/224 then center
    crop. uint8 tensors in and out. (torchvision is imported here, on first use: checking a recipe needs none.)"""
    from torchvision.transforms import v2

    if train:
        return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True)])
    return v2.Compose([v2.Resize(round(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)])


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image of the batch ``x`` (B, C, H, W) with probability 1/2, drawn on ``gen``'s device."""
    flip = torch.randint(0, 2, (x.shape[0], 1, 1, 1), generator=gen, device=gen.device).bool()
    return torch.where(flip, x.flip(-1), x)


class EpochSampler(Sampler):
    """Yields ``(epoch, index)`` for each index of ``inner``: the sample's augmentation is then drawn from
    (seed, epoch, index) in whichever worker reads it, so an epoch replays exactly on resume whatever the
    number of (persistent) workers and whatever they did before."""

    def __init__(self, inner: Sampler):
        self.inner, self.epoch = inner, 0

    def __iter__(self):
        return ((self.epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class SeededSamples(Dataset):
    """``dataset[i]`` with torch's RNG seeded from (seed, epoch, i) around it (restored after): random
    transforms (RandomResizedCrop) become a function of the sample and the epoch."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, i, AUGMENT))
            return (*self.dataset[i], i)


class Guarded(Dataset):
    """``dataset[key]``, or the :class:`UnreadableImage` it raised, returned as the sample: raised in a
    DataLoader worker, it would reach the main process as a dump of the worker's traceback; returned, the
    main process raises it as itself (one line naming the file) or skips the sample (``skip_unreadable``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except UnreadableImage as e:
            return e


def collate(samples: list) -> tuple[list | None, list[UnreadableImage]]:
    """``(the readable samples collated, or None if none is; the UnreadableImage of the others)``."""
    bad = [s for s in samples if isinstance(s, UnreadableImage)]
    good = [s for s in samples if not isinstance(s, UnreadableImage)]
    return (default_collate(good) if good else None), bad


class DeviceBatches:
    """A DataLoader of uint8 (or already normalised) CPU batches, delivered normalised on ``device``.

    ``flip``: random horizontal flips on the device, drawn from (seed, epoch, rank) so an epoch replays
    exactly on resume. ``with_index`` (training loaders): batches are ``(x, y, index)``, each sample's
    index in the training split (methods with a memory bank, CRD). ``strong_view`` (training loaders): each
    batch ends with a second view of the same images, flipped apart then RandAugment + Cutout on the device
    (:mod:`blockkd.data.strong`; it shares the first view's random-resized crop), from a stream of its own.
    """

    def __init__(self, loader: DataLoader, device: torch.device, normalize: Normalize | None, seed: int = 0, *,
                 flip: bool = False, rank: int = 0, skip_unreadable: bool = False, skipped: set | None = None):
        self.loader, self.device, self.normalize, self.seed = loader, device, normalize, seed
        self.flip, self.rank, self.with_index, self.strong_view = flip, rank, False, False
        # the files skipped so far, each once (``skipped``: a set shared with the other loaders of the data)
        self.skip_unreadable, self.skipped = skip_unreadable, set() if skipped is None else skipped
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the samplers: the shuffle and every sample's augmentation follow (seed, epoch)."""
        self.epoch = epoch
        sampler = self.loader.sampler
        if isinstance(sampler, EpochSampler):
            sampler.epoch = epoch
            sampler = sampler.inner
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
            sampler.generator.manual_seed(mix_seed(self.seed, epoch, SHUFFLE))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = generator(self.seed, self.epoch, self.rank, AUGMENT, device=self.device) if self.flip else None
        sgen = generator(self.seed, self.epoch, self.rank, STRONG, device=self.device) if self.strong_view else None
        for batch in self.loader:
            batch = self.readable(*batch)  # (readable samples collated, unreadable ones): see Guarded
            if batch is None:
                continue
            x, y, *index = batch  # training batches carry each sample's index (SeededSamples)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            rest: tuple = (index[0].to(self.device, non_blocking=True),) if self.with_index and index else ()
            if sgen is not None:
                rest += (self.normalize(rand_augment(random_flip(x, sgen), sgen)),)
            if gen is not None:
                x = random_flip(x, gen)
            x = self.normalize(x) if self.normalize else x
            yield (x, y, *rest)

    def readable(self, batch: list | None, bad: list[UnreadableImage]) -> list | None:
        """The batch of the readable samples; an unreadable one stops the run (one line naming the file)
        unless ``skip_unreadable``, then a warning names it once with the count so far."""
        for e in bad:
            if not self.skip_unreadable:
                raise e
            if e.path not in self.skipped:
                self.skipped.add(e.path)
                LOG.warning(f"skipping unreadable image {e.path} ({e.reason}); {len(self.skipped)} skipped so far")
        if batch is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            raise BlockKDError(f"every image of a batch is unreadable (e.g. {bad[0].path}); under DDP the ranks "
                               f"must run the same batches: remove the unreadable files")
        return batch


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, num_workers: int, device: torch.device,
                drop_last: bool, seed: int, rank: int, world_size: int, normalize: Normalize | None,
                flip: bool = False, skip_unreadable: bool = False, skipped: set | None = None) -> DeviceBatches:
    """A DataLoader over ``dataset`` delivering on ``device``; training order and augmentation follow
    (seed, epoch) exactly (see ``EpochSampler``)."""
    if train and world_size > 1:
        inner: Sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                            drop_last=drop_last)
    elif train:
        inner = RandomSampler(dataset, generator=generator(seed, 0, SHUFFLE))
    else:
        inner = SequentialSampler(dataset)
    if train:
        dataset, sampler = SeededSamples(dataset, seed), EpochSampler(inner)
    else:
        sampler = inner
    loader = DataLoader(Guarded(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=train and drop_last, collate_fn=collate,
                        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None)
    return DeviceBatches(loader, device, normalize, seed, flip=flip, rank=rank, skip_unreadable=skip_unreadable,
                         skipped=skipped)


def _image_folder(path: Path, image_size: int, train: bool):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise BlockKDError(f"image folder not found: {path} (expected <root>/train/<class>/*.jpg and "
                           f"<root>/val/<class>/*.jpg; set data.root)")
    try:
        return ImageFolder(str(path), transform=transforms(image_size, train), loader=read_rgb)
    except (FileNotFoundError, OSError) as e:
        raise BlockKDError(f"cannot read image folder {path}: {e}") from None


def build(cfg: dict, *, device: torch.device, rank: int, world_size: int, seed: int) -> DataBundle:
    """Train/val loaders over ``cfg['root']/train`` and ``/val`` (or a held-out part of train)."""
    root = Path(cfg.get("root") or data_home() / "imagenet").expanduser()
    size = int(cfg["image_size"])
    train_set = _image_folder(root / "train", size, train=cfg["augment"])
    train_idx, val_idx = split_indices(len(train_set), cfg["val_split"], cfg["train_subset"])
    if val_idx is not None:  # the same files, read with the evaluation transforms
        test_set = copy.copy(train_set)
        test_set.transform = transforms(size, train=False)
        test_set = Subset(test_set, val_idx.tolist())
    else:
        test_set = _image_folder(root / "val", size, train=False)
        if test_set.classes != train_set.classes:
            raise BlockKDError(f"{root / 'val'} and {root / 'train'} have different class folders")
    classes = train_set.classes
    if train_idx is not None:
        train_set = Subset(train_set, train_idx.tolist())
    test_size = len(test_set)
    test_set = Subset(test_set, eval_shard(test_size, rank, world_size).tolist())
    norm = Normalize(MEAN, STD, device)
    common = dict(num_workers=int(cfg["num_workers"]), device=device, seed=seed, rank=rank,
                  world_size=world_size, normalize=norm, drop_last=cfg["drop_last"],
                  skip_unreadable=cfg["skip_unreadable"], skipped=set())
    train = make_loader(train_set, batch_size=per_rank_batch(cfg["batch_size"], world_size), train=True,
                        flip=cfg["augment"], **common)
    check_not_empty(train, "the image-folder training set", len(train_set), cfg["batch_size"])
    test = make_loader(test_set, batch_size=per_rank_eval_batch(cfg["eval_batch_size"], world_size),
                       train=False, **common)
    return DataBundle(train=train, test=test, num_classes=len(classes), input_shape=(3, size, size),
                      name=cfg["name"], train_size=len(train_set), test_size=test_size, mean=MEAN, std=STD,
                      classes=list(classes))
