"""Datasets for blockkd: ``build(cfg, device=...) -> DataBundle``.

Small datasets (Fashion-MNIST, CIFAR-10/100, synthetic, user-registered) are held whole on the
training device as uint8 and augmented there in batches (``device_loader``); image folders go through
a DataLoader with workers (``folder``). Both yield ``(x, y)`` already on the device, x normalised
float32 NCHW, y int64, and reshuffle deterministically per epoch via ``.set_epoch(e)``. Text (``text``:
``textfile``, ``glue``, ``fortunes``) is tokenised once and batched with dynamic padding and length buckets;
its x is a mapping of tensors (input_ids, attention_mask ...).

Batch sizes: ``batch_size`` is the GLOBAL batch size; each of ``world_size`` ranks gets
``batch_size // world_size`` (it must divide). Training shards are disjoint slices of one permutation
shared by all ranks; test shards are contiguous, not dropped, and cover the test set exactly once.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping

import torch

from .. import schema
from ..errors import BlockKDError
from ..registry import Registry
from ..schema import BOOL, STRING, integer, option, optional
from ..utils import shown
from . import cifar, fashion_mnist, folder, lm, synthetic, text
from .common import DataBundle, Loader
from .device_loader import ArrayData, DeviceLoader, build_in_memory, crop_flip, sample_crop_flip

__all__ = ["DataSection", "DataBundle", "ArrayData", "DeviceLoader", "Loader", "Dataset", "DATASETS", "build",
           "names", "register", "parse", "arrays", "crop_flip", "sample_crop_flip"]


@dataclasses.dataclass(frozen=True)
class DataSection:
    """The recipe's ``data`` section: the keys every dataset has; ``options`` holds the dataset's own
    (``root``, ``image_size`` ...), written flat beside these in YAML."""

    name: str = option("cifar100", STRING, "dataset: a name of blockkd.data.names()")
    batch_size: int = option(64, integer(1), "global training batch (split over ranks)")
    eval_batch_size: int = option(256, integer(1), "global evaluation batch (split over ranks)")
    augment: bool = option(True, BOOL, "training augmentation (random crop + flip)")
    train_subset: int | None = option(None, optional(integer(1)), "train on the first k images of a fixed "
                                      "permutation")
    val_split: int = option(0, integer(0), "> 0: hold out that many training images as the test split (tuning)")
    drop_last: bool = option(True, BOOL, "drop the last incomplete training batch")
    options: Any = None

    def flat(self) -> dict[str, Any]:
        """The whole section as one mapping (what the loaders read and YAML stores)."""
        return schema.named_to_dict(self)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset choice: its own keys (``options``) and ``build(flat_cfg, *, device, rank, world_size, seed)``."""

    options: type
    build: Callable[..., DataBundle]
    help: str
    arrays: Callable[[dict], ArrayData] | None = None  # in-memory datasets: flat cfg -> the whole uint8 arrays


PATH_KEYS = ("root", "train", "test", "tokenizer")  # the keys of datasets that name files or folders
ROOT = option(None, optional(STRING), "folder of the dataset files (null: its default location)")


@dataclasses.dataclass(frozen=True)
class DownloadableOptions:
    root: str | None = ROOT
    download: bool = option(False, BOOL, "download the dataset into root when it is missing")


@dataclasses.dataclass(frozen=True)
class RootOptions:
    root: str | None = ROOT


DATASETS: Registry[Dataset] = Registry("dataset")
def _in_memory(options: type, load: Callable[[dict], ArrayData], help: str) -> Dataset:
    return Dataset(options, build_in_memory(load), help, load)


DATASETS.register("fashion_mnist", _in_memory(DownloadableOptions, fashion_mnist.load,
                                              "Fashion-MNIST, 28x28 grey (Debian's dataset-fashion-mnist or download)"))
DATASETS.register("cifar10", _in_memory(DownloadableOptions, functools.partial(cifar.load, num_classes=10),
                                        "CIFAR-10 (torchvision's cifar-10-batches-py folder)"))
DATASETS.register("cifar100", _in_memory(DownloadableOptions, functools.partial(cifar.load, num_classes=100),
                                         "CIFAR-100 (torchvision's cifar-100-python folder)"))
DATASETS.register("imagefolder", Dataset(folder.FolderOptions, folder.build,
                                         "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (ImageNet layout)"))
