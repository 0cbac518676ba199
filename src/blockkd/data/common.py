"""Pieces shared by every dataset: the bundle handed to the engine, seeds, splits, batch sizes.

Why a separate module: the in-memory path (``device_loader``) and the image-folder path (``folder``)
must agree exactly on how seeds are derived, how held-out splits are drawn and what a batch size means
under DDP; keeping those rules in one place is what makes the two paths interchangeable.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from ..errors import BlockKDError

# Independent random streams derived from one user seed (see ``mix_seed``).
SHUFFLE, AUGMENT, SPLIT, SYNTHETIC, STRONG = range(5)


class Loader(Protocol):
    """What the engine iterates: ``(x, y)`` on the device, ``len()`` batches, per-epoch reshuffle."""

    def __iter__(self): ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


@dataclasses.dataclass
class DataBundle:
    """Train/test loaders plus what models need to know about the data.

    Text data (``blockkd.data.text``): ``input_shape`` is a text input spec (``blocks.text_input``), so
    ``in_channels`` is None; ``check_model(model, role=, name=)`` refuses a model the data cannot feed (a
    tokenizer larger than its embeddings); ``metrics(predictions, labels) -> {name: value}`` computes the
    task's extra metrics (``metric_names``: F1, Matthews correlation ...) from all test predictions, which
    evaluation then gathers; ``tokenizer`` is saved beside Hugging Face models (``hf/``).
    """

    train: Loader
    test: Loader
    num_classes: int
    input_shape: Any  # images: (C, H, W); text: {"input_ids": (L,), "attention_mask": (L,), ...}
    name: str
    train_size: int  # samples in the training split (all ranks together)
    test_size: int  # samples in the test (or held-out validation) split, all ranks together
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: list[str] | None = None
    metric_names: tuple[str, ...] = ()
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None
    check_model: Callable[..., None] | None = None
    tokenizer: Any = None
    task: str = "classification"  # or "causal_lm": next-token data (blockkd.data.lm), labels (B, L)

    @property
    def in_channels(self) -> int | None:
        """Input channels of image data; None for text (a mapping input spec)."""
        shape = self.input_shape
        return None if isinstance(shape, dict) else int(shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the training loader for ``epoch`` (the test loader is sequential)."""
        self.train.set_epoch(epoch)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers such as (seed, epoch, rank, stream).

    Why not ``seed + epoch``: nearby tuples would then share streams ((0, 1) == (1, 0));
    SeedSequence hashes the whole tuple, so every (seed, epoch, rank, stream) gets its own stream.
    """
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded from ``mix_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(mix_seed(*parts))


def split_indices(n: int, val_split: int, train_subset: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(train indices, held-out indices) for a training set of ``n`` samples; None means "all" / "none".

    One fixed permutation (independent of the training seed, so runs with different seeds are compared
    on the same images): the first ``val_split`` samples are held out, the next ``train_subset`` train.
    """
    val_split = int(val_split or 0)
    if val_split < 0 or val_split >= n:
        raise BlockKDError(f"data.val_split={val_split} must be in [0, {n}) for a training set of {n} images")
    if train_subset is not None and not 0 < train_subset <= n - val_split:
        raise BlockKDError(f"data.train_subset={train_subset} must be in [1, {n - val_split}] "
                           f"({n} training images, {val_split} held out)")
    if not val_split and train_subset is None:
        return None, None
    perm = torch.randperm(n, generator=generator(0, SPLIT))
    rest = perm[val_split:]
    train = rest if train_subset is None else rest[:train_subset]
    return train, (perm[:val_split] if val_split else None)


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Per-rank training batch: ``batch_size`` is GLOBAL (what one optimizer step sees over all ranks)."""
    if batch_size < 1 or batch_size % world_size:
        raise BlockKDError(f"data.batch_size={batch_size} is the global batch size and must be a positive "
                           f"multiple of world_size={world_size}")
    return batch_size // world_size


def per_rank_eval_batch(eval_batch_size: int, world_size: int) -> int:
    """Per-rank evaluation batch (global size split evenly, rounded up: eval has no optimizer step)."""
    if eval_batch_size < 1:
        raise BlockKDError(f"data.eval_batch_size={eval_batch_size} must be positive")
    return math.ceil(eval_batch_size / world_size)


def eval_shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of ``range(n)``; the slices of all ranks cover it exactly once."""
    return torch.arange(n).tensor_split(world_size)[rank]


class Normalize:
    """uint8 images -> float32 ``(x / 255 - mean) / std`` as a single fused multiply-add on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str):
        mean_t = torch.tensor(mean, dtype=torch.float64)
        std_t = torch.tensor(std, dtype=torch.float64)
        shape = (1, len(mean), 1, 1)
        self.scale = (1.0 / (255.0 * std_t)).float().view(shape).to(device)
        self.bias = (-mean_t / std_t).float().view(shape).to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x.float(), self.scale)


def check_not_empty(loader: Iterable, what: str, size: int, batch_size: int) -> None:
    """A zero-batch training loader would make an epoch silently do nothing; say so instead."""
    if len(loader) == 0:  # type: ignore[arg-type]
        raise BlockKDError(f"{what} has {size} images, fewer than one batch of {batch_size} "
                           f"(lower data.batch_size or set data.drop_last=false)")
