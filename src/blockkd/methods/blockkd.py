"""Block-wise Logit Distillation (Yu et al., "Decoupling Dark Knowledge via Block-wise Logit
Distillation for Feature-level Alignment", IEEE TAI 2024, arXiv 2411.01547).

Stepping-stone i (1-based, i = 1..n) runs the student's blocks 1..i, a trained connector C_i, then the
frozen teacher's blocks i+1..n and head:

    N_i = T_head ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1

Feature alignment is thus measured through logits. Objective (see docs/blockkd.md for the choices):

    L_task    = CE(Y^S, y)        + Σ_i w_i CE(Y^{N_i}, y)          w_i = 1 / 2^(n-i)
    L_distill = KL_T(Y^T ‖ Y^S)   + Σ_i w_i KL_T(Y^T ‖ Y^{N_i})
    L_cross   = KL_T(Y^ens ‖ Y^S) + Σ_i KL_T(Y^ens ‖ Y^{N_i})         Y^ens = mean_i Y^{N_i}
    L         = α·L_task + β·L_distill + γ·L_cross

The frozen teacher blocks carry gradients to the connectors and the student but never compute
weight gradients of their own (their parameters have ``requires_grad=False``).

Inputs may be images or, for transformers, mappings of tensors (``input_ids``, ``attention_mask``); the
teacher blocks of every stone take the extra inputs they need (the attention mask) from the batch
(:mod:`blockkd.blocks.core`). ``input_shape`` is then a text spec such as ``blockkd.blocks.text_input(128)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import match
from ..errors import BlockKDError
from ..schema import BOOL, OptionError, choice, integer, number, option, optional
from . import register
from .base import Distiller
from .connectors import KINDS, build_connectors
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy, kl_div, linear_warmup

SAMPLINGS = ("weighted", "uniform")


@dataclass(frozen=True)
class BlockKDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of every KL term (T² scaling)")
    # Measured (benchmarks/weight_sweep.py, benchmarks/stability.py): with a confident teacher
    # α = β = γ = 1 trains far worse than KD at SGD lr 0.05; about 1/(1 + Σw) for α and β and a small
    # γ match or beat it. See docs/blockkd.md.
    alpha: float = option(0.35, WEIGHT, "α: weight of L_task (student + stepping-stones)")
    beta: float = option(0.35, WEIGHT, "β: weight of L_distill (student + stepping-stones)")
    gamma: float = option(0.05, WEIGHT, "γ: weight of L_cross (agreement with the stones' ensemble)")
    detach_ensemble: bool = option(True, BOOL, "the stones' ensemble is a target in L_cross (no gradient into it)")
    # 1x1 conv + BN: the usual adapter, and the stable one with a confident teacher. On Fashion-MNIST a
    # 3x3 conv + BN did better (benchmarks/tune.py), and that recipe sets it; see docs/blockkd.md.
    connector: str = option("conv1x1_bn", choice(*KINDS), "C_i: the layers mapping a student block's output "
                            "into the teacher's feature space, where that is a feature map (transformer "
                            "tokens always get Linear + LayerNorm)")
    num_blocks: int | None = option(None, optional(integer(1)), "n; null: one block per spatial resolution "
                                    "both networks share (transformers: the shallower side's layer count)")
    stones_per_step: int | None = option(None, optional(integer(1)), "k stepping-stones per step (null: all), "
                                         "reweighted so the expected loss is the full one; k <= n")
    sampling: str = option("weighted", choice(*SAMPLINGS), "how the k stones are drawn: ∝ w_i or uniformly")
    batched_stones: bool = option(True, BOOL, "stones crossing the same teacher block run there as one batch")
    stone_warmup: float = option(0.0, number(0), "epochs over which the stones' terms and L_cross ramp up "
                                 "linearly from 0")

    def check(self) -> None:
        if self.stones_per_step is not None and self.num_blocks is not None and self.stones_per_step > self.num_blocks:
            raise OptionError("stones_per_step", f"{self.stones_per_step} stones per step, but num_blocks is "
                                                 f"{self.num_blocks}")


@register("blockkd")
class BlockKD(Distiller):
    """Block-KD: the student plus n stepping-stone hybrids, trained through logits (the paper's method)."""

    Options = BlockKDOptions
    paper = "Yu et al., Decoupling Dark Knowledge via Block-wise Logit Distillation, IEEE TAI 2024"

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
        self.stone_weights = [1.0 / 2 ** (n - i) for i in range(1, n + 1)]
        k = o.stones_per_step
        if k is not None and k > n:
            raise OptionError("stones_per_step", f"stones_per_step must be between 1 and the number of blocks "
                                                 f"({n}), got {k}")
        self.stones_per_step = None if k is None or k == n else k
        self.connectors = build_connectors(s_view.probe(self.input_shape), t_view.probe(self.input_shape),
                                           o.connector, prefix_tokens=(s_view.prefix_tokens, t_view.prefix_tokens))

    # -- pieces ------------------------------------------------------------------------------------
    def student_features(self, x) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every student block's output and the student's logits, from one forward pass."""
        return self._views[0].features(x)

    def run_stones(self, feats: list[torch.Tensor], which: list[int], inputs=None) -> list[torch.Tensor]:
        """Logits of the stepping-stones ``which`` (0-based, ascending) from the student's features.

        ``inputs`` is the model input the features came from: the teacher blocks take the extra inputs
        they need (a transformer's attention mask) from it.

        Batched mode concatenates, at each teacher block, every stone that passes through it: the
        teacher is in eval mode, so its blocks act per-sample and the results are unchanged, while
        one large batch keeps the device busier than several small ones.
        """
        t_view = self._views[1]
        n = self.num_blocks
        if not self.opts.batched_stones:
            out = []
            for i in which:
                h = self.connectors[i](feats[i])
                for j in range(i + 1, n):
                    h = t_view.run_block(j, h, inputs)
                out.append(t_view.run_head(h, inputs))
            return out
        chosen, h, sizes = set(which), None, []
        for i in range(which[0], n):
            if i in chosen:
                z = self.connectors[i](feats[i])
                h = z if h is None else torch.cat([h, z])
                sizes.append(z.shape[0])
            if i + 1 < n:
                h = t_view.run_block(i + 1, h, inputs)
        return list(t_view.run_head(h, inputs).split(sizes))

    def stones(self, x) -> list[torch.Tensor]:
        """``[Y^{N_1}, …, Y^{N_n}]``: the logits of every stepping-stone for input ``x``."""
        feats, _ = self.student_features(x)
        return self.run_stones(feats, list(range(self.num_blocks)), x)

    def pick_stones(self) -> tuple[list[int], list[float]]:
        """Which stones run this step and the coefficient of each in the task/distill sums.

        All stones: coefficient w_i. ``stones_per_step=k`` (the lite variant) draws k of them and
        reweights so that the expected loss equals the full one: "weighted" draws i.i.d. with
        p_i ∝ w_i (coefficient count_i·Σw/k, cheap: the shallow, costly stones are rare);
        "uniform" draws k distinct stones (coefficient w_i·n/k).
        """
        n, k, w = self.num_blocks, self.stones_per_step, self.stone_weights
        if k is None:
            return list(range(n)), list(w)
        if self.opts.sampling == "uniform":
            idx = sorted(torch.randperm(n)[:k].tolist())
            return idx, [w[i] * n / k for i in idx]
        draws = torch.multinomial(torch.tensor(w), k, replacement=True).tolist()
        idx = sorted(set(draws))
        return idx, [draws.count(i) * sum(w) / k for i in idx]

    # -- objective ---------------------------------------------------------------------------------
    def forward_train(self, x, y, *, epoch):
        o = self.opts
        feats, logits = self.student_features(x)
        t_logits = self.teacher_logits(x)
        which, coef = self.pick_stones()
        stone_logits = self.run_stones(feats, which, x)
        T = o.temperature
        task_stones = sum(c * cross_entropy(z, y) for c, z in zip(coef, stone_logits))
        distill_stones = sum(c * kl_div(z, t_logits, T) for c, z in zip(coef, stone_logits))
        ens = torch.stack(stone_logits).mean(0)
        if o.detach_ensemble:
            ens = ens.detach()
        cross_scale = self.num_blocks / len(which)  # unbiased for the Σ_i over stones when sampling
        cross = kl_div(logits, ens, T) + cross_scale * sum(kl_div(z, ens, T) for z in stone_logits)
        ramp = linear_warmup(epoch, o.stone_warmup)
        return logits, {
            "loss_task_student": o.alpha * cross_entropy(logits, y),
            "loss_task_stones": ramp * o.alpha * task_stones,
            "loss_distill_student": o.beta * kl_div(logits, t_logits, T),
            "loss_distill_stones": ramp * o.beta * distill_stones,
            "loss_cross": ramp * o.gamma * cross,
        }


@register("blockkd-lite")
class BlockKDLite(BlockKD):
    """Block-KD at a fraction of the cost: one stepping-stone per step, drawn with p_i ∝ w_i and reweighted."""

    @dataclass(frozen=True)
    class Options(BlockKDOptions):
        stones_per_step: int | None = option(1, optional(integer(1)), "k stepping-stones per step, reweighted "
                                             "so the expected loss is the full one; k <= n")