DATASETS.register("synthetic", _in_memory(synthetic.SyntheticOptions, synthetic.load,
                                          "class templates plus noise, generated from their shape (tests)"))
DATASETS.register("textfile", Dataset(text.TextFileOptions, text.build_textfile,
                                      "your text classification data: CSV/TSV/JSONL train and test files"))
DATASETS.register("glue", Dataset(text.GlueOptions, text.build_glue,
                                  "a GLUE task through the datasets library (validation split as test)"))
DATASETS.register("fortunes", Dataset(text.FortunesOptions, text.build_fortunes,
                                      "offline topic classification: Debian's fortune files, one class per file"))
DATASETS.register("lm_text", Dataset(lm.LMTextOptions, lm.build, "causal LM: plain text (.txt/.jsonl) packed into "
                                                                 "fixed-length sequences"))
DATASETS.register("lm_jsonl", Dataset(lm.LMJsonlOptions, lm.build, "causal LM: JSONL prompt/response pairs, the loss "
                                                                   "on the response"))
DATASETS.register("lm_hf", Dataset(lm.LMHubOptions, lm.build, "causal LM: a datasets library dataset by name "
                                                              "(text, or prompt/response columns)"))
DATASETS.register("lm_fortunes", Dataset(lm.LMFortunesOptions, lm.build, "causal LM, offline: Debian's fortune "
                                                                         "files packed into sequences"))


def register(name: str, options: type = RootOptions, help: str = ""):
    """Decorator: register ``fn(cfg) -> ArrayData`` as an in-memory dataset called ``name``; ``cfg`` is the
    flat data section (``options``: the dataclass of its own keys, default just ``root``)."""

    def deco(load: Callable[[dict], ArrayData]) -> Callable[[dict], ArrayData]:
        DATASETS.register(name, _in_memory(options, load, help or (load.__doc__ or "").strip()))
        return load

    return deco


def names() -> list[str]:
    """Every dataset name that ``build`` accepts."""
    return DATASETS.names()


def parse(values: Mapping[str, Any] | DataSection, where: Callable[[str], str] = lambda key: "the data config",
          *, drop_foreign: bool = False) -> DataSection:
    """A validated :class:`DataSection` from a flat mapping (closest-key and closest-name errors);
    ``drop_foreign``: ignore keys of other datasets (configs saved by older versions)."""
    if isinstance(values, DataSection):
        return values
    return schema.parse_named(DataSection, DATASETS, values, prefix="data.", where=where, kind="dataset",
                              drop_foreign=drop_foreign)


def arrays(cfg: Mapping[str, Any] | DataSection) -> ArrayData:
    """The whole uint8 arrays of an in-memory dataset (before ``train_subset``/``val_split``)."""
    section = parse(cfg)
    load = DATASETS.get(section.name).arrays
    if load is None:
        raise BlockKDError(f"dataset {section.name!r} is not held in memory")
    return load(section.flat())


TRAINED_TOKENIZERS = (*text.TRAINED, lm.BYTEBPE)  # data.tokenizer values trained here on the training text


def build(cfg: Mapping[str, Any] | DataSection, *, device: torch.device | str, rank: int = 0, world_size: int = 1,
          seed: int = 0, tokenizer_file: str | os.PathLike | None = None) -> DataBundle:
    """Train and test loaders for the data section ``cfg`` on ``device``, for rank ``rank``.

    ``tokenizer_file``: the ``tokenizer.json`` a checkpoint saved (``engine.checkpoint.saved_tokenizer``), used
    instead of training the tokenizer ``cfg`` names (``wordpiece``, ``bpe``, ``bytebpe``) again: trained again,
    on another machine, it need not give the ids the checkpoint's weights learned."""
    section = parse(cfg)
    if not 0 <= rank < world_size:
        raise BlockKDError(f"rank {rank} is outside world_size {world_size}")
    flat = section.flat()
    if tokenizer_file is not None and flat.get("tokenizer") in TRAINED_TOKENIZERS:
        flat["tokenizer"] = os.fspath(tokenizer_file)
    for key in PATH_KEYS:  # stored absolute (config.paths); read and named as typed when below the working dir
        if isinstance(flat.get(key), str) and os.path.isabs(flat[key]):
            flat[key] = shown(flat[key])
    return DATASETS.get(section.name).build(flat, device=torch.device(device), rank=rank,
                                            world_size=world_size, seed=seed)
