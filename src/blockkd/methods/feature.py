"""What the feature-based methods (FitNets, AT, SP, RKD, PKT, NST, KD-SVD) share: where features come from.

Why one place: every feature method reads its feature points off the block views of ``blockkd.blocks``
(never per-model code), so that it works on any pair the views work on (CIFAR zoo, torchvision, timm).
Methods that compare maps block by block (``matched = True``) use ``match``'ed views, whose boundaries
sit at resolutions both networks share; methods that only need the penultimate embedding use each
network's own natural stages, so they also serve pairs that share no resolution.

Known differences from mdistiller's ``feats`` (post-ReLU stage outputs, entry 0 the stem): on CIFAR
ResNets the points are the same (stem + layer1, layer2, layer3; the embedding is the classifier's input).
Elsewhere the last block runs up to the head's pooling, so it includes what a model applies before it
(WRN's final BN + ReLU, MobileNetV2's 1x1 conv to 1280, ShuffleNetV2's final conv), where mdistiller
takes the last stage's raw output; VGG's block0 is a block of its own here (mdistiller's stem) and
block3 joins block4; ShuffleNet students match resnet32x4 / wrn_40_2 in two blocks, not three.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from ..blocks import match, split
from ..errors import BlockKDError
from .base import Distiller


def embedding(feat: torch.Tensor) -> torch.Tensor:
    """The penultimate embedding: the last block's output pooled as the head pools it (global average)."""
    if feat.dim() == 4:
        return feat.mean(dim=(2, 3))
    if feat.dim() == 2:
        return feat
    raise BlockKDError(f"cannot pool a last-block output of shape {tuple(feat.shape)} into an embedding")


def same_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller of their spatial sizes (adaptive average pooling of the larger one)."""
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    h, w = min(hs, ht), min(ws, wt)
    if (hs, ws) != (h, w):
        f_s = F.adaptive_avg_pool2d(f_s, (h, w))
    if (ht, wt) != (h, w):
        f_t = F.adaptive_avg_pool2d(f_t, (h, w))
    return f_s, f_t


def check_pooling_head(view, shape: tuple[int, ...], method: str, side: str) -> None:
    """Refuse a head that is not global average pooling then a classifier: SDD and SimKD run it on other maps."""
    param = next(view.head.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type == "meta":  # shapes only (FLOP counting): no values to compare
        return
    f = torch.randn(2, *shape, device=device)
    was = view.head.training
    view.head.eval()
    with torch.no_grad():
        ok = torch.allclose(view.run_head(f), view.run_head(f.mean((2, 3), keepdim=True)), atol=1e-4)
    view.head.train(was)
    if not ok:
        raise BlockKDError(f"method {method} runs the {side}'s head on other feature maps, but that head is not "
                           f"global average pooling followed by a classifier")


def require_maps(name: str, student_shapes, teacher_shapes) -> None:
    """One line, not a shape error deep in a conv, where a method that compares feature maps meets blocks
    that output tokens (text, ViT) or vectors."""
    for side, shapes in (("student", student_shapes), ("teacher", teacher_shapes)):
        bad = [s for s in shapes if len(s) != 3]
        if bad:
            raise BlockKDError(f"method {name} needs convolutional feature maps (C, H, W) at every block, "
                               f"but the {side}'s blocks output {bad[0]}")


class FeatureDistiller(Distiller):
    """A distiller reading student and teacher features from block views.

    ``matched``: block-for-block views (``blocks.match``) or each network's natural stages (``blocks.split``).
    ``needs_maps``: every block output must be a (C, H, W) feature map (the method refuses other models).
    ``needs_embedding``: the last block's output must pool into an embedding ((C, H, W) or (C,)).
    After construction ``student_shapes`` / ``teacher_shapes`` hold each block's output shape.
    """

    matched: ClassVar[bool] = True
    needs_maps: ClassVar[bool] = True
    needs_embedding: ClassVar[bool] = False

    def __init__(self, student, teacher, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, teacher, options, input_shape)
        name = type(self).__name__
        if self.teacher is None:
            raise BlockKDError(f"method {name} needs a teacher")
        if self.matched:
            views = match(student, self.teacher, self.input_shape)
        else:
            views = (split(student, input_shape=self.input_shape), split(self.teacher, input_shape=self.input_shape))
        # A plain tuple: the views share the models' modules and must not be registered a second time.
        self._views = views
        self.student_shapes = views[0].probe(self.input_shape)
        self.teacher_shapes = views[1].probe(self.input_shape)
        if self.needs_maps:
            require_maps(name, self.student_shapes, self.teacher_shapes)
        if self.needs_embedding:
            for side, shapes in (("student", self.student_shapes), ("teacher", self.teacher_shapes)):
                if len(shapes[-1]) not in (1, 3):
                    raise BlockKDError(f"method {name} pools the last block's output into an embedding, but the "
                                       f"{side}'s last block outputs {shapes[-1]} (expected (C, H, W) or (C,))")

    @property
    def num_blocks(self) -> int:
        return len(self._views[0].blocks)

    def features(self, x: torch.Tensor):
        """``(student block outputs, student logits, teacher block outputs, teacher logits)``.

        The teacher runs without autograd; its features are targets.
        """
        s_feats, logits = self._views[0].features(x)
        with torch.no_grad():
            t_feats, t_logits = self._views[1].features(x)
        return s_feats, logits, t_feats, t_logits
