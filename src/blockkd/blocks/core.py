"""The block view of a classifier: ``Blocks`` (stages + head), the splitter registry and ``split``.

Why a view and not a copy: Block-KD runs the student's first blocks, a connector, then the teacher's
last blocks. The blocks must be the models' own modules so that training the view trains the model and
checkpoints of the model stay the only state.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn as nn

from ..errors import BlockKDError

Splitter = Callable[[nn.Module], "tuple[list[nn.Module], nn.Module]"]

# Model class (or its "module.QualName", so that e.g. torchvision need not be imported) -> splitter.
_SPLITTERS: dict[type | str, Splitter] = {}

HOW_TO_REGISTER = ("register a splitter for it: @blockkd.blocks.register_splitter({cls}) on "
                   "fn(model) -> ([stage1, stage2, ...], head), whose stages run in order then the head "
                   "equal model(x)")


class Blocks(nn.Module):
    """``blocks`` (stages; the first includes the stem) then ``head`` (pool, flatten, classifier).

    Calling it equals calling the model it came from; the modules are that model's own.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        if not blocks:
            raise BlockKDError("a Blocks view needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def features(self, x: torch.Tensor, *, preact: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's output and the logits, from one forward pass.

        ``preact=True``: each block's output before its final ReLU instead (see :meth:`preact_points`);
        the logits are unchanged.
        """
        if preact:
            return self.preact_features(x)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats, self.head(x)

    def preact_points(self, input_shape: Sequence[int] | None = None) -> list:
        """Per block, its pre-ReLU point (a :class:`blockkd.blocks.preact.PreactPoint`: the final ``nn.ReLU``
        call and the BatchNorm before it) or None where the block does not end with an ``nn.ReLU`` module
        (its output is then its own pre-ReLU feature). Found once, by one probe forward at ``input_shape``
        (default (3, 32, 32)), in eval mode; every module's mode is restored.
        """
        cached = self.__dict__.get("_preact_points")
        if cached is not None:
            return cached
        from .preact import find_point

        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), torch.empty(0))
        shape = tuple(input_shape) if input_shape is not None else (3, 32, 32)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        points = []
        try:
            x = torch.zeros(2, *shape, device=tensor.device, dtype=tensor.dtype)
            for block in self.blocks:
                points.append(find_point(block, x))
                with torch.no_grad():
                    x = block(x)
        finally:
            for m, training in modes:
                m.training = training
        self.__dict__["_preact_points"] = points
        return points

    def preact_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's output before its final ReLU (the output itself where it has none) and the logits,
        from one forward pass; ``block output == relu(pre-ReLU)`` exactly where a block ends with a ReLU."""
        from .preact import capture

        points = self.preact_points(tuple(x.shape[1:]))
        feats = []
        with capture(points) as (slots, start):
            for i, block in enumerate(self.blocks):
                start(i)
                x = block(x)
                feats.append(x if points[i] is None else slots[i])
        return feats, self.head(x)

    @torch.no_grad()
    def probe(self, input_shape: Sequence[int], batch_size: int = 2) -> list[tuple[int, ...]]:
        """Each block's output shape without the batch dimension ((C, H, W) for CNNs) at ``input_shape``.

        One dummy forward in eval mode on the view's device; every module's train/eval mode is restored.
        """
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), torch.empty(0))
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            feats, _ = self.features(torch.zeros(batch_size, *input_shape, device=tensor.device, dtype=tensor.dtype))
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BlockKDError(f"cannot run the model on inputs of shape {tuple(input_shape)}: {msg}") from None
        finally:
            for m, training in modes:
                m.training = training
        return [tuple(f.shape[1:]) for f in feats]

    def regroup(self, ends: Sequence[int]) -> "Blocks":
        """A view whose block i chains the current blocks ``ends[i-1]:ends[i]`` (``ends[-1] == len(self)``)."""
        ends = list(ends)
        if not ends or ends[-1] != len(self) or any(a >= b for a, b in zip([0] + ends, ends)):
            raise BlockKDError(f"block ends {ends} must increase strictly and end at {len(self)}")
        groups = [list(self.blocks[a:b]) for a, b in zip([0] + ends, ends)]
        return Blocks([g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups], self.head)


def balanced_ends(k: int, n: int) -> list[int]:
    """Ends of n consecutive groups of k items, as even as possible; the earlier groups take the extras.

    Why earlier: shallow stages are small and cheap, deep ones carry the semantics worth aligning.
    """
    return [math.ceil((i + 1) * k / n) for i in range(n)]


