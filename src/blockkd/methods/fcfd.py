"""Liu et al., "Function-Consistent Feature Distillation" (FCFD), ICLR 2023.

FCFD asks the student's features to be *functionally* like the teacher's: besides the student and teacher
paths it runs mixed paths that cross between the networks at a block boundary through a bridge, student blocks
1..k then the teacher's blocks k+1..n (s2t), or teacher blocks 1..k then the student's (t2s), and asks their
logits to match the teacher's. With P the paths sampled this step (``extra_paths`` of the candidates):

    L = ce_weight · CE(z_s, y) + kd_weight · KL_T(z_s ‖ z_t) + mixed_weight · Σ_{p ∈ P} KL_T(z_p ‖ z_t)
        + l2_weight · ramp · Σ_b Σ_v [MSE(v, f_t,b) (+ at the last block MSE(pool(relu v), pool(relu f_t,b)))]

where v runs over the features in the teacher's space at block b: the student's block output through its s2t
bridge, and the teacher-block outputs of the sampled s2t paths (each KL is τ²-scaled, batch-averaged, with a
constant target). Follows the authors' code (LiuDongyang6/FCFD, ``classification/models/meta.py`` ``MetaModel``,
``GhostForward``, ``build_bridge``; ``classification/cifar/main.py`` ``train_one_epoch``): a bridge is a 3x3 conv
+ BN (a stride-2 conv with bias where the source is twice as large, a 4x4 stride-2 transposed conv with bias where
it is half), followed by LeakyReLU(0.1) where the target block takes non-negative (post-ReLU) input; the bridges
are Kaiming-initialised (fan-out); the L2 ramps in as min(1, (e + 1) / 20) over the first ``l2_warmup`` epochs
(e the 0-based epoch); the path candidates cross after each block but the last. As in their code, every teacher
block runs with BN on batch statistics during training (their MetaModel is put in train mode as a whole); here
the teacher's running statistics are restored afterwards (they never enter the loss), and the student's blocks
on a mixed path leave the student's running statistics as they were (their per-path "ghost" statistics, which
only a mixed path's own evaluation would read). Paths are sampled with torch's generator (theirs: ``random``).

Block-KD's stepping-stones are the s2t half of this idea with a frozen, eval-mode teacher and no feature L2 and
no t2s paths; see docs/methods.md. Needs block views of both networks with (C, H, W) maps whose sizes at each
boundary are equal or differ by a factor of 2 (CIFAR zoo, torchvision and timm CNNs).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BlockKDError
from ..schema import choice, integer, number, option
from .registry import register
from .feature import FeatureDistiller
from .kd import TEMPERATURE, WEIGHT
from .losses import cross_entropy, kl_div


def bridge(src: tuple[int, int, int], dst: tuple[int, int, int], after_relu: bool) -> nn.Sequential:
    """The authors' bridge from a (C, H, W) map of one network to the other's at the same boundary."""
    (c_in, h_in, _), (c_out, h_out, _) = src, dst
    if h_in == h_out:
        conv = nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=False)
    elif h_in == 2 * h_out:
        conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
    elif 2 * h_in == h_out:
        conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    else:
        raise BlockKDError(f"method fcfd bridges maps of equal size or a factor 2 apart, not {src} and {dst}")
    layers = [conv, nn.BatchNorm2d(c_out)] + ([nn.LeakyReLU(0.1)] if after_relu else [])
    for m in layers:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return nn.Sequential(*layers)


@contextlib.contextmanager
def batch_statistics(module: nn.Module):
    """BN layers of ``module`` on batch statistics (train mode) with throw-away copies of their running
    statistics (the authors' ``GhostForward``: the originals are swapped back, never written in place, since
    autograd may hold them)."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = []
    for m in bns:
        buffers = {k: b for k, b in m.named_buffers(recurse=False)}
        saved.append((m.training, buffers))
        for k, b in buffers.items():
            setattr(m, k, b.clone())
        m.train()
    try:
        yield
    finally:
        for m, (mode, buffers) in zip(bns, saved):
            m.train(mode)
            for k, b in buffers.items():
                setattr(m, k, b)


@dataclass(frozen=True)
class FCFDOptions:
    temperature: float = option(4.0, TEMPERATURE, "T of every KL term (τ²-scaled)")
    ce_weight: float = option(1.0, WEIGHT, "weight of the student's cross-entropy with the labels")
    kd_weight: float = option(1.0, WEIGHT, "weight of KL(student ‖ teacher)")
    mixed_weight: float = option(1.0, WEIGHT, "weight of KL(mixed path ‖ teacher), for each sampled path")
    l2_weight: float = option(5.0, WEIGHT, "weight of the feature L2 in the teacher's space (the authors' weight_l2)")
    l2_warmup: float = option(20.0, number(0), "epochs over which the L2 ramps in, (epoch + 1) / l2_warmup")
    paths: str = option("bi", choice("bi", "s2t", "t2s", "nomix"), "mixed-path candidates: both directions, "
                                                                   "student→teacher, teacher→student or none")
    extra_paths: int = option(2, integer(0), "mixed paths sampled per step (at most the candidates)")


