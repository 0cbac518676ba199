"""Tian et al., "Contrastive Representation Distillation", ICLR 2020 (CRD).

The student's and the teacher's penultimate features (the globally pooled output of their last block)
are embedded (Linear, then L2 normalisation) into ``feat_dim`` dimensions. Two memory banks hold one
embedding per training sample: ``memory_s`` (the student's) and ``memory_t`` (the teacher's). For sample i
with K negatives j_1..j_K drawn from the bank, each side is scored against the *other* side's bank:

    P(i, j) = exp(<v, memory[j]> / nce_t) / Z          Z: set once, from the first batch, to mean(exp(.)) · N
    L_NCE   = −E_i[ log h(P_pos) + Σ_k log(1 − h(P_neg_k)) ],   h(P) = P / (P + K/N)
    L       = ce_weight · CE + weight · (L_NCE(student vs memory_t) + L_NCE(teacher vs memory_s))

then the banks move towards the batch's embeddings: memory[i] ← normalise(momentum · memory[i] +
(1 − momentum) · v_i). Negatives are samples of other classes, drawn uniformly without replacement
(RepDistiller's ``cls_negative``); the classes come from the bank's record of each sample's label, made as
samples are seen (so during the first epoch a not-yet-seen sample of the same class can be drawn; the
sample itself never is). The positive is the sample itself ("exact", RepDistiller's default) or a random
sample of its class ("relax"). Each sample's dataset ``index`` is needed (``needs_index``); the bank size
``num_data`` must cover every index (CIFAR-100: 50000, ImageNet: 1281167).

Distributed training (DDP): each rank all-gathers the batch's embeddings, indices and labels (detached;
uneven last batches are padded then trimmed) and updates its banks and label records with all of them, so
every rank holds the same banks (they start equal: same seed, and DDP broadcasts rank 0's buffers at
construction). Each rank draws its own samples' negatives from that common bank with a generator seeded
with (seed, step, rank): the step counter is the same on all ranks, so the draws are reproducible and
independent across ranks. Z is averaged over ranks.
The banks, the label records, Z and the step are registered buffers: they are saved in checkpoints and a
resumed run draws the same negatives as an uninterrupted one.
Defaults: RepDistiller (feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, mode exact, -r 1 -a 0 -b 0.8),
the same as mdistiller's CFG.CRD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..blocks import split
from ..errors import BlockKDError
from ..schema import OptionError, choice, integer, number, option
from .registry import register
from .base import Distiller
from .kd import WEIGHT
from .losses import cross_entropy


def nce_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss: ``scores`` (B, 1 + K) are P(positive), P(negatives) under the model; noise P_n = 1/N."""
    k = scores.shape[1] - 1
    noise = k / float(num_data)
    pos, neg = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


