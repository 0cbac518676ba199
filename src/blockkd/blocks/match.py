"""Bring a student and a teacher to the same number of blocks, with boundaries at the same resolutions.

Why by resolution: a connector between a student block and a teacher block is cheapest and most
meaningful when both outputs have the same spatial size. Each side cuts after the last of its natural
stages at every resolution the two share; stages at resolutions the other side lacks join their
neighbours (the last block always runs to the head).

Transformers have no resolution to align: their natural blocks are single layers (the first also holds
the embeddings), every one with the same token count. When either side gives tokens ``(L, D)``, blocks
are aligned by depth instead: n groups of consecutive layers on each side, as equal as possible
(``balanced_ends``; the earlier groups take the extras), n defaulting to the shallower side's layer
count. BERT 12 -> 6 layers: six teacher pairs (1-2, 3-4, ...) against single student layers; 12 -> 4:
teacher triples; 12 -> 8: teacher groups of 2, 1, 2, 1, ... Why by depth: both sides refine the same
token sequence layer after layer, so relative depth is the natural correspondence, and equal groups give
every stepping-stone the same share of the teacher per student layer. A CNN meets a ViT the same way
(its stages against groups of transformer layers); feature maps never meet text tokens.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from ..errors import BlockKDError
from ..inputs import as_input_spec
from .core import Blocks, balanced_ends, split

Resolution = tuple[int, ...]


def _fmt(resolutions: Sequence[Resolution]) -> str:
    return "[" + ", ".join("x".join(map(str, r)) for r in resolutions) + "]"


def _last_index(resolutions: Sequence[Resolution]) -> dict[Resolution, int]:
    return {r: i for i, r in enumerate(resolutions)}


def common_resolutions(rs: Sequence[Resolution], rt: Sequence[Resolution]) -> list[Resolution]:
    """Resolutions at which both sides have a stage end, in order along both networks."""
    last_s, last_t = _last_index(rs), _last_index(rt)
    out, prev_t = [], -1
    for r in sorted(last_s, key=last_s.get):
        if r in last_t and last_t[r] > prev_t:
            out.append(r)
            prev_t = last_t[r]
    return out


def _ends(resolutions: Sequence[Resolution], cut_at: Sequence[Resolution]) -> list[int]:
    last = _last_index(resolutions)
    return [last[r] + 1 for r in cut_at] + [len(resolutions)]


def _describe(shapes: Sequence[tuple[int, ...]]) -> str:
    return _fmt([s[1:] for s in shapes]) if all(len(s) == 3 for s in shapes) else f"tokens {shapes[-1]}"


def _match_by_depth(student: nn.Module, teacher: nn.Module, s_nat: Blocks, t_nat: Blocks, ss, st, n
                    ) -> tuple[Blocks, Blocks]:
    """Token features on one side at least: n groups of consecutive blocks on each side (see the module)."""
    a, b = len(ss), len(st)

    def fail(why: str) -> BlockKDError:
        return BlockKDError(f"cannot pair student {type(student).__name__} ({a} blocks, {_describe(ss)}) with "
                            f"teacher {type(teacher).__name__} ({b} blocks, {_describe(st)}): {why}")

    s_maps, t_maps = all(len(x) == 3 for x in ss), all(len(x) == 3 for x in st)
    if (s_maps and t_nat.prefix_tokens is None) or (t_maps and s_nat.prefix_tokens is None):
        raise fail("feature maps cannot be connected to text tokens (no patch grid)")
    if n is None:
        n = min(a, b)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= min(a, b):
        raise fail(f"choose 1 <= n <= {min(a, b)} blocks (the shallower side's depth), got {n!r}")
    return s_nat.regroup(balanced_ends(a, n)), t_nat.regroup(balanced_ends(b, n))


def match(student: nn.Module, teacher: nn.Module, input_shape, n: int | None = None
          ) -> tuple[Blocks, Blocks]:
    """Block views of ``student`` and ``teacher`` with the same number of blocks.

    Default: a boundary after every resolution both share, where both sides go on past it, and one at the
    end (both last blocks feed the head); so n is the number of shared resolutions, plus one when both
    networks continue past the last of them. A smaller ``n`` keeps that many of those boundaries (the
    extra stages go to the earlier blocks); a larger one, up to the smaller natural stage count, pairs the
    stages by position instead (the connectors then resample).

    ``input_shape`` is an input spec (:func:`blockkd.inputs.example_input`): an image shape, or a
    mapping of shapes for text. When either side's features are tokens, blocks are paired by depth (see
    the module docstring).
    """
    input_shape = as_input_spec(input_shape)
    s_nat, t_nat = split(student, input_shape=input_shape), split(teacher, input_shape=input_shape)
    ss, st = s_nat.probe(input_shape), t_nat.probe(input_shape)
    if not all(len(x) == 3 for x in [*ss, *st]):
        return _match_by_depth(student, teacher, s_nat, t_nat, ss, st, n)
    rs = [shape[1:] for shape in ss]
    rt = [shape[1:] for shape in st]
    common = common_resolutions(rs, rt)
    a, b = len(rs), len(rt)
    last_s, last_t = _last_index(rs), _last_index(rt)
    inner = [r for r in common if last_s[r] < a - 1 and last_t[r] < b - 1]  # boundaries before the ends

    def fail(why: str) -> BlockKDError:
        return BlockKDError(f"cannot bring student {type(student).__name__} ({a} stages ending at {_fmt(rs)}) "
                            f"and teacher {type(teacher).__name__} ({b} stages ending at {_fmt(rt)}) to the same "
                            f"number of blocks: {why}")

    if n is None:
        if not common:
            raise fail(f"they share no resolution; pass n <= {min(a, b)} to pair stages by position")
        n = len(inner) + 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise fail(f"n must be a positive integer, got {n!r}")
    if n <= len(inner) + 1:
        cut_at = [inner[i - 1] for i in balanced_ends(len(inner) + 1, n)[:-1]]
        return s_nat.regroup(_ends(rs, cut_at)), t_nat.regroup(_ends(rt, cut_at))
    if n > min(a, b):
        raise fail(f"n={n} exceeds both the {len(inner) + 1} resolution-aligned blocks (shared resolutions "
                   f"{_fmt(common)}) and the {min(a, b)} stages of the shallower side")
    return s_nat.regroup(balanced_ends(a, n)), t_nat.regroup(balanced_ends(b, n))
