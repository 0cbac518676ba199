"""Encoded texts and the length-bucketing loader that batches them (see ``blockkd.data.text``'s docstring).

Why a module of its own: the batching rules (one flat array of token ids, dynamic padding, length buckets
drawn from (seed, epoch), DDP shards) are the part that must replay exactly on resume; they do not depend on
where the texts came from or which tokenizer made the ids.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .common import SHUFFLE, eval_shard, generator
from .text_readers import Split


class Encoded:
    """Tokenised texts as one flat array of ids (and token types) with per-text offsets, plus labels."""

    def __init__(self, tokenizer, split: Split, max_length: int, types: bool):
        enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=types)
        ids = enc["input_ids"]
        self.lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(self.lengths.sum()))
        self.types = None
        if types:
            self.types = np.fromiter((t for x in enc["token_type_ids"] for t in x), dtype=np.int64,
                                     count=len(self.ids))
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """The texts ``idx`` padded to the longest of them: input_ids, attention_mask (and token_type_ids)."""
        lengths = self.lengths[idx]
        longest = int(lengths.max()) if len(idx) else 0
        pos = np.arange(longest)
        mask = pos[None, :] < lengths[:, None]
        src = np.where(mask, self.offsets[idx][:, None] + pos[None, :], 0)
        out = {"input_ids": torch.from_numpy(np.where(mask, self.ids[src] if len(self.ids) else 0, pad_id)),
               "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.types is not None:
            out["token_type_ids"] = torch.from_numpy(np.where(mask, self.types[src], 0))
        return out


class TextLoader:
    """Batches ``(model input, labels)`` on ``device`` from :class:`Encoded` texts (see the module docstring).

    Training: the global batches of the bucketed order (from (seed, epoch)), rank r taking its r-th slice of
    each; a last partial batch is kept (``drop_last=False``) only if every rank gets a sample of it.
    Evaluation: rank r's contiguous shard, sorted by length, nothing dropped. ``with_index``: training batches
    are ``(x, y, index)`` (methods with per-sample state, CRD).
    """

    def __init__(self, data: Encoded, *, batch_size: int, train: bool, device: torch.device, pad_id: int,
                 bucket: int = 0, drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.train, self.device, self.pad_id = data, batch_size, train, device, pad_id
        self.bucket, self.drop_last, self.seed, self.rank, self.world_size = bucket, drop_last, seed, rank, world_size
        self.epoch, self.with_index = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _counts(self) -> tuple[int, int]:
        """(full global batches, samples in a kept last partial batch: 0 if dropped)."""
        full, rest = divmod(len(self.data), self.batch_size * self.world_size)
        return full, 0 if self.drop_last or rest < self.world_size else rest

    def __len__(self) -> int:
        if not self.train:
            return -(-len(eval_shard(len(self.data), self.rank, self.world_size)) // self.batch_size)
        full, rest = self._counts()
        return full + int(rest > 0)

    def plan(self) -> list[np.ndarray]:
        """This rank's batches of the epoch, as sample indices."""
        lengths = self.data.lengths
        if not self.train:
            idx = eval_shard(len(self.data), self.rank, self.world_size).numpy()
            idx = idx[np.argsort(lengths[idx], kind="stable")]
            return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        step = self.batch_size * self.world_size
        full, rest = self._counts()
        order = torch.randperm(len(self.data), generator=generator(self.seed, self.epoch, SHUFFLE)).numpy()
        kept, tail = order[:full * step], order[full * step:full * step + rest]  # the samples dropped: random ones
        if self.bucket:  # sort runs of `bucket` global batches by length, then shuffle the batches
            run = step * self.bucket
            kept = np.concatenate([part[np.argsort(lengths[part], kind="stable")]
                                   for part in np.split(kept, range(run, len(kept), run))] or [kept])
        batches = [kept[i * step:(i + 1) * step] for i in range(full)]
        if self.bucket:
            shuffle = torch.randperm(full, generator=generator(self.seed, self.epoch, SHUFFLE, 1)).tolist()
            batches = [batches[i] for i in shuffle]
            tail = tail[np.argsort(lengths[tail], kind="stable")]
        if rest:
            batches.append(tail)
        return [np.array_split(b, self.world_size)[self.rank] for b in batches]

    def __iter__(self) -> Iterator[tuple]:
        labels = self.data.labels
        for idx in self.plan():
            x = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(idx, self.pad_id).items()}
            i = torch.from_numpy(idx)
            y = labels[i].to(self.device, non_blocking=True)
            yield (x, y, i.to(self.device)) if self.train and self.with_index else (x, y)