def register_splitter(model_class: type | str) -> Callable[[Splitter], Splitter]:
    """Decorator: ``fn(model) -> (list_of_stage_modules, head)`` splits instances of ``model_class``.

    Lookup follows the model's class MRO, so subclasses inherit it. ``model_class`` may also be the
    dotted ``"module.QualName"`` of a class, to register without importing its library, or ``"package.*"``
    for every class of a package (``"timm.*"``), consulted after the exact classes of the whole MRO.
    """

    def deco(fn: Splitter) -> Splitter:
        _SPLITTERS[model_class] = fn
        return fn

    return deco


def find_splitter(model: nn.Module) -> Splitter | None:
    """The splitter registered for the nearest class in ``type(model).__mro__``, else for its package."""
    mro = type(model).__mro__
    for cls in mro:
        for key in (cls, f"{cls.__module__}.{cls.__qualname__}"):
            if key in _SPLITTERS:
                return _SPLITTERS[key]
    return next((_SPLITTERS[k] for k in (f"{c.__module__.partition('.')[0]}.*" for c in mro) if k in _SPLITTERS), None)


def _default_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels of the first Conv2d, 64, 64): large enough that the last stage stays above 1x1."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3, 64, 64)


def natural(model: nn.Module, input_shape: Sequence[int] | None = None) -> Blocks:
    """The model's natural stages: its registered splitter, else the torch.fx fallback."""
    if isinstance(model, Blocks):
        return model
    splitter = find_splitter(model)
    if splitter is None:
        from .fx import fx_split

        try:
            stages, head = fx_split(model, tuple(input_shape or _default_input_shape(model)))
        except BlockKDError as e:
            name = type(model).__name__
            raise BlockKDError(f"cannot split {name} into blocks: no splitter is registered for it and the "
                               f"torch.fx fallback failed ({e}); {HOW_TO_REGISTER.format(cls=name)}") from None
    else:
        stages, head = splitter(model)
        if not stages or not all(isinstance(m, nn.Module) for m in [*stages, head]):
            raise BlockKDError(f"the splitter for {type(model).__name__} must return (a non-empty list of "
                               f"nn.Modules, an nn.Module head)")
    return Blocks(stages, head)


def split(model: nn.Module, n: int | None = None, *, input_shape: Sequence[int] | None = None) -> Blocks:
    """``model`` as ``Blocks``: its natural stages (one per resolution), or ``n`` groups of them.

    ``input_shape`` (C, H, W) is only used by the torch.fx fallback for unregistered models, to find where
    the resolution changes (default: the first conv's channels at 64x64).
    """
    blocks = natural(model, input_shape)
    if n is None:
        return blocks
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(blocks):
        raise BlockKDError(f"cannot split {type(model).__name__} into {n!r} blocks: it has {len(blocks)} "
                           f"natural stages; choose 1 <= n <= {len(blocks)}")
    return blocks if n == len(blocks) else blocks.regroup(balanced_ends(len(blocks), n))


def named_sequence(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``module``'s children in registration order, ModuleLists expanded (``blocks.0``, ``blocks.1`` ...)."""
    out = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{sub}", m) for sub, m in named_sequence(child)]
        else:
            out.append((name, child))
    return out


def _chain(named: Sequence[tuple[str, nn.Module]]) -> nn.Module:
    return named[0][1] if len(named) == 1 else nn.Sequential(OrderedDict((n.replace(".", "_"), m) for n, m in named))


def children_splitter(stage_starts: Sequence[str], head_start: str) -> Splitter:
    """A splitter for models whose forward runs their children in registration order.

    A new stage begins at each child named in ``stage_starts`` and the head at ``head_start``
    (names as in ``named_sequence``), e.g. ``children_splitter(["layer2", "layer3"], "avgpool")``.
    """

    def splitter(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
        named = named_sequence(model)
        names = [n for n, _ in named]
        missing = [s for s in [*stage_starts, head_start] if s not in names]
        if missing:
            raise BlockKDError(f"{type(model).__name__} has no child {missing[0]!r} to split at; children: "
                               f"{', '.join(names)}")
        cuts = [0, *(names.index(s) for s in stage_starts), names.index(head_start)]
        return [_chain(named[a:b]) for a, b in zip(cuts, cuts[1:])], _chain(named[cuts[-1]:])

    return splitter
