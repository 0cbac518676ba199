"""Cross-entropy only: the student trained alone (also how teachers are trained)."""
from __future__ import annotations

from .registry import register
from .base import Distiller
from .losses import cross_entropy


@register("ce")
class CE(Distiller):
    """Student trained with cross-entropy on the labels alone (no teacher)."""

    needs_teacher = False
    paper = "the student trained alone"

    def __init__(self, student, teacher=None, options=None, input_shape=(3, 32, 32)):
        super().__init__(student, None, options, input_shape)  # a given teacher is ignored, never frozen or saved

    def forward_train(self, x, y, *, epoch):
        logits = self.student_logits(x)
        return logits, {"loss_ce": cross_entropy(logits, y)}
