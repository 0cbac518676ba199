"""Block-wise Logit Distillation (Yu et al., "Decoupling Dark Knowledge via Block-wise Logit
Distillation for Feature-level Alignment", IEEE TAI 2024, arXiv 2411.01547).

Stepping-stone i (1-based, i = 1..n) runs the student's blocks 1..i, a trained connector C_i, then the
frozen teacher's blocks i+1..n and head:

    N_i = T_head ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1

Feature alignment is thus measured through logits. Objective (see docs/blockkd.md for the choices):

    L_task    = CE(Y^S, y)        + Σ_i w_i CE(Y^{N_i}, y)          w_i = 1 / 2^(n-i)
    L_distill = d(Y^S, Y^T)       + Σ_i w_i d(Y^{N_i}, Y^T)
    L_cross   = d(Y^S, Y^ens)     + Σ_i d(Y^{N_i}, Y^ens)           Y^ens = mean_i Y^{N_i}
    L         = α·L_task + β·L_distill + γ·L_cross

d is the paper's T²·KL(target ‖ student) by default (``divergence: kl``); ``divergence: dkd`` makes every
term (student's and stones' distill terms, every L_cross term) DKD's dkd_alpha·TCKD + dkd_beta·NCKD, and
``logit_standardization`` z-scores both sides of every term first (:mod:`blockkd.methods.divergences`).
``student_divergence`` overrides d in the student's own distill term d(Y^S, Y^T) only: DKD's gain over KD is
in that term, and ``student_divergence: dkd`` keeps KL in the stones' terms and in L_cross.
DKD needs a target class per sample: the distill terms use the label y, as DKD does; the L_cross terms use
the label y too (not the ensemble's argmax), so that every term splits "target vs. the rest" at the same
class, whatever the stones currently predict, and the loss stays a smooth function of the logits.

The frozen teacher blocks carry gradients to the connectors and the student but never compute
weight gradients of their own (their parameters have ``requires_grad=False``).

Which stones exist (``num_stones``): stones 1..n by default, the paper's method; ``num_stones: k`` builds,
trains and evaluates the k deepest only, stones n-k+1..n (all n where n <= k), each with its weight
w_i = 1/2^(n-i). The shallow stones carry nearly the whole teacher (stone 1 costs about twice stone 2 on
three blocks), so leaving them out is the cheapest cut; in what follows, "n stones" then means the k that
exist, and the i of a stone's name stays its block index.

Which stones run each step (``stones_per_step``, ``sampling``):

- ``stones_per_step: null`` with ``sampling`` ``weighted`` or ``uniform``: every stone on the whole batch,
  the full objective above (``sampling`` is then unused).
- ``stones_per_step: k`` with ``weighted`` / ``uniform``: k stones drawn per step, reweighted so that the
  expected task/distill sums are the full ones (:meth:`BlockKD.pick_stones`); the ensemble is the mean of
  the drawn stones and the Σ_i of L_cross is scaled by n/k.
- ``sampling: split`` (``stones_per_step`` must be null): every stone runs every step, each on its own
  random share of the batch (a random permutation cut into n parts, :meth:`BlockKD.split_batch`): near-equal
  parts (``split_shares: equal``), so the stones together cost about one stone on the whole batch, or
  parts ∝ w_i (``split_shares: weights``), so most samples go to the deep stones, whose teacher suffix is
  short, and the stones cost about half as much as with equal parts, or parts ∝ √w_i (``split_shares:
  sqrt_weights``), in between: more samples for the shallow stones than ∝ w_i. The teacher's blocks are in eval mode, so
  a sample's stone logits do not depend on which other samples share its batch (the connector's BN in train
  mode does: it normalises with its share's statistics). Each stone's task and distill term is the mean over
  its share, an unbiased estimate of its full-batch term, with the weight w_i unchanged. L_cross: no stone
  sees the whole batch, so there is no per-sample ensemble of n stones; each sample's "ensemble" is the one
  stone that saw it, Ŷ_j = Y^{N_s(j)}_j, and L_cross = d(Y^S, Ŷ) over the whole batch (the stones' own terms
  d(Y^{N_i}, Ŷ) are identically 0 and omitted). Its expectation is Σ_i (b_i/b)·d(Y^S, Y^{N_i}) for shares of
  b_i of the b samples (1/n each when equal): the student is
  pulled towards each stone on that stone's samples, as with one stone per step, where the ensemble of the
  one drawn stone gives the same cross term. With a batch smaller than n, the stones left without samples
  skip that step. ``whole_batch_stones: k`` runs the k deepest stones on the whole batch instead of their
  share (the other stones keep theirs): they are the cheap ones, and the deepest one, the whole student
  under the teacher's head, is the one that pulls hardest on the student (docs/blockkd.md). A sample is
  then seen by those k stones and its share's stone; Ŷ_j is their mean, and every stone's cross term
  d(Y^{N_i}, Ŷ) is its mean over the samples it saw. ``whole_batch_connectors: k`` runs the connectors of
  the k shallowest stones on the whole batch and passes only their share on to the teacher: the shallowest
  stone's share is a few samples (18 of 128 with ``weights`` on 3 blocks), too few for its connector's BN
  to normalise with steady statistics, while the connector costs little beside the teacher suffix.
- ``stones_every: k`` (with any of the above): the stones run on steps 0, k, 2k, … only, all of them together,
  with their terms and L_cross ×k there (``stones_every_reweight``, so the expected loss is the full one);
  the steps between train the student's CE and distill terms alone, at KD's cost.

Inputs may be images or, for transformers, mappings of tensors (``input_ids``, ``attention_mask``); the
teacher blocks of every stone take the extra inputs they need (the attention mask) from the batch
(:mod:`blockkd.blocks.core`). ``input_shape`` is then a text spec such as ``blockkd.blocks.text_input(128)``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..blocks import match
from ..errors import BlockKDError
from ..schema import registered, BOOL, OptionError, choice, integer, number, option, optional
from . import register
from .base import Distiller
from .connectors import CONNECTORS, build_connectors
from .divergences import (DIVERGENCES, LogitDivergence, divergence_option, dkd_alpha_option, dkd_beta_option,
                          logit_standardization_option)
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy, linear_warmup
from .stone_grad import fork

SAMPLINGS = ("weighted", "uniform", "split")
SPLIT_SHARES = ("equal", "weights", "sqrt_weights")
CONNECTOR_INITS = ("default", "teacher_stats")


@dataclass(frozen=True)
class BlockKDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of every distillation term (T² scaling)")
    # Measured (benchmarks/weight_sweep.py, benchmarks/stability.py): with a confident teacher
    # α = β = γ = 1 trains far worse than KD at SGD lr 0.05; about 1/(1 + Σw) for α and β and a small
    # γ match or beat it. See docs/blockkd.md.
    alpha: float = option(0.35, WEIGHT, "α: weight of L_task (student + stepping-stones)")
    beta: float = option(0.35, WEIGHT, "β: weight of L_distill (student + stepping-stones)")
    gamma: float = option(0.05, WEIGHT, "γ: weight of L_cross (agreement with the stones' ensemble)")
    detach_ensemble: bool = option(True, BOOL, "the stones' ensemble is a target in L_cross (no gradient into it)")
    divergence: str = divergence_option()
    student_divergence: str | None = option(None, optional(choice(*DIVERGENCES.names())),
                                            "the divergence of the student's own distill term d(Y^S, Y^T) "
                                            "only (null: divergence's), e.g. dkd there and kl in the stones' terms")
    dkd_alpha: float = dkd_alpha_option()
    dkd_beta: float = dkd_beta_option()
    logit_standardization: bool = logit_standardization_option()
    # 1x1 conv + BN: the usual adapter, and the stable one with a confident teacher. On Fashion-MNIST a
    # 3x3 conv + BN did better (benchmarks/tune.py), and that recipe sets it; see docs/blockkd.md.
    connector: str = option("conv1x1_bn", registered(CONNECTORS), "C_i: the layers mapping a student block's output "
                            "into the teacher's feature space, where that is a feature map (transformer "
                            "tokens always get Linear + LayerNorm)")
    connector_init: str = option("default", choice(*CONNECTOR_INITS), "default: PyTorch's BN init; teacher_stats: "
                                 "each connector's last BN starts with the per-channel mean and std of the "
                                 "teacher's block output on the first training batch")
    num_blocks: int | None = option(None, optional(integer(1)), "n; null: one block per spatial resolution "
                                    "both networks share (transformers: the shallower side's layer count)")
    stones_per_step: int | None = option(None, optional(integer(1)), "k stepping-stones per step (null: all), "
                                         "reweighted so the expected loss is the full one; k <= n; null with "
                                         "sampling split")
    sampling: str = option("weighted", choice(*SAMPLINGS), "with stones_per_step k: draw the k stones ∝ w_i "
                           "(weighted) or uniformly; split: every stone every step, each on its own random "
                           "1/n share of the batch")
    split_shares: str = option("equal", choice(*SPLIT_SHARES), "sampling split: each stone's share of the batch, "
                               "equal (1/n each), ∝ its weight w_i (weights: the deep, cheap stones get more "
                               "samples; about half the stones' cost on 3 blocks) or ∝ √w_i (sqrt_weights: in "
                               "between)")
    whole_batch_stones: int = option(0, integer(0), "sampling split: the k deepest stones run on the whole batch "
                                     "instead of their share (the others keep theirs); the deep stones are the "
                                     "cheap ones (a connector and a short teacher suffix)")
    whole_batch_connectors: int = option(0, integer(0), "sampling split: the connectors of the k shallowest stones "
                                         "run on the whole batch, then pass their stone's share on to the "
                                         "teacher: their BN normalises with the batch's statistics, not with a "
                                         "small share's (the connector is cheap beside the teacher suffix)")
    num_stones: int | None = option(None, optional(integer(1)), "k: only the k deepest stepping-stones are built "
                                    "and trained, stones n-k+1..n (all n where n <= k), each with its weight "
                                    "w_i = 1/2^(n-i) (null: all n, the paper's method); the shallow stones carry "
                                    "nearly the whole teacher, so they are the costly ones")
    batched_stones: bool = option(True, BOOL, "stones crossing the same teacher block run there as one batch")
    # Measured (docs/blockkd.md, "Across architecture families"): unbounded, the deepest stone of a ResNet ->
    # MobileNetV2 pair pulled up to 8x harder than the student's own terms and the tuned recipe collapsed.
    stone_grad_cap: float | None = option(1.0, optional(number(0)), "each stone's gradient into the student's "
                                          "feature at its block is scaled, per step, to at most this times the "
                                          "gradient the rest of the objective sends there (null: unbounded)")
    stone_warmup: float = option(0.0, number(0), "epochs over which the stones' terms and L_cross ramp up "
                                 "linearly from 0")
    stones_every: int = option(1, integer(1), "run the stones (all of them, on the whole batch or their shares) "
                               "on every k-th training step only (steps 0, k, 2k, … counted across resumes); the "
                               "other steps train the student's own terms alone. 1: every step")
    stones_every_reweight: bool = option(True, BOOL, "with stones_every k: the stones' terms and L_cross count k "
                                         "times on the steps that run them, so that the expected loss is the "
                                         "full one; false: their plain weight (1/k of it on average)")

    def check(self) -> None:
        if self.stones_per_step is not None and self.num_blocks is not None and self.stones_per_step > self.num_blocks:
            raise OptionError("stones_per_step", f"{self.stones_per_step} stones per step, but num_blocks is "
                                                 f"{self.num_blocks}")
        if self.sampling == "split" and self.stones_per_step is not None:
            raise OptionError("stones_per_step", f"sampling split runs every stone every step, each on its share "
                                                 f"of the batch; stones_per_step must be null, got "
                                                 f"{self.stones_per_step}")
        if self.whole_batch_stones and self.sampling != "split":
            raise OptionError("whole_batch_stones", f"whole_batch_stones applies to sampling split, got sampling "
                                                    f"{self.sampling}")
        if self.whole_batch_connectors and self.sampling != "split":
            raise OptionError("whole_batch_connectors", f"whole_batch_connectors applies to sampling split, got "
                                                        f"sampling {self.sampling}")
        if self.whole_batch_stones and self.num_blocks is not None and self.whole_batch_stones > self.num_blocks:
            raise OptionError("whole_batch_stones", f"{self.whole_batch_stones} stones on the whole batch, but "
                                                    f"num_blocks is {self.num_blocks}")
        if self.connector_init == "teacher_stats" and CONNECTORS.get(self.connector)[-1][1]:
            raise OptionError("connector_init", f"teacher_stats sets the affine parameters of the connector's last "
                                                f"BN, but connector {self.connector} ends with a ReLU after it")


@register("blockkd")
class BlockKD(Distiller):
    """Block-KD: the student plus n stepping-stone hybrids, trained through logits (the paper's method)."""

    Options = BlockKDOptions
    paper = "Yu et al., Decoupling Dark Knowledge via Block-wise Logit Distillation, IEEE TAI 2024"
    # CE on the labels, of the student and of the stones; the distill and cross terms match the teacher.
    task_losses = ("loss_task_student", "loss_task_stones")

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        o = self.opts
        try:
            s_view, t_view = match(student, self.teacher, self.input_shape, n=o.num_blocks)
        except BlockKDError as e:
            if o.num_blocks is None:
                raise
            raise OptionError("num_blocks", str(e)) from None
        # A plain tuple: the views share the models' modules and must not be registered a second time
        # (that would duplicate every key in the state_dict).
        self._views = (s_view, t_view)
        n = len(s_view.blocks)
        self.num_blocks = n
        # The stones that exist (0-based block indices, ascending) and their weights, in the same order.
        self.stone_ids = list(range(n - min(o.num_stones or n, n), n))
        self.stone_weights = [1.0 / 2 ** (n - 1 - i) for i in self.stone_ids]
        m = len(self.stone_ids)
        k = o.stones_per_step
        if k is not None and k > m:
            raise OptionError("stones_per_step", f"stones_per_step must be between 1 and the number of stones "
                                                 f"({m}), got {k}")
        self.stones_per_step = None if k is None or k == m else k
        for key in ("whole_batch_stones", "whole_batch_connectors"):
            if getattr(o, key) > m:
                raise OptionError(key, f"{key} must be between 0 and the number of stones ({m}), got "
                                       f"{getattr(o, key)}")
        self.divergence = LogitDivergence(o.divergence, o.temperature, o.logit_standardization,
                                          o.dkd_alpha, o.dkd_beta)
        self.student_divergence = LogitDivergence(o.student_divergence or o.divergence, o.temperature,
                                                  o.logit_standardization, o.dkd_alpha, o.dkd_beta)
        connectors = build_connectors(s_view.probe(self.input_shape), t_view.probe(self.input_shape),
                                      o.connector, prefix_tokens=(s_view.prefix_tokens, t_view.prefix_tokens))
        # connectors[k] belongs to stone stone_ids[k]: none is built for the stones left out by num_stones
        self.connectors = nn.ModuleList(list(connectors)[self.stone_ids[0]:])
        if o.connector_init == "teacher_stats":
            # A buffer, so that it is saved with the connectors: a resumed run does not initialise them again.
            # Only registered with teacher_stats, so the checkpoints of the default keep their keys.
            self.register_buffer("connectors_initialised", torch.zeros((), dtype=torch.bool))
            self._init_pending = True
        if o.stones_every > 1:
            # Steps taken, saved with the checkpoint so that a resumed run keeps the k-step rhythm; only
            # registered with stones_every > 1, so the checkpoints of the default keep their keys. A Python
            # mirror (read from the buffer on the first step and after every load) decides without a device sync.
            self.register_buffer("stone_step", torch.zeros((), dtype=torch.long))
            self.register_load_state_dict_post_hook(_forget_step)
        self._step: int | None = None

    # -- pieces ------------------------------------------------------------------------------------
    def student_features(self, x, scales: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every student block's output and the student's logits, from one forward pass. With
        ``stone_grad_cap``, a stone's block gives the stone its own copy (:func:`stone_grad.fork`), and
        ``scales`` receives the factors applied in the backward pass, by block index."""
        view, cap = self._views[0], self.opts.stone_grad_cap
        if cap is None:
            return view.features(x)
        feats, h = [], x
        for i in range(self.num_blocks):
            h = view.run_block(i, h, x)
            h, mine = fork(h, cap, scales, i) if i in self.stone_ids else (h, h)
            feats.append(mine)
        return feats, view.run_head(h, x)

    def run_stones(self, feats: list[torch.Tensor], which: list[int], inputs=None,
                   rows: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Logits of the stepping-stones ``which`` (0-based, ascending) from the student's features.

        ``inputs`` is the model input the features came from: the teacher blocks take the extra inputs
        they need (a transformer's attention mask) from it. ``rows`` (one index tensor per stone of
        ``which``): stone ``which[k]`` runs on the samples ``rows[k]`` of the batch only (``split``
        sampling); default: every stone on the whole batch.

        Batched mode concatenates, at each teacher block, every stone that passes through it: the
        teacher is in eval mode, so its blocks act per-sample and the results are unchanged, while
        one large batch keeps the device busier than several small ones.
        """
        t_view = self._views[1]
        n = self.num_blocks
        share = dict(zip(which, rows)) if rows is not None else {}
        per_stone = rows is not None and isinstance(inputs, Mapping)  # shares of text inputs: one stone at a time
        if not self.opts.batched_stones or per_stone:
            out = []
            for k, i in enumerate(which):
                own = {key: v[rows[k]] for key, v in inputs.items()} if per_stone else inputs
                h = self.connect(i, feats[i], share.get(i))
                for j in range(i + 1, n):
                    h = t_view.run_block(j, h, own)
                out.append(t_view.run_head(h, own))
            return out
        h, sizes = None, []
        for i in range(which[0], n):
            if i in which:
                z = self.connect(i, feats[i], share.get(i))
                h = z if h is None else torch.cat([h, z])
                sizes.append(z.shape[0])
            if i + 1 < n:
                h = t_view.run_block(i + 1, h, inputs)
        return list(t_view.run_head(h, inputs).split(sizes))

    def connect(self, i: int, feat: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Connector ``i`` on the student feature ``feat``, for the samples ``rows`` (None: all). One of the
        ``whole_batch_connectors`` shallowest runs on the whole batch and its output is cut to ``rows`` after:
        its BN then normalises with the batch's statistics, not with those of a share of a few samples."""
        k = i - self.stone_ids[0]  # the stone's position: its connector, and whether it is one of the shallowest
        if rows is None:
            return self.connectors[k](feat)
        if k < self.opts.whole_batch_connectors:
            return self.connectors[k](feat)[rows]
        return self.connectors[k](feat[rows])

    def stones(self, x) -> list[torch.Tensor]:
        """``[Y^{N_1}, …, Y^{N_n}]``: the logits of every stepping-stone for input ``x``."""
        feats, _ = self.student_features(x)
        return self.run_stones(feats, self.stone_ids, x)

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of ``student``, ``stone1`` … ``stoneN`` and their ``ensemble`` (mean), e.g. for evaluation.

        Runs in the distiller's current mode and grad mode: call it under ``eval()`` and ``torch.no_grad()``
        to evaluate (the stones' connectors then use their BN running statistics).
        """
        feats, logits = self.student_features(x)
        stones = self.run_stones(feats, self.stone_ids, x)
        out = {"student": logits}
        out.update({f"stone{i + 1}": z for i, z in zip(self.stone_ids, stones)})
        out["ensemble"] = torch.stack(stones).mean(0)
        return out

    def pick_stones(self) -> tuple[list[int], list[float]]:
        """Which stones run this step and the coefficient of each in the task/distill sums.

        All stones (also with ``split``, where each runs on its share): coefficient w_i.
        ``stones_per_step=k`` (the lite variant) draws k of them and reweights so that the expected loss
        equals the full one: "weighted" draws i.i.d. with p_i ∝ w_i (coefficient count_i·Σw/k, cheap: the
        shallow, costly stones are rare); "uniform" draws k distinct stones (coefficient w_i·n/k).
        """
        ids, k, w = self.stone_ids, self.stones_per_step, self.stone_weights
        m = len(ids)
        if k is None:
            return list(ids), list(w)
        if self.opts.sampling == "uniform":
            pos = sorted(torch.randperm(m)[:k].tolist())
            return [ids[p] for p in pos], [w[p] * m / k for p in pos]
        draws = torch.multinomial(torch.tensor(w), k, replacement=True).tolist()
        pos = sorted(set(draws))
        return [ids[p] for p in pos], [draws.count(p) * sum(w) / k for p in pos]

    def split_batch(self, batch_size: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """``split`` sampling: the sample indices of each stone, one tensor per stone (1..n in order).

        A uniformly random permutation of the batch cut into n parts: the parts are disjoint, cover the batch,
        and each is a uniformly random subset of its size, so a mean over it is unbiased for the batch's.
        Sizes (:meth:`share_sizes`): near-equal, or ∝ w_i with ``split_shares: weights``. Drawn from torch's
        CPU generator (reproducible under ``torch.manual_seed``, as ``pick_stones``). With
        ``whole_batch_stones: k`` the k deepest stones get every index instead (:meth:`stone_rows`).
        """
        return self.stone_rows(torch.randperm(batch_size).to(device))

    def stone_rows(self, perm: torch.Tensor) -> list[torch.Tensor]:
        """The sample indices of each stone for the permutation ``perm`` of the batch: ``perm`` cut into the
        shares (:meth:`share_sizes`), then the whole batch for the ``whole_batch_stones`` deepest stones."""
        rows = list(perm.split(self.share_sizes(len(perm))))
        m, k = len(self.stone_ids), self.opts.whole_batch_stones
        if k:
            rows[m - k:] = [torch.arange(len(perm), device=perm.device)] * k
        return rows

    def stone_batch_sizes(self, batch_size: int) -> list[int]:
        """How many samples each stone runs on per step under ``split`` (its share, or the whole batch for
        the ``whole_batch_stones`` deepest): what its cost is proportional to (benchmarks/speed.py)."""
        sizes, m, k = self.share_sizes(batch_size), len(self.stone_ids), self.opts.whole_batch_stones
        return sizes[:m - k] + [batch_size] * k

    def share_sizes(self, batch_size: int) -> list[int]:
        """How many samples each stone gets under ``split``: sizes differing by at most one (the first
        ``batch_size % n`` stones get the extra sample), or, with ``split_shares: weights`` (``sqrt_weights``),
        the largest-remainder rounding of batch_size·w_i/Σw (w_i → √w_i; sum exactly batch_size; ties to the
        deeper stone)."""
        n = len(self.stone_ids)
        if self.opts.split_shares == "equal":
            return [batch_size // n + (i < batch_size % n) for i in range(n)]
        w = [wi ** 0.5 if self.opts.split_shares == "sqrt_weights" else wi for wi in self.stone_weights]
        exact = [batch_size * wi / sum(w) for wi in w]
        sizes = [math.floor(e) for e in exact]
        by_remainder = sorted(range(n), key=lambda i: (exact[i] - sizes[i], i), reverse=True)
        for i in by_remainder[:batch_size - sum(sizes)]:
            sizes[i] += 1
        return sizes

    @torch.compiler.disable  # a Python decision per step: compiled code sees its result, not the counter
    def stones_due(self) -> bool:
        """``stones_every: k``: whether this training step runs the stones (steps 0, k, 2k, …), and count it."""
        if self._step is None:
            self._step = int(self.stone_step)
        due = self._step % self.opts.stones_every == 0
        self._step += 1
        self.stone_step.add_(1)
        return due

    # -- objective ---------------------------------------------------------------------------------
    def _stone_terms(self, logits, stone_logits, t_logits, y):
        """Unweighted (CE, distill, cross) of the student and of each stone in ``stone_logits``."""
        d = self.divergence
        ens = torch.stack(stone_logits).mean(0)
        if self.opts.detach_ensemble:
            ens = ens.detach()
        student = (cross_entropy(logits, y), self.student_divergence(logits, t_logits, y), d(logits, ens, y))
        stones = [(cross_entropy(z, y), d(z, t_logits, y), d(z, ens, y)) for z in stone_logits]
        return student, stones

    def _split_terms(self, feats, logits, t_logits, y, x=None):
        """``split`` sampling: (task_stones, distill_stones, cross), see the module's docstring."""
        d, w = self.divergence, self.stone_weights
        shares = self.split_batch(logits.shape[0], logits.device)
        pos = [k for k, r in enumerate(shares) if len(r)]  # positions among stone_ids of the stones that run
        rows = [shares[k] for k in pos]
        stone_logits = self.run_stones(feats, [self.stone_ids[k] for k in pos], x, rows=rows)
        task = sum(w[k] * cross_entropy(z, y[r]) for k, r, z in zip(pos, rows, stone_logits))
        distill = sum(w[k] * d(z, t_logits[r], y[r]) for k, r, z in zip(pos, rows, stone_logits))
        # Ŷ_j: the mean of the stones that saw sample j (its share's stone, and the whole_batch_stones deepest
        # ones); with one stone per sample, exactly that stone's logits.
        total = logits.new_zeros(logits.shape[0], stone_logits[0].shape[1], dtype=stone_logits[0].dtype)
        seen = logits.new_zeros(logits.shape[0], 1, dtype=stone_logits[0].dtype)
        for r, z in zip(rows, stone_logits):
            total = total.index_add(0, r, z)
            seen = seen.index_add(0, r, torch.ones_like(z[:, :1]))
        hat = total / seen
        if self.opts.detach_ensemble:
            hat = hat.detach()
        cross = d(logits, hat, y)
        if self.opts.whole_batch_stones:
            # each stone's own term d(Y^{N_i}, Ŷ), its mean over the samples it saw (identically 0, so omitted,
            # when every sample has one stone)
            cross = cross + sum(d(z, hat[r], y[r]) for r, z in zip(rows, stone_logits))
        return task, distill, cross

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        feats, logits = self.student_features(x)
        self._maybe_init_connectors(x, feats)
        t_logits = self.teacher_logits(x)
        due = self.stones_due() if o.stones_every > 1 else True
        scale = float(o.stones_every) if due and o.stones_every_reweight else 1.0
        if not due or o.sampling == "split":  # the student's own terms here; the stones' below, if they run
            ce_s, distill_s = cross_entropy(logits, y), self.student_divergence(logits, t_logits, y)
            task_stones, distill_stones, cross = (self._split_terms(feats, logits, t_logits, y, x) if due
                                                  else (logits.new_zeros(()),) * 3)
        else:
            which, coef = self.pick_stones()
            stone_logits = self.run_stones(feats, which, x)
            (ce_s, distill_s, cross_s), stones = self._stone_terms(logits, stone_logits, t_logits, y)
            task_stones = sum(c * ce for c, (ce, _, _) in zip(coef, stones))
            distill_stones = sum(c * dist for c, (_, dist, _) in zip(coef, stones))
            cross_scale = len(self.stone_ids) / len(which)  # unbiased for the Σ_i over stones when sampling
            cross = cross_s + cross_scale * sum(cr for _, _, cr in stones)
        ramp = linear_warmup(epoch, o.stone_warmup) * scale
        return logits, {
            "loss_task_student": o.alpha * ce_s,
            "loss_task_stones": ramp * o.alpha * task_stones,
            "loss_distill_student": o.beta * distill_s,
            "loss_distill_stones": ramp * o.beta * distill_stones,
            "loss_cross": ramp * o.gamma * cross,
        }

    # -- diagnostics -------------------------------------------------------------------------------
    def part_gradients(self, x, y, *, epoch: float = 0.0) -> dict[str, list[torch.Tensor]]:
        """The gradient, in the student's parameters, of each part of the full objective L.

        Parts: ``student`` = α·CE(Y^S) + β·d(Y^S, Y^T) + ramp·γ·d(Y^S, Y^ens) and, for each stone i,
        ``stone{i}`` = ramp·(α·w_i·CE(Y^{N_i}) + β·w_i·d(Y^{N_i}, Y^T) + γ·d(Y^{N_i}, Y^ens)); they sum to L
        (all stones on the whole batch, whatever ``stones_per_step`` and ``sampling``: the objective that the
        sampled variants estimate). With ``detach_ensemble: false`` the gradient that d(·, Y^ens) sends
        through the ensemble belongs to the part of the term's first argument. A parameter that a part does
        not reach gets a zero gradient. Runs in the current mode (train mode: BN batch statistics, as in
        training); the BN running statistics of the student and the connectors are restored afterwards. With
        ``stone_grad_cap``, each stone's part is scaled by the factor that a full backward pass applies.
        """
        o = self.opts
        params = [p for p in self.student.parameters() if p.requires_grad]
        saved = {k: b.detach().clone() for k, b in self.named_buffers() if not k.startswith("teacher.")}
        try:
            with torch.enable_grad():
                ramp = linear_warmup(epoch, o.stone_warmup)
                scales: dict[int, torch.Tensor] = {}  # stone_grad_cap: the factors of a full backward pass
                for bounded in ([True, False] if o.stone_grad_cap is not None else [False]):
                    feats, logits = self.student_features(x, scales) if bounded else self._views[0].features(x)
                    t_logits = self.teacher_logits(x)
                    stone_logits = self.run_stones(feats, self.stone_ids, x)
                    (ce_s, dist_s, cross_s), stones = self._stone_terms(logits, stone_logits, t_logits, y)
                    parts = {"student": o.alpha * ce_s + o.beta * dist_s + ramp * o.gamma * cross_s}
                    for i, (ce, dist, cross), w in zip(self.stone_ids, stones, self.stone_weights):
                        parts[f"stone{i + 1}"] = ramp * (o.alpha * w * ce + o.beta * w * dist + o.gamma * cross)
                    if bounded and sum(parts.values()).requires_grad:
                        torch.autograd.grad(sum(parts.values()), params)
                for i in self.stone_ids:  # a stone reaches the student through its fork only: its part scales
                    if i in scales:
                        parts[f"stone{i + 1}"] = parts[f"stone{i + 1}"] * scales[i]
                out = {}
                names = list(parts)
                for k, name in enumerate(names):
                    grads = [None] * len(params)
                    if parts[name].requires_grad:
                        grads = list(torch.autograd.grad(parts[name], params, retain_graph=k + 1 < len(names),
                                                         allow_unused=True))
                    out[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
                return out
        finally:
            buffers = dict(self.named_buffers())
            with torch.no_grad():
                for k, b in saved.items():
                    buffers[k].copy_(b)

    def diagnostics(self, x, y, *, epoch: float = 0.0) -> dict[str, float]:
        """``grad_norm_student``, ``grad_norm_stone1`` …: the L2 norm of each part's gradient in the student's
        parameters (:meth:`part_gradients`): how much each stepping-stone, and the student's own terms, pull
        on the student. Costs one forward and n + 1 backward passes: call it every N steps, not every step.
        """
        out = {}
        for name, grads in self.part_gradients(x, y, epoch=epoch).items():
            out[f"grad_norm_{name}"] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        return out

    # -- connector initialisation ------------------------------------------------------------------
    def _maybe_init_connectors(self, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """``connector_init: teacher_stats``: initialise the connectors on the first training batch, once."""
        if not getattr(self, "_init_pending", False):
            return
        self._init_pending = False  # the flag is read (a device sync) on the first call only
        if not bool(self.connectors_initialised):
            self.init_connectors_from_teacher(x, feats)

    @torch.no_grad()
    def init_connectors_from_teacher(self, x: torch.Tensor, feats: list[torch.Tensor]) -> None:
        """Set each connector's last BN so that the connector's output starts with the per-channel mean and
        std of the teacher's own output at that block, measured on the batch ``x`` (the first training batch).

        Why the batch and not the teacher's BN running statistics: the running statistics of the BN after a
        teacher block describe the *next conv's* output, not the block's output F^T_i (and the last block is
        followed by the head, which has none); F^T_i's statistics can only be measured. With the last BN's
        weight = std(F^T_i) and bias = mean(F^T_i) (biased std over batch and positions, per channel), its
        train-mode output on this batch has exactly that mean and, up to BN's eps, that std. Its running
        statistics are set to this batch's pre-BN statistics too, so that eval mode starts matched as well.
        Under torch.distributed the statistics are averaged over the processes, so every replica starts equal.
        """
        t_feats, _ = self._views[1].features(x)
        for conn, i in zip(self.connectors, self.stone_ids):
            f_t, f_s = t_feats[i], feats[i]
            bn = [m for m in conn.modules() if isinstance(m, nn.BatchNorm2d)][-1]
            mean_t, var_t = _channel_moments(f_t)
            captured = []
            hook = bn.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
            saved = {k: b.clone() for k, b in conn.named_buffers()}
            try:
                conn(f_s.detach())
            finally:
                hook.remove()
                for k, b in conn.named_buffers():
                    b.copy_(saved[k])
            mean_in, var_in = _channel_moments(captured[0])
            count = captured[0].numel() // captured[0].shape[1]
            bn.weight.copy_(var_t.sqrt())
            bn.bias.copy_(mean_t)
            bn.running_mean.copy_(mean_in)
            bn.running_var.copy_(var_in * count / max(count - 1, 1))  # BN's running variance is unbiased
        self.connectors_initialised.fill_(True)


def _forget_step(module: BlockKD, _keys) -> None:
    """After a load, the step counter is read again from the loaded buffer (``stones_every``)."""
    module._step = None


def _channel_moments(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance over every other dim, averaged over processes."""
    f = f.detach().double()
    dims = [d for d in range(f.dim()) if d != 1]
    count = torch.tensor(float(f.numel() // f.shape[1]), dtype=torch.float64, device=f.device)
    sums = torch.stack([f.sum(dims), f.pow(2).sum(dims)])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(count)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min(0)
    return mean.float(), var.float()


@register("blockkd-lite")
class BlockKDLite(BlockKD):
    """Block-KD at a fraction of its cost: the two deepest stones, the deepest on the whole batch, the other
    on a random half of it.

    ``num_stones: 2``, ``sampling: split``, ``split_shares: equal`` and ``whole_batch_stones: 1`` (the defaults
    here, see :class:`BlockKD`): on three blocks stone 2 runs on half of each batch and stone 3 (a connector
    and the teacher's head, nearly free) on all of it; stone 1, whose suffix is nearly the whole teacher, is
    left out. The former lite variants remain options: all stones on shares ∝ w_i (``num_stones: null``,
    ``split_shares: weights``, ``whole_batch_stones: 0``), and k stones drawn per step (``sampling: weighted``
    or ``uniform``, ``stones_per_step: k``, ``whole_batch_stones: 0``); without a k those samplings would run
    every stone on the whole batch (the full method), which is refused.
    """

    @dataclass(frozen=True)
    class Options(BlockKDOptions):
        stones_per_step: int | None = option(None, optional(integer(1)), "with sampling weighted or uniform: k "
                                             "stepping-stones per step, reweighted so the expected loss is the "
                                             "full one (k <= n); null with sampling split")
        sampling: str = option("split", choice(*SAMPLINGS), "split: every stone every step, each on its own "
                               "random share of the batch; weighted / uniform: draw stones_per_step stones "
                               "∝ w_i or uniformly")
        # The two deepest stones, the deeper on the whole batch and the other on half of it: better than all
        # three stones on shares ∝ w_i on both validation seeds, and cheaper (README, "Rounds 7 to 15").
        num_stones: int | None = option(2, optional(integer(1)), "k: only the k deepest stepping-stones are built "
                                        "and trained (all n where n <= k; null: all): the shallow stones carry "
                                        "nearly the whole teacher, the costly part of a stone")
        split_shares: str = option("equal", choice(*SPLIT_SHARES), "sampling split: each stone's share of the "
                                   "batch, 1/k each (equal), ∝ its weight w_i (weights) or ∝ √w_i (sqrt_weights)")
        whole_batch_stones: int = option(1, integer(0), "sampling split: the k deepest stones run on the whole "
                                         "batch instead of their share (the deepest is nearly free: a connector "
                                         "and the teacher's head); 0 with sampling weighted or uniform")

        def check(self) -> None:
            super().check()
            if self.sampling != "split" and self.stones_per_step is None:
                raise OptionError("sampling", f"blockkd-lite with sampling {self.sampling} draws stones_per_step "
                                              f"stones per step: set stones_per_step (1 was the former default) "
                                              f"and whole_batch_stones 0, or use sampling split (the default), "
                                              f"or method blockkd")
