"""Bound each stepping-stone's pull on the student: its gradient into the student's feature at the stone's
block is rescaled, per step, to at most ``cap`` times the gradient that the rest of the objective sends there.

Why (docs/blockkd.md, "Across architecture families"): a connector ends with BN, so a stone is invariant to
the scale of the student feature it reads, and its gradient into that feature grows as 1 / that scale (and
with the connector's gain: a 3x3 conv on a 2x2 map, 1280 channels into 64). The student's own head has no
such factor. Across families the deepest stone reads the student's last, small, wide map; its pull reached
8x the student's own at that feature and grew as the feature shrank during training, until the student's
updates were the stone's (a collapse of test top-1 in the epoch after the stone warm-up). Same-family pairs
sit near 1x after the first steps, where the bound rarely binds.

:func:`fork` returns two copies of a feature, one for the student's next block or head, one for the
connector; one autograd node receives both gradients at once, so the bound is exact within the step at no
extra backward pass. ``scales`` (a dict) receives each node's applied factor, for the diagnostics.
:func:`forked_features` runs a student's blocks with a fork at each stone's block (Block-KD and its causal-LM
form, :mod:`blockkd.methods.lm_blockkd`).
"""
from __future__ import annotations

import torch


class _Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cap: float, scales: dict | None, key):
        ctx.cap, ctx.scales, ctx.key = cap, scales, key
        return x.clone(), x.clone()  # copies: either may be changed in place downstream

    @staticmethod
    def backward(ctx, g_own: torch.Tensor, g_stone: torch.Tensor):
        own, stone = g_own.float().norm(), g_stone.float().norm()
        # no sync: a tensor factor; 1 where the stone pulls no harder than cap x the rest (or not at all)
        scale = torch.where(stone > ctx.cap * own, ctx.cap * own / stone.clamp_min(1e-30), torch.ones_like(own))
        if ctx.scales is not None:
            ctx.scales[ctx.key] = scale.detach()
        return g_own + g_stone * scale.to(g_stone.dtype), None, None, None


def fork(x: torch.Tensor, cap: float | None, scales: dict | None = None, key=None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the student's copy, the stone's copy) of ``x``; ``cap`` None: both are ``x`` (no bound). The backward
    pass stores its factor as ``scales[key]``."""
    if cap is None or not x.requires_grad:
        return x, x
    return _Fork.apply(x, float(cap), scales, key)


def forked_features(view, x, stone_ids, cap: float | None, scales: dict | None = None
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every block's output of the student's block view ``view`` on the input ``x``, from one forward pass, and
    the last block's output for the student's head. At a block in ``stone_ids`` the list holds the stone's copy
    (:func:`fork`, key: the block's index) and the next block (or the head) gets the student's."""
    feats, h = [], x
    for i in range(len(view.blocks)):
        h = view.run_block(i, h, x)
        h, mine = fork(h, cap, scales, i) if i in stone_ids else (h, h)
        feats.append(mine)
    return feats, h
