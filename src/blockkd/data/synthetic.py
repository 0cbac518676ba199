"""A deterministic, learnable synthetic dataset for tests and smoke runs (no files, no network).

Each class has a fixed smooth random template (low-resolution noise upsampled, so it survives the
random-crop shifts of augmentation); a sample is its class template plus pixel noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BlockKDError
from .common import SYNTHETIC, generator
from .device_loader import ArrayData

NOISE_STD = 40.0  # pixel noise (0..255 scale): enough that a sample is not its template, little enough to learn


def _images(templates: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = len(templates)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *templates.shape[1:]), generator=gen) * NOISE_STD
    return (templates[labels] + noise).round_().clamp_(0, 255).to(torch.uint8), labels


def load(cfg: dict) -> ArrayData:
    """``train_size``/``test_size`` images of ``channels`` x ``image_size``² in ``num_classes`` classes."""
    k, c, s = int(cfg["num_classes"]), int(cfg["channels"]), int(cfg.get("image_size") or 32)
    if k < 2 or c < 1 or s < 4 or cfg["train_size"] < 1 or cfg["test_size"] < 1:
        raise BlockKDError(f"synthetic data needs num_classes>=2, channels>=1, image_size>=4 and positive sizes; "
                           f"got {k}, {c}, {s}, {cfg['train_size']}, {cfg['test_size']}")
    gen = generator(k, c, s, SYNTHETIC)  # the data depend only on their shape, never on the run's seed
    coarse = torch.rand((k, c, 4, 4), generator=gen) * 255
    templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    train_x, train_y = _images(templates, int(cfg["train_size"]), gen)
    test_x, test_y = _images(templates, int(cfg["test_size"]), gen)
    pixels = train_x.transpose(0, 1).reshape(c, -1).double() / 255
    return ArrayData(train_x, train_y, test_x, test_y, num_classes=k,
                     mean=tuple(pixels.mean(1).tolist()), std=tuple(pixels.std(1).clamp_min(1e-3).tolist()),
                     padding=max(1, s // 8), flip=True, classes=[f"class_{i}" for i in range(k)])
