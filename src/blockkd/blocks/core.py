"""The block view of a classifier: ``Blocks`` (stages + head), the splitter registry and ``split``.

Why a view and not a copy: Block-KD runs the student's first blocks, a connector, then the teacher's
last blocks. The blocks must be the models' own modules so that training the view trains the model and
checkpoints of the model stay the only state.

Model inputs and input specs are described in :mod:`blockkd.inputs`. Extra per-batch inputs (the contract
every block, splitter and method follows):

* The first block receives ``x`` itself and returns a tensor (the hidden state / feature map); every
  later block, and the head, receive the previous block's tensor. Block outputs are always plain
  tensors, so connectors, ``torch.cat`` and losses treat them alike.
* A block that needs more than the hidden state (a transformer layer needs the attention mask) names
  those inputs in a class or instance attribute ``extra_inputs = ("attention_mask",)``; it is then
  called ``block(h, attention_mask=x["attention_mask"])`` with the values taken from the model input
  ``x`` (names absent from ``x`` are left out, so the block's defaults apply). Blocks without the
  attribute (every CNN stage) are called ``block(h)``, as before.
* Extra inputs are per sample: when a block runs on a batch that stacks ``m`` copies of the input's
  samples (Block-KD's batched stepping-stones), each extra input is repeated ``m`` times along dim 0.
* Groups of blocks (``regroup``) are :class:`Chain` s, which pass each member the extras it names.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import BlockKDError
from ..inputs import batch_size_of, call_model, describe_spec, example_input, is_image_shape
from ..utils import eval_mode
from .fx import fx_split
from .preact import capture, find_point

Splitter = Callable[[nn.Module], "tuple[list[nn.Module], nn.Module] | Blocks"]

# Model class (or its "module.QualName", so that e.g. torchvision need not be imported) -> splitter.
_SPLITTERS: dict[type | str, Splitter] = {}

HOW_TO_REGISTER = ("register a splitter for it: @blockkd.blocks.register_splitter({cls}) on "
                   "fn(model) -> ([stage1, stage2, ...], head), whose stages run in order then the head "
                   "equal model(x)")


def _per_sample(value: Any, batch: int, name: str) -> Any:
    """``value`` repeated along dim 0 to ``batch`` samples (stacked copies of the batch), if a tensor."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] == batch:
        return value
    if batch % value.shape[0]:
        raise BlockKDError(f"extra input {name!r} has {value.shape[0]} samples, the hidden state {batch}: a block "
                           f"can only run on stacked copies of the input's samples")
    return value.repeat(batch // value.shape[0], *([1] * (value.dim() - 1)))


def run_module(module: nn.Module, h: Any, inputs: Any = None) -> Any:
    """``module(h)``, plus as keywords the extra inputs it names in ``extra_inputs``, taken from ``inputs``."""
    names = getattr(module, "extra_inputs", ())
    if not names or not isinstance(inputs, Mapping):
        return module(h)
    batch = h.shape[0] if isinstance(h, torch.Tensor) else batch_size_of(h)
    return module(h, **{k: _per_sample(inputs[k], batch, k) for k in names if inputs.get(k) is not None})


class Chain(nn.Sequential):
    """Consecutive blocks as one block: each member gets the extra inputs it names (see the module docstring)."""

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for m in self for k in getattr(m, "extra_inputs", ())))

    def forward(self, h: Any, **extras: Any) -> Any:
        for m in self:
            h = run_module(m, h, extras)
        return h


