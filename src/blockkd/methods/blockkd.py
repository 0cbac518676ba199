"""Block-wise Logit Distillation (Yu et al., "Decoupling Dark Knowledge via Block-wise Logit
Distillation for Feature-level Alignment", IEEE TAI 2024, arXiv 2411.01547).

Stepping-stone i (1-based) runs the student's blocks 1..i, a trained connector C_i, then the frozen
teacher's blocks i+1..n and head: N_i = T_head ∘ T_n ∘ … ∘ T_{i+1} ∘ C_i ∘ S_i ∘ … ∘ S_1, so feature
alignment is measured through logits. With d = T²·KL(target ‖ student), w_i = 1/2^(n-i) and
Y^ens = mean_i Y^{N_i} (a target: no gradient flows into it):

    L_task    = CE(Y^S, y)   + Σ_i w_i CE(Y^{N_i}, y)
    L_distill = d(Y^S, Y^T)  + Σ_i w_i d(Y^{N_i}, Y^T)
    L_cross   = d(Y^S, Y^ens) + Σ_i d(Y^{N_i}, Y^ens)
    L         = α·L_task + β·L_distill + γ·L_cross

The stones' terms, L_cross and the student's task term ramp in over the first ``stone_warmup_fraction`` of
training, so the student first learns from the teacher's logits alone (docs/blockkd.md, "Stable by default").
Which stones exist and which rows of the batch each runs on (``num_stones``, ``whole_batch_stones``) is decided
in :mod:`blockkd.methods.stones`; every option and the measurement behind it: docs/blockkd.md.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..blocks import match
from ..errors import BlockKDError
from ..schema import registered, BOOL, OptionError, integer, number, option, optional
from .registry import register
from .base import Distiller
from .connectors import CONNECTORS, build_connectors
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy, kl_div, linear_warmup
from .stone_grad import forked_features
from .stones import StonePlan, ensemble as stones_ensemble, run as run_stones

ANY = None  # a removed option whose every saved value trains as today's code does


def match_views(student, teacher, input_shape, num_blocks: int | None):
    """Both models' block views at the same n (:func:`blockkd.blocks.match`); an n the pair cannot take is an
    error of the ``num_blocks`` option."""
    try:
        return match(student, teacher, input_shape, n=num_blocks)
    except BlockKDError as e:
        if num_blocks is None:
            raise
        raise OptionError("num_blocks", str(e)) from None


# The two options that keep the first gradients no harsher than KD's (docs/blockkd.md, "Stable by default"),
# declared once for Block-KD and its causal-LM form (blockkd.methods.lm_blockkd). Block-KD's warm-up holds back
# the student's task term too (measured on wrn_16_2 -> ShuffleV1); lm-blockkd's was not measured with it.
def stone_warmup_fraction_option(student_task: bool = True):
    ramped = "the stones' terms, L_cross and the student's task term" if student_task else \
        "the stones' terms and L_cross"
    return option(0.25, number(0, hi=1), f"fraction of training over which {ramped} ramp up linearly from 0")


def stone_grad_cap_option():
    return option(1.0, optional(number(0)), "each stone's gradient into the student's feature at its block is "
                  "scaled, per step, to at most this times the gradient the rest of the objective sends there "
                  "(null: unbounded)")


# The ramp in epochs, replaced by stone_warmup_fraction: a saved value trains as today's code does where it is
# the fraction's share of the resumed run's epochs (the ``removed`` entry of both Options classes).
STONE_WARMUP_REMOVED = ("replaced by stone_warmup_fraction, the same ramp as a fraction of training, "
                        "stone_warmup / train.epochs", lambda v, cfg: math.isclose(
                            v, cfg.method.options.stone_warmup_fraction * cfg.train.epochs, abs_tol=1e-9))

# The training length assumed where the caller gives none (blockkd.methods.create without epochs=): the
# schedule on which the warm-up was measured (configs/fashion_mnist).
ASSUMED_EPOCHS = 8


class StoneWarmup:
    """The warm-up of a distiller whose options have ``stone_warmup_fraction`` (Block-KD and
    :class:`blockkd.methods.lm_blockkd.LMBlockKD`); the training length is the distiller's ``epochs``."""

    def ramp(self, epoch: float) -> float:
        """The warm-up's factor at ``epoch``: 0 → 1 over the first ``stone_warmup_fraction`` of training."""
        fraction = self.opts.stone_warmup_fraction
        if fraction and self.epochs is None and not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"Block-KD: the training length is unknown, so the warm-up runs over "
                          f"{fraction * ASSUMED_EPOCHS:g} epochs ({fraction} of {ASSUMED_EPOCHS}); pass "
                          f"epochs= to blockkd.methods.create", stacklevel=3)
        return linear_warmup(epoch, fraction * (self.epochs or ASSUMED_EPOCHS))