@register("fcfd")
class FCFD(FeatureDistiller):
    """FCFD: CE + KD + KL of sampled mixed (bridged) paths to the teacher + feature L2 in the teacher's space."""

    Options = FCFDOptions
    paper = "Liu et al., Function-Consistent Feature Distillation, ICLR 2023"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        n = self.num_blocks
        if n < 2:
            raise BlockKDError("method fcfd needs at least two matched blocks (a boundary to cross)")
        s_view, t_view = self._views
        s_in, t_in = self._input_after_relu(s_view), self._input_after_relu(t_view)
        # s2t bridges at every block (the last one feeds only the L2), t2s bridges before the last block
        self.s2t = nn.ModuleList(bridge(self.student_shapes[b], self.teacher_shapes[b], t_in[b])
                                 for b in range(n))
        self.t2s = nn.ModuleList(bridge(self.teacher_shapes[b], self.student_shapes[b], s_in[b])
                                 for b in range(n - 1))
        kinds = {"bi": ("t2s", "s2t"), "s2t": ("s2t",), "t2s": ("t2s",), "nomix": ()}[self.opts.paths]
        self.candidates = [(kind, k) for kind in ("t2s", "s2t") if kind in kinds for k in range(1, n)]
        if self.opts.extra_paths > len(self.candidates):
            raise BlockKDError(f"method.options.extra_paths is {self.opts.extra_paths}, but paths "
                               f"{self.opts.paths!r} gives {len(self.candidates)} candidates on {n} blocks")

    def _input_after_relu(self, view) -> list[bool]:
        """Per block b: whether block b+1's input is non-negative (its block b output ends with a ReLU)."""
        x = torch.randn(2, *self.input_shape, device=next(view.parameters()).device)
        if x.device.type == "meta":
            return [True] * len(view.blocks)
        with torch.no_grad(), batch_statistics(view):
            feats, _ = view.features(x)
        return [bool((f >= 0).all()) for f in feats]

    def sample_paths(self) -> list[tuple[str, int]]:
        k = self.opts.extra_paths
        return [self.candidates[i] for i in torch.randperm(len(self.candidates))[:k].tolist()]

    def forward_train(self, x, y, *, epoch, paths: list[tuple[str, int]] | None = None):
        o = self.opts
        s_view, t_view = self._views
        paths = self.sample_paths() if paths is None else paths
        s_feats, logits = s_view.features(x)
        with torch.no_grad(), batch_statistics(self.teacher):
            t_feats, t_logits = t_view.features(x)
        n = self.num_blocks
        in_teacher = [[self.s2t[b](s_feats[b])] for b in range(n)]  # features in the teacher's space, per block
        mixed = []
        for kind, k in paths:
            if kind == "s2t":  # student blocks 0..k-1, bridge, teacher blocks k..n-1 (frozen, gradient flows)
                h = in_teacher[k - 1][0]
                with batch_statistics(self.teacher):
                    for b in range(k, n):
                        h = t_view.run_block(b, h, x)
                        in_teacher[b].append(h)
                    mixed.append(t_view.run_head(h, x))
            else:  # teacher blocks 0..k-1, bridge, student blocks k..n-1 on batch statistics
                h = self.t2s[k - 1](t_feats[k - 1])
                with batch_statistics(self.student):
                    for b in range(k, n):
                        h = s_view.run_block(b, h, x)
                    mixed.append(s_view.run_head(h, x))
        l2 = logits.new_zeros((), dtype=torch.float32)
        for b in range(n):
            target = t_feats[b].float()
            for v in in_teacher[b]:
                l2 = l2 + F.mse_loss(v.float(), target)
                if b == n - 1:
                    l2 = l2 + F.mse_loss(F.relu(v.float()).mean((2, 3)), F.relu(target).mean((2, 3)))
        e = math.floor(epoch)
        ramp = min(1.0, (e + 1) / o.l2_warmup) if o.l2_warmup > 0 and e < o.l2_warmup else 1.0
        losses = {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_kd": o.kd_weight * kl_div(logits, t_logits, o.temperature),
            "loss_l2": o.l2_weight * ramp * l2,
        }
        if mixed:
            losses["loss_mixed"] = o.mixed_weight * sum(kl_div(z, t_logits, o.temperature) for z in mixed)
        return logits, losses
