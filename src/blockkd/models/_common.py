"""Weight initialisation shared by the zoo.

Why: loading a public teacher needs only the keys, but a student trained from scratch must start from
the same initialisation as in RepDistiller/mdistiller for accuracies to be comparable.
"""
from __future__ import annotations

import torch.nn as nn


def init_weights(model: nn.Module, *, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias, BatchNorm weight 1 / bias 0; Linear weights
    ~ N(0, ``linear_std``) when given (else PyTorch's default), Linear bias 0 when ``zero_linear_bias``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias:
                nn.init.zeros_(m.bias)