@dataclass(frozen=True)
class BlockKDOptions:
    """Each option's measurement: docs/blockkd.md, "Options". The defaults are the configuration chosen on
    Fashion-MNIST's validation split and confirmed on its full 60k (issue 29) and with a 4x wider teacher."""

    temperature: float = option(4.0, TEMPERATURE, "T of every distillation term (T² scaling)")
    alpha: float = option(1.0, WEIGHT, "α: weight of L_task (student + stepping-stones)")
    beta: float = option(1.0, WEIGHT, "β: weight of L_distill (student + stepping-stones)")
    gamma: float = option(0.05, WEIGHT, "γ: weight of L_cross (agreement with the stones' ensemble)")
    connector: str = option("conv3x3_bn", registered(CONNECTORS), "C_i: the layers mapping a student block's output "
                            "into the teacher's feature space, where that is a feature map (transformer "
                            "tokens always get Linear + LayerNorm)")
    stone_warmup_fraction: float = stone_warmup_fraction_option()
    num_blocks: int | None = option(None, optional(integer(1)), "n; null: one block per spatial resolution "
                                    "both networks share (transformers: the shallower side's layer count)")
    num_stones: int | None = option(None, optional(integer(1)), "k: only the k deepest stepping-stones are built "
                                    "and trained (all n where n <= k; null: all n, the paper's method); the "
                                    "shallow stones carry nearly the whole teacher, so they are the costly ones")
    whole_batch_stones: int | None = option(None, optional(integer(0)), "null: every stone on the whole batch; "
                                            "k: the k deepest stones on the whole batch, each other stone on its "
                                            "own random 1/m share of it (m stones)")
    batched_stones: bool = option(True, BOOL, "stones crossing the same teacher block run there as one batch")
    stone_grad_cap: float | None = stone_grad_cap_option()

    # Options that lost their measurements (docs/blockkd.md, "Removed options"): a recipe naming one gets one
    # line. A resumed run is refused where its saved value trained differently from today's code: name ->
    # (why, the saved values that train as today's code does, or a test of the saved value and the new config).
    removed_in: ClassVar[str] = "0.2"
    removed: ClassVar[dict[str, tuple[str, Any]]] = {
        "stones_per_step": ("drawing k stones per step trained below the student alone", (None,)),
        "sampling": ("every stone runs on the whole batch unless whole_batch_stones is set", ANY),
        "split_shares": ("the shares are equal: shares by weight lost to the two-stone lite variant, round 15",
                         ("equal",)),
        "whole_batch_connectors": ("below the shares alone on both seeds, round 11", (0,)),
        "stones_every": ("below KD, round 12", (1,)),
        "stones_every_reweight": ("it went with stones_every", ANY),
        "student_divergence": ("no gain, round 6", (None,)),
        "divergence": ("dkd in every term gave no gain, round 5", ("kl",)),
        "dkd_alpha": ("it went with divergence", ANY),
        "dkd_beta": ("it went with divergence", ANY),
        "logit_standardization": ("it cost 2.6 points, round 4", (False,)),
        "connector_init": ("teacher_stats gained on one seed of two, rounds 5 and 6", ("default",)),
        "detach_ensemble": ("the ensemble is always a target: not detaching it gained nothing, round 1", (True,)),
        "stone_warmup": STONE_WARMUP_REMOVED,
    }

    def check(self) -> None:
        if self.whole_batch_stones is not None and self.num_blocks is not None \
                and self.whole_batch_stones > self.num_blocks:
            raise OptionError("whole_batch_stones", f"{self.whole_batch_stones} stones on the whole batch, but "
                                                    f"num_blocks is {self.num_blocks}")