class Blocks(nn.Module):
    """``blocks`` (stages; the first includes the stem) then ``head`` (pool, flatten, classifier).

    Calling it equals calling the model it came from; the modules are that model's own.
    ``prefix_tokens`` describes token features ``(B, L, D)`` that come from a patch grid (ViTs): how many
    leading tokens (class, distillation, register) precede the ``L - prefix_tokens`` patch tokens of a
    square grid in row-major order. It is None for feature maps and for text, whose tokens are no grid.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, *, prefix_tokens: int | None = None):
        super().__init__()
        if not blocks:
            raise BlockKDError("a Blocks view needs at least one block")
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.prefix_tokens = prefix_tokens

    def __len__(self) -> int:
        return len(self.blocks)

    def run_block(self, i: int, h: Any, inputs: Any = None) -> torch.Tensor:
        """Block ``i`` on ``h`` (block 0: on the model input), with the extra inputs it needs from ``inputs``."""
        return run_module(self.blocks[i], h, inputs)

    def run_head(self, h: torch.Tensor, inputs: Any = None) -> torch.Tensor:
        return run_module(self.head, h, inputs)

    def forward(self, x: Any) -> torch.Tensor:
        return self.features(x)[1]

    def features(self, x: Any, *, preact: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's output and the logits, from one forward pass on the model input ``x``.

        ``preact=True``: each block's output before its final ReLU instead (see :meth:`preact_points`);
        the logits are unchanged.
        """
        if preact:
            return self.preact_features(x)
        feats, h = [], x
        for i in range(len(self.blocks)):
            h = self.run_block(i, h, x)
            feats.append(h)
        return feats, self.run_head(h, x)

    def preact_points(self, input_shape: Sequence[int] | None = None) -> list:
        """Per block, its pre-ReLU point (a :class:`blockkd.blocks.preact.PreactPoint`: the final ``nn.ReLU``
        call and the BatchNorm before it) or None where the block does not end with an ``nn.ReLU`` module
        (its output is then its own pre-ReLU feature). Found once, by one probe forward at ``input_shape``
        (default (3, 32, 32)), in eval mode; every module's mode is restored.
        """
        cached = self.__dict__.get("_preact_points")
        if cached is not None:
            return cached
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), torch.empty(0))
        shape = tuple(input_shape) if input_shape is not None else (3, 32, 32)
        points = []
        with eval_mode(self):
            x = torch.zeros(2, *shape, device=tensor.device, dtype=tensor.dtype)
            for block in self.blocks:
                points.append(find_point(block, x))
                with torch.no_grad():
                    x = block(x)
        self.__dict__["_preact_points"] = points
        return points

    def preact_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every block's output before its final ReLU (the output itself where it has none) and the logits,
        from one forward pass; ``block output == relu(pre-ReLU)`` exactly where a block ends with a ReLU."""
        points = self.preact_points(tuple(x.shape[1:]))
        feats = []
        with capture(points) as (slots, start):
            for i, block in enumerate(self.blocks):
                start(i)
                x = block(x)
                feats.append(x if points[i] is None else slots[i])
        return feats, self.head(x)

    @torch.no_grad()
    def probe(self, input_shape: Any, batch_size: int = 2) -> list[tuple[int, ...]]:
        """Each block's output shape without the batch dimension ((C, H, W) for CNNs, (L, D) for
        transformers) for the input spec ``input_shape`` (a shape, a mapping of shapes or an example input).

        One dummy forward in eval mode on the view's device; every module's train/eval mode is restored.
        """
        tensor = next(iter(self.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.buffers()), torch.empty(0))
        with eval_mode(self):
            try:
                x = example_input(input_shape, batch_size, device=tensor.device, dtype=tensor.dtype)
                feats, _ = self.features(x)
            except (RuntimeError, ValueError, IndexError, TypeError, AssertionError, AttributeError, KeyError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BlockKDError(f"cannot run the model on inputs {describe_spec(input_shape)}: {msg}") from None
        return [tuple(f.shape[1:]) for f in feats]

    def regroup(self, ends: Sequence[int]) -> "Blocks":
        """A view whose block i chains the current blocks ``ends[i-1]:ends[i]`` (``ends[-1] == len(self)``)."""
        ends = list(ends)
        if not ends or ends[-1] != len(self) or any(a >= b for a, b in zip([0] + ends, ends)):
            raise BlockKDError(f"block ends {ends} must increase strictly and end at {len(self)}")
        groups = [list(self.blocks[a:b]) for a, b in zip([0] + ends, ends)]
        return Blocks([g[0] if len(g) == 1 else Chain(*g) for g in groups], self.head,
                      prefix_tokens=self.prefix_tokens)


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


def natural(model: nn.Module, input_shape: Any = None) -> Blocks:
    """The model's natural stages: its registered splitter, else the torch.fx fallback."""
    if isinstance(model, Blocks):
        return model
    splitter = find_splitter(model)
    if splitter is None:
        shape = tuple(input_shape) if input_shape is not None and is_image_shape(input_shape) else None
        try:
            stages, head = fx_split(model, shape or _default_input_shape(model))
        except BlockKDError as e:
            name = type(model).__name__
            raise BlockKDError(f"cannot split {name} into blocks: no splitter is registered for it and the "
                               f"torch.fx fallback failed ({e}); {HOW_TO_REGISTER.format(cls=name)}") from None
    else:
        out = splitter(model)
        if isinstance(out, Blocks):
            return out
        stages, head = out
        if not stages or not all(isinstance(m, nn.Module) for m in [*stages, head]):
            raise BlockKDError(f"the splitter for {type(model).__name__} must return (a non-empty list of "
                               f"nn.Modules, an nn.Module head)")
    return Blocks(stages, head)


def split(model: nn.Module, n: int | None = None, *, input_shape: Any = None) -> Blocks:
    """``model`` as ``Blocks``: its natural stages (CNNs: one per resolution; transformers: one per layer),
    or ``n`` groups of them.

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
    return named[0][1] if len(named) == 1 else Chain(OrderedDict((n.replace(".", "_"), m) for n, m in named))


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


@torch.no_grad()
def verify_view(model: nn.Module, view: Blocks, x: Any, *, what: str) -> None:
    """Raise BlockKDError unless ``view(x)`` reproduces the model's logits (eval mode; every module's mode is
    restored). Splitters that cut a library's model call it, so a version of the library that builds its
    models differently fails with one line instead of distilling through a wrong view. ``what`` names the
    split in the message ("into its layers", "at its feature_info stages")."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return
    with eval_mode(model):
        try:
            want, got = call_model(model, x), view(x)
            tol = 1e-5 if param.dtype in (torch.float32, torch.float64) else 1e-2
            exact = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=tol)
            why = "the block view's output differs from the model's"
        except Exception as e:  # any failure of the chained view: report it, with what to do
            exact, why = False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if not exact:
        name = type(model).__name__
        raise BlockKDError(f"cannot split {name} {what} ({why}); {HOW_TO_REGISTER.format(cls=name)}")


@torch.no_grad()
def verify_on_tokens(model: nn.Module, view: Blocks, *, first_id: int = 0, pad_ids: bool = False,
                     **extra: Any) -> None:
    """:func:`verify_view` for a Hugging Face text model: a 2 x 8 probe of token ids from ``first_id`` on (past
    an encoder's special tokens), the second row masked after 5 tokens (and, with ``pad_ids``, those ids set to
    the config's pad id); ``extra`` joins the model's keywords (``use_cache=False``). One probe for the encoder
    and the causal-LM splitters."""
    param = next(model.parameters(), None)
    if param is None or param.is_meta:
        return
    gen = torch.Generator(param.device).manual_seed(0)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(min(first_id, vocab - 1), vocab, (2, 8), generator=gen, device=param.device)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    pad = getattr(model.config, "pad_token_id", None)
    if pad_ids and pad is not None:
        ids[1, 5:] = pad
    verify_view(model, view, {"input_ids": ids, "attention_mask": mask, **extra}, what="into its layers")
