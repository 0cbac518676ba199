"""Connectors C_i: map a student block's output into the teacher's feature space at that block.

Why a module of its own: the stepping-stones of Block-KD need one per block, and any feature-based
method (FitNets, ...) needs the same thing. Shapes come from probing both networks once.

:func:`build_connectors` picks the connector from the probed shapes: feature maps ``(C, H, W)`` on both
sides get :class:`Connector` (its ``kind`` of conv + BN); tokens ``(L, D)`` on both sides (transformers)
get :class:`TokenConnector` (Linear + LayerNorm); a feature map meeting ViT tokens gets
:class:`MapToTokens` or :class:`TokensToMap`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import BlockKDError
from ..registry import Registry

# Feature-map connectors by name: the layers after resampling, as (kernel, relu after BN) per conv, each conv
# followed by BN. ``register_connector("conv5x5_bn", [(5, False)])`` adds one for every method that takes
# a ``connector`` option (Block-KD, FitNets).
CONNECTORS: Registry[list[tuple[int, bool]]] = Registry("connector")
CONNECTORS.register("conv1x1_bn", [(1, False)])
CONNECTORS.register("conv3x3_bn", [(3, False)])
CONNECTORS.register("conv1x1_bn_relu", [(1, True)])
# A two-layer adapter: a 3x3 conv + BN + ReLU at the teacher's width, then a 1x1 conv + BN.
CONNECTORS.register("conv3x3_bn_relu_conv1x1_bn", [(3, True), (1, False)])


def register_connector(name: str, layers: list[tuple[int, bool]]) -> None:
    """A feature-map connector kind: ``layers`` = [(kernel size, ReLU after its BN), ...]."""
    CONNECTORS.register(name, [(int(k), bool(relu)) for k, relu in layers])


class Connector(nn.Module):
    """Resample (if spatial sizes differ) + conv + BN from (c_in, h_in, w_in) to (c_out, h_out, w_out).

    Resampling is done on the cheaper side of the conv: pooling before it when the student's map is
    larger (adaptive average pooling), bilinear upsampling after it when the student's map is smaller.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], kind: str = "conv1x1_bn"):
        super().__init__()
        (c_in, *self.in_size), (c_out, *self.out_size) = in_shape, out_shape
        layers: list[nn.Module] = []
        for j, (k, relu) in enumerate(CONNECTORS.get(kind)):
            conv = nn.Conv2d(c_in if j == 0 else c_out, c_out, k, padding=k // 2, bias=False)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            layers += [conv, nn.BatchNorm2d(c_out)] + ([nn.ReLU(inplace=True)] if relu else [])
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(self.out_size)
        if tuple(x.shape[-2:]) == size:
            return self.proj(x)
        if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
            return self.proj(F.adaptive_avg_pool2d(x, size))
        return F.interpolate(self.proj(x), size=size, mode="bilinear", align_corners=False)


def _grid(length: int, prefix: int | None, side: str) -> int:
    """The side of the square patch grid of ``length`` tokens after ``prefix`` leading tokens."""
    if prefix is None:
        raise BlockKDError(f"the {side}'s {length} tokens form no patch grid (text), so they cannot be resampled "
                           f"or reshaped into a feature map")
    g = math.isqrt(max(length - prefix, 0))
    if g < 1 or g * g != length - prefix:
        raise BlockKDError(f"the {side}'s {length} tokens after {prefix} prefix tokens are not a square patch grid")
    return g


def resample_tokens(x: torch.Tensor, prefix_in: int | None, prefix_out: int | None, length_out: int) -> torch.Tensor:
    """Tokens ``(B, L, D)`` brought to ``length_out`` tokens: the patch grid resized bilinearly, the prefix
    tokens kept (a missing one is the mean of the patch tokens; extra ones are dropped; a teacher with more
    prefix tokens than the student gets copies of the student's first, its class token)."""
    if x.shape[1] == length_out and prefix_in == prefix_out:
        return x
    g_in, g_out = _grid(x.shape[1], prefix_in, "student"), _grid(length_out, prefix_out, "teacher")
    prefix, patches = x[:, :prefix_in], x[:, prefix_in:]
    if g_in != g_out:
        grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], g_in, g_in)
        grid = F.interpolate(grid, size=(g_out, g_out), mode="bilinear", align_corners=False)
        patches = grid.flatten(2).transpose(1, 2)
    if prefix_out:
        first = prefix[:, :1] if prefix_in else patches.mean(1, keepdim=True)
        prefix = torch.cat([prefix[:, :prefix_out], first.expand(-1, max(prefix_out - prefix_in, 0), -1)], 1)
        return torch.cat([prefix, patches], 1)
    return patches