@register("blockkd")
class BlockKD(StoneWarmup, Distiller):
    """Block-KD: the student plus n stepping-stone hybrids, trained through logits (the paper's method)."""

    Options = BlockKDOptions
    paper = "Yu et al., Decoupling Dark Knowledge via Block-wise Logit Distillation, IEEE TAI 2024"
    # CE on the labels, of the student and of the stones; the distill and cross terms match the teacher.
    task_losses = ("loss_task_student", "loss_task_stones")

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        o = self.opts
        s_view, t_view = match_views(student, self.teacher, self.input_shape, o.num_blocks)
        # A plain tuple: the views share the models' modules and must not be registered a second time
        # (that would duplicate every key in the state_dict).
        self._views = (s_view, t_view)
        self.num_blocks = len(s_view.blocks)
        self.plan = StonePlan.build(self.num_blocks, o.num_stones, o.whole_batch_stones)
        self.stone_ids, self.stone_weights = list(self.plan.ids), list(self.plan.weights)
        if (o.whole_batch_stones or 0) > len(self.stone_ids):
            raise OptionError("whole_batch_stones", f"whole_batch_stones must be between 0 and the number of "
                                                    f"stones ({len(self.stone_ids)}), got {o.whole_batch_stones}")
        connectors = build_connectors(s_view.probe(self.input_shape), t_view.probe(self.input_shape),
                                      o.connector, prefix_tokens=(s_view.prefix_tokens, t_view.prefix_tokens))
        # connectors[k] belongs to stone stone_ids[k]: none is built for the stones left out by num_stones
        self.connectors = nn.ModuleList(list(connectors)[self.stone_ids[0]:])

    # -- pieces ------------------------------------------------------------------------------------
    def d(self, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The paper's d: T²·KL(target ‖ student), batch-averaged."""
        return kl_div(student, target, self.opts.temperature)

    def student_features(self, x, scales: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every student block's output and the student's logits, from one forward pass. With
        ``stone_grad_cap``, a stone's block gives the stone its own copy (:func:`stone_grad.fork`), and
        ``scales`` receives the factors applied in the backward pass, by block index."""
        view, cap = self._views[0], self.opts.stone_grad_cap
        if cap is None:
            return view.features(x)
        feats, h = forked_features(view, x, self.stone_ids, cap, scales)
        return feats, view.run_head(h, x)

    def connect(self, i: int, feat: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Connector of stone ``i`` on the student feature ``feat``, for the batch rows ``rows`` (None: all)."""
        return self.connectors[i - self.stone_ids[0]](feat if rows is None else feat[rows])

    def run_stones(self, feats, which: list[int], inputs=None, rows=None) -> list[torch.Tensor]:
        """Logits of the stepping-stones ``which`` (0-based) on ``rows`` of the batch
        (:func:`blockkd.methods.stones.run`)."""
        return run_stones(self._views[1], self.connect, feats, which, inputs, rows, self.opts.batched_stones)

    def stones(self, x) -> list[torch.Tensor]:
        """``[Y^{N_i}, …]``: the logits of every stepping-stone for input ``x``."""
        feats, _ = self.student_features(x)
        return self.run_stones(feats, self.stone_ids, x)

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The logits of ``student``, ``stone1`` … ``stoneN`` and their ``ensemble`` (mean), e.g. for evaluation.

        Runs in the distiller's current mode and grad mode: call it under ``eval()`` and ``torch.no_grad()``
        to evaluate (the stones' connectors then use their BN running statistics).
        """
        feats, logits = self.student_features(x)
        z = self.run_stones(feats, self.stone_ids, x)
        out = {"student": logits, **{f"stone{i + 1}": zi for i, zi in zip(self.stone_ids, z)}}
        out["ensemble"] = torch.stack(z).mean(0)
        return out

    # -- objective ---------------------------------------------------------------------------------
    def stone_terms(self, feats, logits, t_logits, y, x, rows):
        """Unweighted Σ_i w_i CE(Y^{N_i}), Σ_i w_i d(Y^{N_i}, Y^T) and L_cross, each stone on its ``rows``."""
        ran = [k for k, r in enumerate(rows) if r is None or len(r)]  # a batch smaller than m leaves some out
        rows = [rows[k] for k in ran]
        z = self.run_stones(feats, [self.stone_ids[k] for k in ran], x, rows)
        w = [self.stone_weights[k] for k in ran]
        on = lambda t, r: t if r is None else t[r]  # noqa: E731
        task = sum(wk * cross_entropy(zk, on(y, r)) for wk, zk, r in zip(w, z, rows))
        distill = sum(wk * self.d(zk, on(t_logits, r)) for wk, zk, r in zip(w, z, rows))
        ens = stones_ensemble(z, rows, logits.shape[0])
        # each stone's term over the samples it saw: 0 where it alone saw them (its logits are their ensemble)
        cross = self.d(logits, ens) + sum(self.d(zk, on(ens, r)) for zk, r in zip(z, rows))
        return task, distill, cross

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        feats, logits = self.student_features(x)
        t_logits = self.teacher_logits(x)
        rows = self.plan.rows(y.shape[0], y.device)
        task, distill, cross = self.stone_terms(feats, logits, t_logits, y, x, rows)
        ramp = self.ramp(epoch)
        return logits, {
            "loss_task_student": ramp * o.alpha * cross_entropy(logits, y),
            "loss_task_stones": ramp * o.alpha * task,
            "loss_distill_student": o.beta * self.d(logits, t_logits),
            "loss_distill_stones": ramp * o.beta * distill,
            "loss_cross": ramp * o.gamma * cross,
        }

    # -- diagnostics -------------------------------------------------------------------------------
    def part_gradients(self, x, y, *, epoch: float = 0.0) -> dict[str, list[torch.Tensor]]:
        """The gradient, in the student's parameters, of each part of the full objective L.

        Parts: ``student`` = ramp·α·CE(Y^S) + β·d(Y^S, Y^T) + ramp·γ·d(Y^S, Y^ens) and, for each stone i,
        ``stone{i}`` = ramp·(α·w_i·CE(Y^{N_i}) + β·w_i·d(Y^{N_i}, Y^T) + γ·d(Y^{N_i}, Y^ens)); they sum to L
        with every stone on the whole batch (the objective that the shares estimate). A parameter that a part
        does not reach gets a zero gradient. Runs in the current mode (train mode: BN batch statistics, as in
        training); the BN running statistics of the student and the connectors are restored afterwards. With
        ``stone_grad_cap``, each stone's part is scaled by the factor that a full backward pass applies.
        """
        o = self.opts
        params = [p for p in self.student.parameters() if p.requires_grad]
        saved = {k: b.detach().clone() for k, b in self.named_buffers() if not k.startswith("teacher.")}
        try:
            with torch.enable_grad():
                ramp = self.ramp(epoch)
                scales: dict[int, torch.Tensor] = {}  # stone_grad_cap: the factors of a full backward pass
                for bounded in ([True, False] if o.stone_grad_cap is not None else [False]):
                    feats, logits = self.student_features(x, scales) if bounded else self._views[0].features(x)
                    t_logits = self.teacher_logits(x)
                    z = self.run_stones(feats, self.stone_ids, x)
                    ens = torch.stack(z).mean(0).detach()
                    parts = {"student": ramp * o.alpha * cross_entropy(logits, y) + o.beta * self.d(logits, t_logits)
                             + ramp * o.gamma * self.d(logits, ens)}
                    for i, zi, w in zip(self.stone_ids, z, self.stone_weights):
                        parts[f"stone{i + 1}"] = ramp * (o.alpha * w * cross_entropy(zi, y)
                                                         + o.beta * w * self.d(zi, t_logits)
                                                         + o.gamma * self.d(zi, ens))
                    if bounded and sum(parts.values()).requires_grad:
                        torch.autograd.grad(sum(parts.values()), params)
                for i in self.stone_ids:  # a stone reaches the student through its fork only: its part scales
                    if i in scales:
                        parts[f"stone{i + 1}"] = parts[f"stone{i + 1}"] * scales[i]
                out = {}
                for k, (name, part) in enumerate(parts.items()):
                    grads = [None] * len(params)
                    if part.requires_grad:
                        grads = list(torch.autograd.grad(part, params, retain_graph=k + 1 < len(parts),
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


@register("blockkd-lite")
class BlockKDLite(BlockKD):
    """Block-KD at a fraction of its cost: the two deepest stones, the deepest on the whole batch (a
    connector and the teacher's head, nearly free), the other on a random half of it; every other option
    is Block-KD's default. Measured: docs/blockkd.md, "Lite variant"."""

    @dataclass(frozen=True)
    class Options(BlockKDOptions):
        num_stones: int | None = option(2, optional(integer(1)), "k: only the k deepest stepping-stones are built "
                                        "and trained (all n where n <= k; null: all): the shallow stones carry "
                                        "nearly the whole teacher, the costly part of a stone")
        whole_batch_stones: int | None = option(1, optional(integer(0)), "null: every stone on the whole batch; "
                                                "k: the k deepest stones on the whole batch, each other stone on "
                                                "its own random 1/m share of it (m stones)")
