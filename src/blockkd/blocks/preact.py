"""Pre-ReLU block outputs: each block's output *before* its final ReLU, for any model built of modules.

Why: some feature distillation methods (OFD, Heo et al. 2019) compare pre-activations, where the teacher's
negative responses still carry information. Per-model code (mdistiller's ``preact_feats``) does not scale
to torchvision/timm models, so the point is found once by watching one probe forward:

* a block *ends with a ReLU* when its output is the output of an ``nn.ReLU`` module call; its pre-ReLU
  value is that (last) call's input, and ``output == relu(pre-ReLU)`` holds exactly;
* otherwise (linear bottlenecks, WRN's pre-activation residual stream, ReLU6, functional ``F.relu``)
  there is no pre-ReLU point and the pre-ReLU feature is the output itself.

The BatchNorm "before the ReLU" (OFD's margin comes from its affine parameters) is found on the autograd
graph of the probe: the pre-ReLU value is that BN's output, or a sum/concatenation with it as an operand
(the residual branch's last BN: among the operand BNs whose output feeds nothing but the sum, the one run
first, so that a projection shortcut's BN, run after the branch, is not taken; a BN that is the input of
the next sub-block, the identity path of a residual, is not taken either).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class PreactPoint:
    """Where a block's pre-ReLU value is: the ``call``-th call (0-based, within one run of the block) of
    ``relu``; ``bn`` the BatchNorm whose output it is (or whose output is its residual branch), if any."""

    relu: nn.ReLU
    call: int
    bn: nn.BatchNorm2d | None = None


def _leaves(block: nn.Module) -> list[nn.Module]:
    return [m for m in block.modules() if next(m.children(), None) is None]


@torch.enable_grad()
def find_point(block: nn.Module, x: torch.Tensor) -> PreactPoint | None:
    """The pre-ReLU point of ``block`` on input ``x`` (one forward, modes as they are; eval expected)."""
    relu_calls: list[tuple[nn.ReLU, int, object, torch.Tensor]] = []  # module, call index, input node, output
    counts: dict[int, int] = {}
    bn_nodes: dict[object, tuple[int, nn.BatchNorm2d]] = {}  # BN output node -> (execution order, module)
    consumed: list[tuple[nn.Module, object]] = []  # (leaf module, grad_fn of its input)
    handles = []

    def leaf_pre(module, args):
        node = args[0].grad_fn if args and isinstance(args[0], torch.Tensor) else None
        consumed.append((module, node))
        if isinstance(module, nn.ReLU):
            k = counts.get(id(module), 0)
            counts[id(module)] = k + 1
            relu_calls.append((module, k, node, None))

    def relu_post(module, args, output):
        m, k, node, _ = relu_calls[-1]
        relu_calls[-1] = (m, k, node, output)

    def bn_post(module, args, output):
        bn_nodes[output.grad_fn] = (len(bn_nodes), module)

    try:
        for m in _leaves(block):
            handles.append(m.register_forward_pre_hook(leaf_pre))
            if isinstance(m, nn.ReLU):
                handles.append(m.register_forward_hook(relu_post))
            if isinstance(m, nn.BatchNorm2d):
                handles.append(m.register_forward_hook(bn_post))
        out = block(x.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    final = next(((m, k, node) for m, k, node, o in reversed(relu_calls) if o is out), None)
    if final is None:
        return None
    relu, call, node = final
    feeds_modules = {n for m, n in consumed if n is not None and m is not relu}
    bn = None
    if node in bn_nodes:
        bn = bn_nodes[node][1]
    elif node is not None and type(node).__name__.startswith(("Add", "Cat")):
        operands = [nf for nf, _ in node.next_functions if nf is not None]
        candidates = sorted(bn_nodes[n] for n in operands if n in bn_nodes and n not in feeds_modules)
        bn = candidates[0][1] if candidates else None
    if bn is not None and bn.num_features != out.shape[1]:
        bn = None
    return PreactPoint(relu, call, bn)


@contextmanager
def capture(points: list[PreactPoint | None]):
    """While active, ``slots[i]`` receives the pre-ReLU input of block i's point at each run of block i.

    Yields ``(slots, start)``: call ``start(i)`` before running block i (resets its call counter). An
    in-place ReLU overwrites its input, so that input is cloned (the clone is on the autograd graph).
    """
    slots: list[torch.Tensor | None] = [None] * len(points)
    state = {"block": -1, "counts": {}}
    handles = []

    def make_hook(i: int, point: PreactPoint):
        def hook(module, args):
            if state["block"] != i:
                return
            k = state["counts"].get(i, 0)
            state["counts"][i] = k + 1
            if k == point.call:
                inp = args[0]
                slots[i] = inp.clone() if getattr(module, "inplace", False) else inp
        return hook

    def start(i: int) -> None:
        state["block"] = i
        state["counts"][i] = 0

    try:
        for i, p in enumerate(points):
            if p is not None:
                handles.append(p.relu.register_forward_pre_hook(make_hook(i, p)))
        yield slots, start
    finally:
        for h in handles:
            h.remove()