class Embed(nn.Module):
    """Linear to ``dim`` then L2 normalisation (CRD's embedding head)."""

    def __init__(self, c_in: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(c_in, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` from every rank, concatenated along dim 0 (uneven sizes allowed), and this rank's offset in it."""
    if not _distributed():
        return t, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), sum(sizes[:rank])


class ContrastMemory(nn.Module):
    """The two banks (N, dim), each sample's recorded label, Z and the step counter; scores and updates."""

    def __init__(self, dim: int, num_data: int, k: int, temperature: float, momentum: float, seed: int):
        super().__init__()
        self.num_data, self.k, self.t, self.momentum, self.seed = num_data, k, temperature, momentum, seed
        std = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, dim).mul_(2 * std).sub_(std))
        self.register_buffer("memory_t", torch.rand(num_data, dim).mul_(2 * std).sub_(std))
        self.register_buffer("labels", torch.full((num_data,), -1, dtype=torch.long))
        self.register_buffer("z", torch.full((2,), -1.0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def draw(self, index: torch.Tensor, y: torch.Tensor, exact: bool, rank: int = 0) -> torch.Tensor:
        """(B, 1 + K) bank rows: a positive, then K negatives drawn uniformly among the samples whose
        recorded label differs from the sample's (unseen samples count as other classes; never the sample
        itself), without replacement as RepDistiller's ``np.random.choice(cls_negative, K, replace=False)``,
        with replacement where fewer than K such samples exist (as RepDistiller too).

        The positive is the sample itself (``exact``) or a uniformly drawn sample recorded with its class
        (``relax``; itself while none is recorded). The generator is seeded with (seed, step, rank).
        """
        device = index.device
        gen = torch.Generator(device=device)
        gen.manual_seed((self.seed * 1_000_003 + int(self.step)) * 4099 + rank)
        order = torch.argsort(self.labels, stable=True)  # rows sorted by recorded label: a class is an interval
        ranked = self.labels[order]
        lo = torch.searchsorted(ranked, y, right=False)
        count = torch.searchsorted(ranked, y, right=True) - lo
        unseen_self = (self.labels[index] != y).long()  # the sample itself is not yet in its class's interval
        others = self.num_data - count - unseen_self
        b = index.shape[0]
        if int(others.min()) >= self.k:
            negs = []
            rows_per_chunk = max(1, (1 << 26) // self.num_data)  # at most 64M random keys at once
            for a in range(0, b, rows_per_chunk):
                keys = torch.rand((min(rows_per_chunk, b - a), self.num_data), generator=gen, device=device)
                keys.masked_fill_(self.labels[None, :] == y[a:a + rows_per_chunk, None], -1.0)
                keys.scatter_(1, index[a:a + rows_per_chunk, None], -1.0)
                negs.append(keys.topk(self.k, dim=1).indices)
            neg = torch.cat(negs)
        else:  # fewer other-class samples than K: uniform with replacement over the other-class interval(s)
            u = torch.rand((b, self.k), generator=gen, device=device, dtype=torch.float64)
            free = (self.num_data - count)[:, None]
            r = (u * free.double()).long().clamp_max(free - 1)
            neg = order[torch.where(r >= lo[:, None], r + count[:, None], r)]
        pos = index
        if not exact:
            u = torch.rand((b,), generator=gen, device=device, dtype=torch.float64)
            pick = lo + (u * count.double()).long().clamp_max((count - 1).clamp_min(0))
            pos = torch.where(count > 0, order[pick.clamp_max(self.num_data - 1)], index)
        return torch.cat([pos[:, None], neg], 1)

    def scores(self, v: torch.Tensor, bank: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """exp(<v_b, bank[rows[b, j]]> / T), shape (B, 1 + K), in float32 whatever the autocast dtype."""
        w = bank[rows.reshape(-1)].view(*rows.shape, -1).detach()
        with torch.autocast(v.device.type, enabled=False):
            return torch.exp(torch.bmm(w.float(), v.float().unsqueeze(2)).squeeze(2) / self.t)

    @torch.no_grad()
    def update(self, bank: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        mixed = bank[index] * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum)
        bank.index_copy_(0, index, F.normalize(mixed, dim=1))

    def forward(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor, y: torch.Tensor, exact: bool):
        """(scores of the student's embeddings vs the teacher bank, teacher's vs the student bank); then updates."""
        rank = dist.get_rank() if _distributed() else 0
        rows = self.draw(index, y, exact, rank)
        all_index, _ = all_gather(index)
        all_y, _ = all_gather(y)
        out_s = self.scores(v_s, self.memory_t, rows)
        out_t = self.scores(v_t, self.memory_s, rows)
        with torch.no_grad():
            if bool((self.z < 0).any()):  # first step: Z = mean score · N, averaged over ranks
                z = torch.stack([out_s.mean(), out_t.mean()]) * self.num_data
                if _distributed():
                    dist.all_reduce(z)
                    z /= dist.get_world_size()
                self.z.copy_(z)
        out_s, out_t = out_s / self.z[0], out_t / self.z[1]
        all_s, _ = all_gather(v_s.detach())
        all_t, _ = all_gather(v_t.detach())
        self.update(self.memory_s, all_index, all_s)
        self.update(self.memory_t, all_index, all_t)
        with torch.no_grad():
            self.labels[all_index] = all_y
            self.step += 1
        return out_s, out_t


@dataclass(frozen=True)
class CRDOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels (RepDistiller -r 1)")
    weight: float = option(0.8, WEIGHT, "weight of the two NCE losses (RepDistiller -b 0.8)")
    feat_dim: int = option(128, integer(1), "embedding dimension")
    nce_k: int = option(16384, integer(1), "negatives per sample")
    nce_t: float = option(0.07, number(0, strict=True), "temperature of the scores")
    nce_m: float = option(0.5, number(0, hi=1), "momentum of the memory-bank update")
    mode: str = option("exact", choice("exact", "relax"), "positive: the sample itself (exact) or a random sample "
                       "of its class (relax)")
    num_data: int = option(50000, integer(2), "training-set size: rows of the memory banks (CIFAR-100: 50000)")
    seed: int = option(0, integer(0), "seed of the negatives' generator (with the step count)")

    def check(self) -> None:
        if self.nce_k >= self.num_data:
            raise OptionError("nce_k", f"nce_k ({self.nce_k}) must be smaller than num_data ({self.num_data})")


@register("crd")
class CRD(Distiller):
    """CRD: NCE between the student's and teacher's embedded penultimate features, negatives from memory banks."""

    Options = CRDOptions
    paper = "Tian et al., Contrastive Representation Distillation, ICLR 2020"
    needs_index = True

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        o = self.opts
        if o.nce_k >= o.num_data:
            raise OptionError("nce_k", f"nce_k ({o.nce_k}) must be smaller than num_data ({o.num_data})")
        s_view = split(student, input_shape=self.input_shape)
        t_view = split(self.teacher, input_shape=self.input_shape)
        self._views = (s_view, t_view)  # plain tuple: the views share the models' modules
        c_s = s_view.probe(self.input_shape)[-1][0]
        c_t = t_view.probe(self.input_shape)[-1][0]
        self.embed_s = Embed(c_s, o.feat_dim)
        self.embed_t = Embed(c_t, o.feat_dim)
        self.contrast = ContrastMemory(o.feat_dim, o.num_data, o.nce_k, o.nce_t, o.nce_m, o.seed)

    def forward(self, x, y=None, *, epoch: float = 0.0, index: torch.Tensor | None = None):
        if not self.training or y is None:
            return self.student_logits(x)
        return self.forward_train(x, y, epoch=epoch, index=index)

    @staticmethod
    def pooled(feat: torch.Tensor) -> torch.Tensor:
        return feat.flatten(2).mean(2) if feat.dim() > 2 else feat

    def forward_train(self, x, y, *, epoch, index=None):
        if index is None:
            raise BlockKDError("method 'crd' needs each sample's dataset index (forward_train(x, y, epoch=..., "
                               "index=...)): use a data loader that yields (x, y, index)")
        o = self.opts
        index = index.to(device=y.device, dtype=torch.long)
        if int(index.max()) >= o.num_data or int(index.min()) < 0:
            raise BlockKDError(f"crd: sample index {int(index.max())} outside the memory bank of num_data="
                               f"{o.num_data} rows; set method.options.num_data to the training-set size")
        s_feats, logits = self._views[0].features(x)
        with torch.no_grad():
            t_feats, _ = self._views[1].features(x)
        v_s = self.embed_s(self.pooled(s_feats[-1]))
        v_t = self.embed_t(self.pooled(t_feats[-1]))
        out_s, out_t = self.contrast(v_s, v_t, index, y, o.mode == "exact")
        nce = nce_loss(out_s, o.num_data) + nce_loss(out_t, o.num_data)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_crd": o.weight * nce,
        }
