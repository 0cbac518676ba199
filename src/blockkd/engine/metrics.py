"""The extra metrics a dataset may ask evaluation to report (``DataBundle.metric_names``: GLUE's F1 and
Matthews correlation), computed from all test predictions after they are gathered.

Why here, beside evaluation: they are evaluation's job; a dataset only names them.
"""
from __future__ import annotations

from typing import Sequence

import torch


def f1_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """F1 (%) of the positive class 1 (GLUE's MRPC and QQP)."""
    tp = int(((pred == 1) & (y == 1)).sum())
    fp, fn = int(((pred == 1) & (y != 1)).sum()), int(((pred != 1) & (y == 1)).sum())
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Matthews correlation (x100; GLUE's CoLA), the multi-class form (sklearn's); 0 when undefined."""
    k = int(max(pred.max().item() if pred.numel() else 0, y.max().item() if y.numel() else 0)) + 1
    cm = torch.bincount(y.long() * k + pred.long(), minlength=k * k).view(k, k).double()
    t, p, c, s = cm.sum(1), cm.sum(0), cm.trace(), cm.sum()
    num = c * s - (t * p).sum()
    den = ((s * s - (p * p).sum()) * (s * s - (t * t).sum())).sqrt()
    return 100.0 * float(num / den) if den > 0 else 0.0


METRICS = {"f1": f1_score, "matthews": matthews}


def compute_metrics(names: Sequence[str], pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {n: METRICS[n](pred, y) for n in names}
