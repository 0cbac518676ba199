"""Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

A trained regressor maps the student's hint-block output onto the teacher's (the "guided layer" and
the "hint"), and the student is pulled towards it with an L2 loss, next to the usual cross-entropy:

    L = ce_weight · CE(y^S, y) + feat_weight · mean((R(F^S_h) − F^T_h)²)

Defaults are mdistiller's CIFAR-100 ones (``mdistiller/engine/cfg.py``: CE_WEIGHT 1, FEAT_WEIGHT 100,
HINT_LAYER 2, i.e. the output of the second of three stages); like mdistiller, training is one stage
(no separate hint pre-training as in the paper) and there is no logit-KD term. The regressor is a
``Connector``: 1x1 conv + BN + ReLU at matched resolutions, which is what mdistiller's ``ConvReg``
builds when the sizes agree.

mdistiller's HINT_LAYER 2 indexes its ``feats`` list, whose entry 0 is the stem: on CIFAR ResNets and
WRNs that is the middle of three stages (the default here), on VGG it is block2, the third of the four
blocks the views make (the vgg13_vgg8 recipe sets ``hint_block: 3``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schema import registered, OptionError, integer, option, optional
from .registry import register
from .connectors import CONNECTORS, Connector
from .feature import FeatureDistiller
from .kd import WEIGHT
from .losses import cross_entropy


def hint_loss(regressed: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
    """FitNets' L2 hint loss: the mean squared difference over every element (batch, channels, positions)."""
    return (regressed.float() - hint.float()).pow(2).mean()


@dataclass(frozen=True)
class FitNetOptions:
    ce_weight: float = option(1.0, WEIGHT, "weight of the cross-entropy with the labels")
    feat_weight: float = option(100.0, WEIGHT, "weight of the L2 hint loss")
    hint_block: int | None = option(None, optional(integer(1)), "1-based block whose output is the hint; null: "
                                    "the middle block, (n + 1) // 2 of n (mdistiller's HINT_LAYER 2 on CIFAR nets)")
    connector: str = option("conv1x1_bn_relu", registered(CONNECTORS), "the regressor mapping the student's block "
                            "output onto the teacher's (resampled when the sizes differ)")


@register("fitnet")
class FitNet(FeatureDistiller):
    """FitNets: ce_weight · CE + feat_weight · MSE(regressor(student hint block), teacher hint block)."""

    Options = FitNetOptions
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        n = self.num_blocks
        h = self.opts.hint_block
        if h is not None and h > n:
            raise OptionError("hint_block", f"hint_block must be between 1 and the number of matched blocks ({n}), "
                                            f"got {h}")
        self.hint_index = (h if h is not None else (n + 1) // 2) - 1
        i = self.hint_index
        self.regressor = Connector(self.student_shapes[i], self.teacher_shapes[i], self.opts.connector)

    def forward_train(self, x, y, *, epoch):
        o = self.opts
        s_feats, logits, t_feats, _ = self.features(x)
        i = self.hint_index
        return logits, {
            "loss_ce": o.ce_weight * cross_entropy(logits, y),
            "loss_hint": o.feat_weight * hint_loss(self.regressor(s_feats[i]), t_feats[i]),
        }
