"""Block-KD's stone scheduling: which stepping-stones exist, and which rows of a batch each one runs on.

Why apart from the loss: the objective (:mod:`blockkd.methods.blockkd`) is the paper's equation whatever
the schedule; the schedule is a cost decision, measured on its own (docs/blockkd.md, "Lite variant").

- ``num_stones: k`` keeps the k deepest stones, n-k+1..n, with their weights w_i = 1/2^(n-i): a stone's cost
  is its teacher suffix, so the shallow stones are the costly ones.
- ``whole_batch_stones``: null runs every stone on the whole batch (the paper's method). ``k`` runs the k
  deepest on the whole batch and cuts a random permutation of the batch into m near-equal shares (m stones),
  the other stones each running on its own share. A share is a uniformly random subset, so a stone's mean over
  it is unbiased for its whole-batch term (the teacher is in eval mode: a sample's stone logits do not depend
  on the other samples; the connector's BN in train mode normalises with the share's statistics).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class StonePlan:
    """The stones that exist (0-based block indices, ascending), their weights, and the batch rows of each."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    whole: int | None  # how many of the deepest stones run on the whole batch; None: all of them

    @classmethod
    def build(cls, num_blocks: int, num_stones: int | None, whole_batch_stones: int | None) -> "StonePlan":
        n = num_blocks
        ids = tuple(range(n - min(num_stones or n, n), n))
        return cls(ids, tuple(1.0 / 2 ** (n - 1 - i) for i in ids), whole_batch_stones)

    def share_sizes(self, batch_size: int) -> list[int]:
        """Near-equal share sizes, one per stone (the first ``batch_size % m`` stones get one more)."""
        m = len(self.ids)
        return [batch_size // m + (k < batch_size % m) for k in range(m)]

    def batch_sizes(self, batch_size: int) -> list[int]:
        """How many samples each stone runs on per step: what its cost is proportional to (benchmarks/speed.py)."""
        if self.whole is None:
            return [batch_size] * len(self.ids)
        m = len(self.ids)
        return self.share_sizes(batch_size)[:m - self.whole] + [batch_size] * self.whole

    def rows(self, batch_size: int, device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
        """Per stone, the rows of the batch it runs on this step (None: all). Drawn from torch's CPU generator,
        so reproducible under ``torch.manual_seed``."""
        m = len(self.ids)
        if self.whole is None:
            return [None] * m
        return self.rows_of(torch.randperm(batch_size).to(device))

    def rows_of(self, perm: torch.Tensor) -> list[torch.Tensor | None]:
        """The rows for the permutation ``perm`` of the batch: ``perm`` cut into shares, the deepest whole."""
        rows: list[torch.Tensor | None] = list(perm.split(self.share_sizes(len(perm))))
        m = len(self.ids)
        rows[m - (self.whole or 0):] = [None] * (self.whole or 0)
        return rows


def run(t_view, connect: Callable, feats: list[torch.Tensor], which: list[int], inputs=None,
        rows: list[torch.Tensor | None] | None = None, batched: bool = True) -> list[torch.Tensor]:
    """Logits of the stones ``which`` (0-based, ascending): ``connect(i, feat, rows)`` then the teacher's blocks
    i+1..n and head. ``rows[k]``: the batch rows stone ``which[k]`` runs on (None: all).

    ``inputs`` is the model input the features came from: the teacher blocks take the extra inputs they need
    (a transformer's attention mask) from it. Batched mode concatenates, at each teacher block, every stone
    that passes through it: the teacher is in eval mode, so its blocks act per sample and the results are
    unchanged, while one large batch keeps the device busier than several small ones. Shares of a text
    batch run one stone at a time (their masks differ).
    """
    n = len(t_view.blocks)
    rows = rows if rows is not None else [None] * len(which)
    own_rows = dict(zip(which, rows))
    per_stone = isinstance(inputs, Mapping) and any(r is not None for r in rows)
    if not batched or per_stone:
        out = []
        for i, r in zip(which, rows):
            own = {key: v[r] for key, v in inputs.items()} if per_stone and r is not None else inputs
            h = connect(i, feats[i], r)
            for j in range(i + 1, n):
                h = t_view.run_block(j, h, own)
            out.append(t_view.run_head(h, own))
        return out
    h, sizes = None, []
    for i in range(which[0], n):
        if i in own_rows:
            z = connect(i, feats[i], own_rows[i])
            h = z if h is None else torch.cat([h, z])
            sizes.append(z.shape[0])
        if i + 1 < n:
            h = t_view.run_block(i + 1, h, inputs)
    return list(t_view.run_head(h, inputs).split(sizes))


def ensemble(stone_logits: list[torch.Tensor], rows: list[torch.Tensor | None], batch_size: int) -> torch.Tensor:
    """Y^ens per sample: the mean of the stones that saw it (every stone on the whole batch: the mean of all;
    a sample seen by one stone only: that stone's logits). Detached: it is a target."""
    if all(r is None for r in rows):
        return torch.stack(stone_logits).mean(0).detach()
    z0 = stone_logits[0]
    total = z0.new_zeros(batch_size, z0.shape[1])
    seen = z0.new_zeros(batch_size, 1)
    for r, z in zip(rows, stone_logits):
        r = torch.arange(batch_size, device=z.device) if r is None else r
        total = total.index_add(0, r, z.detach())
        seen = seen.index_add(0, r, torch.ones_like(z[:, :1]))
    return total / seen
