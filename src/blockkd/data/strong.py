"""A strongly augmented view of a uint8 image batch, made on the device: RandAugment + Cutout.

Why: methods that compare a teacher and a student on a second, strongly augmented view of each sample (MLKD)
need it from the same input pipeline as the first view; per-image PIL work in DataLoader workers would
double the cost that :mod:`blockkd.data.device_loader` removed. This is the FixMatch-style RandAugment of
MLKD's data code (``mdistiller/dataset/cifar100.py`` ``RandAugment(2, 10)``): each image gets 2 operations
drawn uniformly with replacement from 14, each at a magnitude drawn uniformly in its range (the nominal
magnitude 10 is unused there too), then a Cutout of a random square up to half the image side filled with
grey. The operations follow PIL's definitions (enhance = blend with a degenerate image, affine maps with
zero fill and nearest sampling), vectorised over the images that drew each operation; the tests compare them
with PIL's: colour operations within one grey level, histogram, bit and translation operations exact,
rotations and shears apart from exact ties of the nearest-neighbour sampling.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY = (125.0, 123.0, 114.0)  # the authors' Cutout fill (RGB); single-channel images use 121


def _u(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's 'L' conversion (ITU-R 601-2 luma) of an RGB batch; a one-channel batch as it is. (B, 1, H, W)."""
    if x.shape[1] != 3:
        return x[:, :1]
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return degenerate + m.view(-1, 1, 1, 1) * (x - degenerate)


def auto_contrast(x, m):
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    return torch.where(hi > lo, ((x - lo) * scale).clamp(0, 255), x)


def brightness(x, m):
    return _blend(torch.zeros_like(x), x, m)


def color(x, m):
    return _blend(_gray(x).expand_as(x), x, m)


def contrast(x, m):
    mean = _gray(x).mean((1, 2, 3), keepdim=True).add(0.5).floor()
    return _blend(mean.expand_as(x), x, m)


def equalize(x, m):
    """PIL's ImageOps.equalize per channel: a lookup table from the cumulative histogram."""
    b, c, h, w = x.shape
    v = x.round().clamp(0, 255).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, v, torch.ones_like(v, dtype=torch.float))
    last = hist.gather(1, (v.amax(1, keepdim=True)))  # the count of the highest value present
    step = ((h * w - last) / 255).floor()
    cum = hist.cumsum(1) - hist  # pixels strictly below each value
    lut = ((cum + (step / 2).floor()) / step.clamp_min(1)).floor().clamp(0, 255)
    out = lut.gather(1, v).float()
    return torch.where(step > 0, out, v.float()).view(b, c, h, w)


def identity(x, m):
    return x


def posterize(x, m):
    shift = (8 - m.floor().clamp(1, 8)).long().view(-1, 1, 1, 1)
    return ((x.round().clamp(0, 255).long() >> shift) << shift).float()


def sharpness(x, m):
    """Blend with PIL's SMOOTH filter (3x3, centre 5, /13); the border pixels keep their value."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device)
    k[1, 1] = 5.0
    smooth = F.conv2d(x, (k / 13).expand(c, 1, 3, 3), groups=c).round()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, m)


def solarize(x, m):
    return torch.where(x < m.view(-1, 1, 1, 1), x, 255.0 - x)


def _affine(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Sample x at ``a`` (B, 2, 3) applied to each output pixel centre (pixel units), as PIL's
    Image.transform(AFFINE): nearest neighbour, zero outside."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5,
                            indexing="ij")
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = pts @ a.transpose(1, 2)  # (B, HW, 2) input coordinates
    grid = torch.stack([src[..., 0] * 2 / w - 1, src[..., 1] * 2 / h - 1], -1).view(b, h, w, 2)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _matrix(m: torch.Tensor, *rows) -> torch.Tensor:
    return torch.stack([torch.stack([torch.as_tensor(v, device=m.device).expand_as(m).float() for v in r], -1)
                        for r in rows], 1)


def rotate(x, m):
    h, w = x.shape[2:]
    angle = -m * math.pi / 180  # PIL's Image.rotate(v): v degrees counter-clockwise
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = w / 2, h / 2
    return _affine(x, _matrix(m, (cos, sin, cx - cos * cx - sin * cy), (-sin, cos, cy + sin * cx - cos * cy)))


def shear_x(x, m):
    return _affine(x, _matrix(m, (1.0, m, 0.0), (0.0, 1.0, 0.0)))


def shear_y(x, m):
    return _affine(x, _matrix(m, (1.0, 0.0, 0.0), (m, 1.0, 0.0)))


def translate_x(x, m):
    return _affine(x, _matrix(m, (1.0, 0.0, m * x.shape[3]), (0.0, 1.0, 0.0)))


def translate_y(x, m):
    return _affine(x, _matrix(m, (1.0, 0.0, 0.0), (0.0, 1.0, m * x.shape[2])))


# (operation, lowest magnitude, highest magnitude): the authors' augment_list
OPS = [(auto_contrast, 0, 1), (brightness, 0.05, 0.95), (color, 0.05, 0.95), (contrast, 0.05, 0.95),
       (equalize, 0, 1), (identity, 0, 1), (posterize, 4, 8), (rotate, -30, 30), (sharpness, 0.05, 0.95),
       (shear_x, -0.3, 0.3), (shear_y, -0.3, 0.3), (solarize, 0, 256), (translate_x, -0.3, 0.3),
       (translate_y, -0.3, 0.3)]


def cutout(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Grey out a square of side v·W (v uniform in [0, 0.5]) at a uniform position, clipped to the image."""
    b, c, h, w = x.shape
    v = _u(b, 0, 0.5, gen) * w
    x0 = (_u(b, 0, w, gen) - v / 2).clamp_min(0).floor()
    y0 = (_u(b, 0, h, gen) - v / 2).clamp_min(0).floor()
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    inside = ((cols >= x0.view(-1, 1, 1)) & (cols <= (x0 + v).clamp(max=w).view(-1, 1, 1))
              & (rows >= y0.view(-1, 1, 1)) & (rows <= (y0 + v).clamp(max=h).view(-1, 1, 1)) & (v > 0).view(-1, 1, 1))
    fill = torch.tensor(GREY if c == 3 else (121.0,) * c, device=x.device).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), fill, x)


def rand_augment(x: torch.Tensor, gen: torch.Generator, n: int = 2) -> torch.Tensor:
    """The strong view of a uint8 (B, C, H, W) batch, as float32 pixel values in [0, 255] (what
    :class:`blockkd.data.common.Normalize` takes). Every draw comes from ``gen`` (on x's device)."""
    y = x.float()
    b = y.shape[0]
    for _ in range(n):
        pick = torch.randint(len(OPS), (b,), generator=gen, device=gen.device)
        frac = torch.rand(b, generator=gen, device=gen.device)
        for k, (op, lo, hi) in enumerate(OPS):
            rows = (pick == k).nonzero().squeeze(1)
            if rows.numel():
                y[rows] = op(y[rows], lo + (hi - lo) * frac[rows]).clamp(0, 255)
    return cutout(y, gen).round()
