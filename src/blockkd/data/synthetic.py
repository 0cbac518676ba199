"""A deterministic, learnable synthetic dataset for tests and smoke runs (no files, no network).

Each class has a fixed smooth random template (low-resolution noise upsampled, so it survives the
random-crop shifts of augmentation); a sample is its class template plus pixel noise.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..schema import OptionError, integer, option
from .common import SYNTHETIC, generator
from .device_loader import ArrayData

MAX_BYTES = 1 << 33  # generated in host memory as float32: refuse sizes that cannot fit before trying


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    num_classes: int = option(10, integer(2), "number of classes")
    channels: int = option(3, integer(1), "image channels")
    image_size: int = option(32, integer(4), "image side in pixels")
    train_size: int = option(512, integer(1), "training images")
    test_size: int = option(256, integer(1), "test images")

    def check(self) -> None:
        images = self.train_size + self.test_size + self.num_classes  # class templates too
        size = 4 * images * self.channels * self.image_size ** 2
        if size > MAX_BYTES:
            raise OptionError("train_size", f"{self.train_size}+{self.test_size} images of {self.channels}x"
                                            f"{self.image_size}x{self.image_size} in {self.num_classes} classes would "
                                            f"need {size / 2**30:.3g} GiB; the limit is {MAX_BYTES >> 30} GiB: lower "
                                            f"train_size, test_size, image_size or num_classes")

NOISE_STD = 40.0  # pixel noise (0..255 scale): enough that a sample is not its template, little enough to learn


def _images(templates: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    k = len(templates)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    noise = torch.randn((n, *templates.shape[1:]), generator=gen) * NOISE_STD
    return (templates[labels] + noise).round_().clamp_(0, 255).to(torch.uint8), labels


def load(cfg: dict) -> ArrayData:
    """``train_size``/``test_size`` images of ``channels`` x ``image_size``² in ``num_classes`` classes."""
    k, c, s = int(cfg["num_classes"]), int(cfg["channels"]), int(cfg["image_size"])
    gen = generator(k, c, s, SYNTHETIC)  # the data depend only on their shape, never on the run's seed
    coarse = torch.rand((k, c, 4, 4), generator=gen) * 255
    templates = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    train_x, train_y = _images(templates, int(cfg["train_size"]), gen)
    test_x, test_y = _images(templates, int(cfg["test_size"]), gen)
    pixels = train_x.transpose(0, 1).reshape(c, -1).double() / 255
    return ArrayData(train_x, train_y, test_x, test_y, num_classes=k,
                     mean=tuple(pixels.mean(1).tolist()), std=tuple(pixels.std(1).clamp_min(1e-3).tolist()),
                     padding=max(1, s // 8), flip=True, classes=[f"class_{i}" for i in range(k)])
