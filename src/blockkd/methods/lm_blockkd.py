"""Block-KD for decoder-only causal LMs (``lm-blockkd``, ``lm-blockkd-lite``): the stepping-stones of
:mod:`blockkd.methods.blockkd` trained through token logits.

Stone i runs the student's blocks 1..i (embeddings and decoder layers, grouped by depth against the teacher's:
:func:`blockkd.blocks.match`), a connector C_i (Linear + LayerNorm over the width), then the frozen teacher's
blocks i+1..n, its final norm and LM head, ``N_i = T_head ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1``; the
teacher's layers get the batch's attention mask and positions (:mod:`blockkd.blocks.hf_lm`). The objective is
Block-KD's, per token, with d the token divergence ``loss`` of :mod:`blockkd.methods.lm` (forward KL by default):

    L_task    = CE(Y^S, y)   + Σ_i w_i CE(Y^{N_i}, y)          w_i = 1 / 2^(n-i)
    L_distill = d(Y^S, Y^T)  + Σ_i w_i d(Y^{N_i}, Y^T)
    L_cross   = d(Y^S, Y^ens) + Σ_i d(Y^{N_i}, Y^ens)          Y^ens = mean_i Y^{N_i} (a target: no gradient)
    L         = α·L_task + β·L_distill + γ·L_cross

Why the defaults α = β = 0.5: the student's own terms are then exactly ``lm-kd``'s default (0.5·CE + 0.5·KL),
so ``lm-blockkd`` is ``lm-kd`` plus the stones, the comparison the benchmark makes.

What the stones cost at a real vocabulary, and how it is bounded: each stone's teacher suffix runs on the whole
sequences (attention needs every position), but its LM head, softmax and loss are the expensive part when the
vocabulary is large (Qwen2.5-0.5B: the head's 896 x 151,936 matmul is ~14 decoder layers' worth of FLOPs per
token). So the stones' terms and L_cross are taken on ``stone_tokens`` counted positions drawn at random per step
(uniformly, without replacement: each term is an unbiased estimate of its mean over all counted tokens), while
the student's CE and distill terms use every counted token; every term runs in chunks of ``chunk`` tokens
(:func:`blockkd.methods.lm.chunked`), so peak memory is (stones + 2) × chunk × vocabulary, never tokens ×
vocabulary. ``stones_per_step: k`` draws k stones per step (reweighted, as in Block-KD). ``lm-blockkd-lite``
keeps the two deepest stones (the deepest is a connector and the teacher's head), the cheap ones.

Why the stones ramp in over the first ``stone_warmup_fraction`` of training (default 0.25) and each stone's pull
on the student is bounded (``stone_grad_cap``, default 1.0: its gradient into the student's feature at its block is
scaled, per step, to at most cap × the gradient the rest of the objective sends there): both are carried over
from the image Block-KD, where they keep a fresh connector's first gradients, and a stone reading a small feature,
from taking over the student's updates (docs/blockkd.md, "Stable by default", "Across architecture families").
The code is Block-KD's: :class:`~blockkd.methods.blockkd.StoneWarmup` and
:func:`~blockkd.methods.stone_grad.forked_features`. Without them (the stones at full weight from the first step,
unbounded) ``lm-blockkd`` ranked last on the fortunes LM benchmark, test perplexity 93.8 against ``lm-kd``
forward_kl's 73.2 (results/lm_fortunes.md): the stones slowed the student from epoch 1 on. With them, on the same
benchmark: 78.5 ± 0.2, ahead of ``ce`` (80.0) but still behind forward KL (results/lm_fortunes-blockkd.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.core import Blocks
from ..errors import BlockKDError
from ..schema import STRING, OptionError, choice, integer, number, option, optional
from .blockkd import (STONE_WARMUP_REMOVED, StoneWarmup, match_views, stone_grad_cap_option,
                      stone_warmup_fraction_option)
from .registry import register
from .connectors import build_connectors
from .lm import (CHUNK, LOSSES, CausalLM, _sum_and_cat, chunked, counted, load_token_mapping, predictions, rows,
                 token_divergence, vocab_of)
from .stone_grad import forked_features


@dataclass(frozen=True)
class LMBlockKDOptions:
    loss: str = option("forward_kl", choice(*LOSSES), "d, the token divergence of every distill and cross term")
    temperature: float = option(1.0, number(0, strict=True), "T of every softmax (d scaled by T²)")
    jsd_beta: float = option(0.5, number(0, hi=1), "loss jsd: its β (teacher's share of the mixture)")
    skew: float = option(0.1, number(0, hi=1), "loss skew_kl / skew_rkl: α, the mixing weight")
    alpha: float = option(0.5, number(0), "α: weight of L_task (student + stepping-stones)")
    beta: float = option(0.5, number(0), "β: weight of L_distill (student + stepping-stones)")
    gamma: float = option(0.05, number(0), "γ: weight of L_cross (agreement with the stones' ensemble)")
    num_blocks: int | None = option(None, optional(integer(1)), "n blocks on each side, grouped by depth (null: "
                                    "the shallower side's layer count)")
    num_stones: int | None = option(None, optional(integer(1)), "only the k deepest stepping-stones (null: all n)")
    stones_per_step: int | None = option(None, optional(integer(1)), "k stones drawn uniformly per step, "
                                         "reweighted by n/k (null: every stone every step)")
    stone_tokens: int | None = option(1024, optional(integer(1)), "counted tokens per step, drawn at random, on "
                                      "which the stones' terms and L_cross are taken (null: all): bounds the "
                                      "stones' LM-head cost at large vocabularies")
    stone_warmup_fraction: float = stone_warmup_fraction_option(student_task=False)
    stone_grad_cap: float | None = stone_grad_cap_option()
    token_mapping: str | None = option(None, optional(STRING), "vocabularies of other sizes: shared or a JSON file "
                                       "of [student_id, teacher_id] pairs (see lm-kd)")
    chunk: int = CHUNK

    # Options since removed (as Block-KD's, docs/blockkd.md "Removed options"): a recipe naming one gets one line;
    # a resumed run whose saved value trains as today's code does is accepted.
    removed_in: ClassVar[str] = "0.2"
    removed: ClassVar[dict[str, tuple[str, Any]]] = {"stone_warmup": STONE_WARMUP_REMOVED}

    def check(self) -> None:
        if self.stones_per_step is not None and self.num_stones is not None and self.stones_per_step > self.num_stones:
            raise OptionError("stones_per_step", f"{self.stones_per_step} stones per step, but num_stones is "
                                                 f"{self.num_stones}")


@register("lm-blockkd")
class LMBlockKD(StoneWarmup, CausalLM):
    """Block-KD through token logits for causal LMs (see the module docstring)."""

    Options = LMBlockKDOptions
    needs_teacher = True
    paper = "Yu et al., Decoupling Dark Knowledge via Block-wise Logit Distillation, IEEE TAI 2024"
    task_losses = ("loss_task_student", "loss_task_stones")

    def __init__(self, student, teacher, options=None, input_shape=None):
        super().__init__(student, teacher, options, input_shape)
        o = self.opts
        if not self.input_shape:
            raise BlockKDError("lm-blockkd needs the data's input spec (blockkd.blocks.text_input(L)) to pair blocks")
        s_view, t_view = match_views(student, self.teacher, self.input_shape, o.num_blocks)
        self._views = (s_view, t_view)
        n = self.num_blocks = len(s_view.blocks)
        self.stone_ids = list(range(n - min(o.num_stones or n, n), n))
        self.stone_weights = [1.0 / 2 ** (n - 1 - i) for i in self.stone_ids]
        if o.stones_per_step is not None and o.stones_per_step > len(self.stone_ids):
            raise OptionError("stones_per_step", f"stones_per_step must be between 1 and the number of stones "
                              f"({len(self.stone_ids)}), got {o.stones_per_step}")
        connectors = build_connectors(s_view.probe(self.input_shape), t_view.probe(self.input_shape))
        self.connectors = nn.ModuleList(list(connectors)[self.stone_ids[0]:])
        device = next(student.parameters()).device
        self._mapping = load_token_mapping(o.token_mapping, vocab_of(self._s_view), vocab_of(self._t_view), device)

    # -- pieces ------------------------------------------------------------------------------------
    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self._mapping is not None:
            s, t = s[:, self._mapping[0].to(s.device)], t[:, self._mapping[1].to(t.device)]
        o = self.opts
        return token_divergence(o.loss, s, t, temperature=o.temperature, beta=o.jsd_beta, skew=o.skew)

    def stone_hidden(self, feats: list[torch.Tensor], which: list[int], x) -> list[torch.Tensor]:
        """Each stone's output before the teacher's head ``(B, L, D_t)``: at each teacher block, every stone
        that passes through it runs as one batch (the teacher is in eval mode: per-sample, unchanged)."""
        t_view: Blocks = self._views[1]
        h, sizes = None, []
        for i in range(which[0], self.num_blocks):
            if i in which:
                z = self.connectors[i - self.stone_ids[0]](feats[i])
                h = z if h is None else torch.cat([h, z])
                sizes.append(z.shape[0])
            if i + 1 < self.num_blocks:
                h = t_view.run_block(i + 1, h, x)
        return list(h.split(sizes))

    def pick_stones(self) -> tuple[list[int], list[float], float]:
        """(stones of this step, their coefficients in the task/distill sums, scale of Σ_i in L_cross)."""
        ids, w, k = self.stone_ids, self.stone_weights, self.opts.stones_per_step
        if k is None or k >= len(ids):
            return list(ids), list(w), 1.0
        pos = sorted(torch.randperm(len(ids))[:k].tolist())
        return [ids[p] for p in pos], [w[p] * len(ids) / k for p in pos], len(ids) / k

    def eval_logits(self, x) -> dict[str, torch.Tensor]:
        """The logits of ``student``, each ``stone<i>`` and their ``ensemble`` (mean), ``(B, L, V)`` each."""
        s_view, t_view = self._views
        feats, logits = s_view.features(x)
        stones = [t_view.run_head(h, x) for h in self.stone_hidden(feats, self.stone_ids, x)]
        out = {"student": logits}
        out.update({f"stone{i + 1}": z for i, z in zip(self.stone_ids, stones)})
        out["ensemble"] = torch.stack(stones).mean(0)
        return out

    # -- objective ---------------------------------------------------------------------------------
    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_view, t_view = self._views
        s_head, t_head = s_view.head, t_view.head
        idx = counted(y)
        n = max(len(idx), 1)
        # at a stone's block the stone gets its own copy of the feature, the student's next block (or head) the
        # other: the stone's gradient into it is bounded by stone_grad_cap (blockkd.methods.stone_grad)
        feats, h = forked_features(s_view, x, self.stone_ids, o.stone_grad_cap)
        with torch.no_grad():
            h_t = x
            for i in range(len(t_view.blocks)):
                h_t = t_view.run_block(i, h_t, x)
        tgt = y.reshape(-1)[idx]

        def student_part(hs, ht, tgt):
            s = s_head(hs)
            with torch.no_grad():
                t = t_head(ht)
            return F.cross_entropy(s.float(), tgt, reduction="sum"), self.divergence(s, t).sum(), s.argmax(-1)

        ce_s, dist_s, pred = _sum_and_cat(student_part, len(idx), o.chunk, rows(h, idx), rows(h_t, idx), tgt)
        losses = {"loss_task_student": o.alpha * ce_s / n, "loss_distill_student": o.beta * dist_s / n}

        which, coef, cross_scale = self.pick_stones()
        sidx = idx
        if o.stone_tokens is not None and len(idx) > o.stone_tokens:
            sidx = idx[torch.randperm(len(idx), device=idx.device)[:o.stone_tokens]]
        m = max(len(sidx), 1)
        stone_h = [rows(z, sidx) for z in self.stone_hidden(feats, which, x)]

        def stone_part(hs, ht, tgt, zs):
            s = s_head(hs)
            with torch.no_grad():
                t = t_head(ht)
            z = [t_head(v) for v in zs]
            ens = torch.stack(z).mean(0).detach()
            task = sum(c * F.cross_entropy(v.float(), tgt, reduction="sum") for c, v in zip(coef, z))
            dist = sum(c * self.divergence(v, t).sum() for c, v in zip(coef, z))
            cross = self.divergence(s, ens).sum() + cross_scale * sum(self.divergence(v, ens).sum() for v in z)
            return task, dist, cross

        task, dist, cross = chunked(stone_part, len(sidx), o.chunk, rows(h, sidx), rows(h_t, sidx),
                                    y.reshape(-1)[sidx], stone_h)
        ramp = self.ramp(epoch)
        losses.update({"loss_task_stones": ramp * o.alpha * task / m, "loss_distill_stones": ramp * o.beta * dist / m,
                       "loss_cross": ramp * o.gamma * cross / m})
        return predictions(y, idx, pred), losses


@register("lm-blockkd-lite")
class LMBlockKDLite(LMBlockKD):
    """``lm-blockkd`` with the two deepest stones only (the deepest: a connector and the teacher's head; the
    other: the teacher's last block group too) and the stones' terms on 512 tokens per step."""

    @dataclass(frozen=True)
    class Options(LMBlockKDOptions):
        num_stones: int | None = option(2, optional(integer(1)), "only the k deepest stepping-stones (null: all n)")
        stone_tokens: int | None = option(512, optional(integer(1)), "counted tokens per step, drawn at random, "
                                          "on which the stones' terms and L_cross are taken (null: all)")


__all__ = ["LMBlockKD", "LMBlockKDLite", "LMBlockKDOptions"]
