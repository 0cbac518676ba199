"""Lee, Kim & Song, "Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018.

Each block's output is compressed by a truncated SVD; the student's right-singular vectors are aligned
(sign and order) to the teacher's, scaled by the teacher's normalised singular values, and the
relations between consecutive blocks' vectors, through a Gaussian RBF exp(−(v − v')²/8), are
matched with an L2 loss summed over entries and averaged over the batch:

    L = ce_weight · CE(y^S, y)
      + feat_weight · Σ_{i≥2} Σ (RBF(V^S_i, V^S_{i−1}) − RBF(V^T_i, V^T_{i−1}))² / b

As mdistiller's ``KDSVD`` (defaults ``cfg.KDSVD``: K 1, CE_WEIGHT 1, FEAT_WEIGHT 1; every stage output,
``feats[1:]``; no logit-KD term): the teacher keeps its top k singular vectors, the student its top
k + 3, and a (B, C, H, W) map is decomposed as a (B, C·H, W) matrix, so that the vectors live on the
width axis and a student and a teacher of different channel counts can be compared. (The TensorFlow
original decomposes (B, H·W, C), which needs equal channel counts.) Non-finite values are zeroed as
in mdistiller. Three differences: maps of different sizes are compared at the smaller one; each
singular vector's sign is fixed (largest entry positive) where mdistiller keeps whatever its SVD
routine returns, on which the loss depends; and the SVD's backward is the TensorFlow original's, which
zeroes the non-finite entries of 1/(s_j² − s_i²) (:class:`_SVD`): with torch's own (as in mdistiller) a
rank-deficient feature map gives NaN gradients, and resnet20 → resnet8 on Fashion-MNIST failed in its
first epoch at every weight tried (results/tuning-baselines.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import BlockKDError
from ..schema import integer, option
from .registry import register
from .feature import FeatureDistiller, same_size
from .kd import WEIGHT
from .losses import cross_entropy


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


class _SVD(torch.autograd.Function):
    """``(u, s, v)`` of ``torch.linalg.svd(a, full_matrices=False)`` (v, not vh), with the original's backward.

    Why not torch's own: its backward divides by s_j² − s_i² and by s, so a feature map with repeated
    singular values (two zero ones: a rank-deficient ReLU map) gets 0/0 = NaN gradients even when the loss
    uses only the top vectors, whose gradient is well defined; the weights turn NaN and the next SVD fails.
    The TensorFlow original overrides the SVD gradient for this reason and zeroes the non-finite entries of
    1/(s_j² − s_i²); so do we, and of 1/s. Where every entry is finite this is torch's gradient (Townsend,
    "Differentiating the Singular Value Decomposition", 2016, real case)."""

    @staticmethod
    def forward(ctx, a):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.transpose(-2, -1)
        ctx.save_for_backward(u, s, v)
        return u, s, v

    @staticmethod
    def backward(ctx, gu, gs, gv):
        u, s, v = ctx.saved_tensors
        s2 = s * s
        f = _finite(1.0 / (s2[..., None, :] - s2[..., :, None]))  # f_ij = 1/(s_j² − s_i²); diagonal 1/0 → 0
        s_inv = _finite(1.0 / s)
        # gu, gs, gv are never None: autograd materialises the gradient of an unused output as zeros
        inner = (torch.diag_embed(gs) + f * (u.mT @ gu - gu.mT @ u) * s[..., None, :]
                 + s[..., :, None] * (f * (v.mT @ gv - gv.mT @ v)))
        right = s_inv[..., :, None] * gv.mT
        outside_u = ((gu - u @ (u.mT @ gu)) * s_inv[..., None, :]) @ v.mT  # (I − UUᵀ) Ū S⁻¹ Vᵀ
        outside_v = u @ (right - (right @ v) @ v.mT)  # U S⁻¹ V̄ᵀ (I − VVᵀ)
        return u @ inner @ v.mT + outside_u + outside_v


def truncated_svd(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, v)``: the top ``n`` singular values (B, n) and right-singular vectors (B, W, n) of the
    (B, C·H, W) matrix of ``feat``, each L2-normalised (the values across the n, each vector on its own)."""
    b, c, h, w = feat.shape
    _, s, v = _SVD.apply(feat.float().reshape(b, c * h, w))
    s, v = _finite(s), _finite(v)
    v = F.normalize(v[:, :, :n], dim=1)
    # A singular vector's sign is arbitrary (LAPACK, cuSOLVER and MAGMA may differ) and the RBF relations
    # between blocks depend on it: fix it, so that the loss is a function of the features alone.
    top = v.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(v.gather(1, top)).detach()
    return F.normalize(s[:, :n], dim=1), v * torch.where(sign == 0, torch.ones_like(sign), sign)


def align_to(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """(B, W, k): for each teacher vector, the student vector most collinear with it (largest |cos|),
    with the sign that makes the cosine positive."""
    cos = v_s.transpose(-2, -1) @ v_t  # (B, k_s, k_t)
    best = cos.abs().amax(dim=1, keepdim=True)
    pick = torch.where(cos.abs() == best, torch.sign(cos), torch.zeros_like(cos))
    return v_s @ pick


def rbf(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    """(B, W, W', k): exp(−(v_a − v'_b)² / 8) for every entry pair of two blocks' (scaled) vectors."""
    return torch.exp(-(v[:, :, None, :] - v_prev[:, None, :, :]).pow(2) / 8.0)


def kdsvd_loss(feats_s: list[torch.Tensor], feats_t: list[torch.Tensor], k: int = 1) -> torch.Tensor:
    """KD-SVD over a list of blocks: the RBF relations of consecutive blocks, student vs teacher."""
    total = feats_s[0].new_zeros((), dtype=torch.float32)
    prev = None
    for f_s, f_t in zip(feats_s, feats_t):
        f_s, f_t = same_size(f_s, f_t)
        s_t, v_t = truncated_svd(f_t, k)
        _, v_s = truncated_svd(f_s, k + 3)
        v_s = align_to(v_s, v_t)
        v_t, v_s = v_t * s_t[:, None, :], v_s * s_t[:, None, :]
        if prev is not None:
            diff = (rbf(v_s, prev[0]) - rbf(v_t, prev[1]).detach()).pow(2)
            total = total + _finite(diff).sum()
        prev = (v_s, v_t)
    return total / feats_s[0].shape[0]


@dataclass(frozen=True)
class KDSVDOptions:
    k: int = option(1, integer(1), "teacher singular vectors kept per block (the student keeps k + 3)")
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(1.0, WEIGHT, "weight of the SVD relation loss")


@register("kdsvd")
class KDSVD(FeatureDistiller):
    """KD-SVD on every matched block: ce_weight · CE + feat_weight · relations of consecutive blocks."""

    Options = KDSVDOptions
    paper = "Lee et al., Self-supervised Knowledge Distillation Using Singular Value Decomposition, ECCV 2018"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        if self.num_blocks < 2:
            raise BlockKDError("method kdsvd relates consecutive blocks, but this student and teacher match into "
                               "only one block")

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_kdsvd": o.feat_weight * kdsvd_loss(s_feats, t_feats, o.k),
        }