class TokenConnector(nn.Module):
    """Tokens to tokens, per token: ``Linear(D_s, D_t)`` + ``LayerNorm(D_t)``.

    Why: a transformer layer reads a normalised token stream, and a per-token linear map is the
    transformer analogue of the CNNs' 1x1 conv + BN. Differing token counts (ViTs with other patch sizes)
    are resampled first (:func:`resample_tokens`); text tokens must already agree (same tokenizer), and
    follow each batch's (padded) length.
    """

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int], prefix_in: int | None = None,
                 prefix_out: int | None = None):
        super().__init__()
        (l_in, d_in), (self.length, d_out) = in_shape, out_shape
        if l_in != self.length or prefix_in != prefix_out:
            _grid(l_in, prefix_in, "student"), _grid(self.length, prefix_out, "teacher")
        self.prefix_in, self.prefix_out = prefix_in, prefix_out
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prefix_in is None and self.prefix_out is None:  # text: both sides have the batch's own length
            return self.norm(self.proj(x))
        return self.norm(self.proj(resample_tokens(x, self.prefix_in, self.prefix_out, self.length)))


class MapToTokens(nn.Module):
    """A feature map ``(C, H, W)`` to ViT tokens ``(L, D)``: the map pooled (or bilinearly upsampled) to the
    teacher's patch grid, a per-position ``Linear(C, D)`` (a 1x1 conv) for the patch tokens, the same
    linear map of the globally pooled map for each prefix (class, distillation) token, then ``LayerNorm(D)``.
    """

    def __init__(self, in_shape: tuple[int, int, int], out_shape: tuple[int, int], prefix_out: int | None):
        super().__init__()
        (c_in, _, _), (length, d_out) = in_shape, out_shape
        self.grid = _grid(length, prefix_out, "teacher")
        self.prefix = prefix_out
        self.proj = nn.Linear(c_in, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.grid, self.grid)
        if tuple(x.shape[-2:]) != size:
            x = (F.adaptive_avg_pool2d(x, size) if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
                 else F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        tokens = x.flatten(2).transpose(1, 2)
        if self.prefix:
            tokens = torch.cat([x.mean((2, 3))[:, None].expand(-1, self.prefix, -1), tokens], 1)
        return self.norm(self.proj(tokens))


class TokensToMap(nn.Module):
    """ViT tokens ``(L, D)`` to a feature map ``(C, H, W)``: the prefix tokens dropped, the patch tokens
    reshaped to their grid ``(D, g, g)``, then a :class:`Connector` (resample + conv + BN of ``kind``)."""

    def __init__(self, in_shape: tuple[int, int], out_shape: tuple[int, int, int], prefix_in: int | None,
                 kind: str = "conv1x1_bn"):
        super().__init__()
        length, d_in = in_shape
        self.grid, self.prefix = _grid(length, prefix_in, "student"), prefix_in
        self.conv = Connector((d_in, self.grid, self.grid), out_shape, kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, self.prefix:]
        return self.conv(patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.grid, self.grid))


def build_connector(in_shape, out_shape, kind: str = "conv1x1_bn", prefix_tokens=(None, None)) -> nn.Module:
    """The connector from a student block's output shape to the teacher's (see the module docstring).

    ``prefix_tokens`` = (student's, teacher's) ``Blocks.prefix_tokens``: for ViT tokens, how many leading
    tokens precede the patch grid; None for maps and text. ``kind`` chooses the conv where the teacher
    side is a feature map.
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    p_in, p_out = prefix_tokens
    if len(in_shape) == 3 and len(out_shape) == 3:
        return Connector(in_shape, out_shape, kind)
    if len(in_shape) == 2 and len(out_shape) == 2:
        return TokenConnector(in_shape, out_shape, p_in, p_out)
    if len(in_shape) == 3 and len(out_shape) == 2:
        return MapToTokens(in_shape, out_shape, p_out)
    if len(in_shape) == 2 and len(out_shape) == 3:
        return TokensToMap(in_shape, out_shape, p_in, kind)
    raise BlockKDError(f"no connector from features of shape {in_shape} to {out_shape}: expected feature maps "
                       f"(C, H, W) or tokens (L, D)")


def build_connectors(student_shapes, teacher_shapes, kind: str = "conv1x1_bn", *,
                     prefix_tokens=(None, None)) -> nn.ModuleList:
    """One connector per block, from the probed output shapes of both sides ((C, H, W) or (L, D))."""
    return nn.ModuleList(build_connector(s, t, kind, prefix_tokens) for s, t in zip(student_shapes, teacher_shapes))
