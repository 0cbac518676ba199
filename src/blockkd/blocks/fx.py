"""torch.fx fallback: split an unregistered model at the points where its spatial resolution changes.

How: trace the model (modules without children stay opaque calls, so their train/eval behaviour is
kept), propagate shapes at a probe input, and find the *cuts*: points of the graph where exactly one
value is alive, so that everything after them depends on that value only. Cuts are grouped into runs
of equal resolution; each stage ends at the shallowest cut of its run (the fewest enclosing modules
broken, latest on ties), so stages end between modules, not inside a residual block. A final run of
1x1 maps (or without parameters) is the global pool: the head starts there (or after the last spatial
map when the model pools straight to a vector). Each stage and the head become a GraphModule over
the model's own modules.
"""
from __future__ import annotations

from itertools import groupby

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import BlockKDError
from ..utils import eval_mode


class _Tracer(fx.Tracer):
    """Keeps every childless module a leaf: its forward (and its ``self.training`` branches) runs as is."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or next(m.children(), None) is None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


class _Call(nn.Module):
    """Calls the model with the input alone, so extra forward arguments keep their Python defaults."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)


def _trace(model: nn.Module) -> fx.GraphModule:
    root = _Call(model)
    try:
        graph = _Tracer().trace(root)
    except Exception as e:  # fx raises many types for untraceable Python (data-dependent control flow ...)
        raise BlockKDError(f"torch.fx cannot trace it: {_first_line(e)}") from None
    return fx.GraphModule(root, graph)


def _shape_prop(gm: fx.GraphModule, model: nn.Module, input_shape: tuple[int, ...]) -> None:
    ref = next(iter(model.parameters()), None)
    ref = ref if ref is not None else next(iter(model.buffers()), torch.empty(0))
    with eval_mode(model):
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(torch.zeros(2, *input_shape, device=ref.device, dtype=ref.dtype))
        except Exception as e:
            raise BlockKDError(f"it cannot run on inputs of shape {input_shape} ({_first_line(e)}); pass "
                               f"input_shape=(C, H, W)") from None


def _resolution(node: fx.Node) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape[2:]) if shape is not None and len(shape) == 4 else None


def _scope(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}))


def _depth(a: fx.Node, b: fx.Node) -> int:
    """How many enclosing modules a cut between consecutive nodes ``a`` and ``b`` breaks open."""
    depth = 0
    for x, y in zip(_scope(a), _scope(b)):
        if x != y:
            break
        depth += 1
    return depth


def _has_params(gm: fx.GraphModule, nodes: list[fx.Node], start: int, stop: int) -> bool:
    """Whether ``nodes[start+1:stop+1]`` use parameters (through a module or a fetched attribute)."""
    return any(any(a.op == "get_attr" for a in n.all_input_nodes)
               or n.op == "call_module" and next(gm.get_submodule(n.target).parameters(), None) is not None
               for n in nodes[start + 1:stop + 1])


def _cuts(nodes: list[fx.Node]) -> list[int]:
    """Positions i (0 = the input) after which ``nodes[i]`` is the only value still needed."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use = [max((index[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    dying = [0] * (len(nodes) + 1)
    for last in last_use:
        dying[last] += 1
    cuts, live = [], 0
    for i in range(len(nodes) - 1):
        live += 1 - dying[i]
        if live == 1 and last_use[i] > i:
            cuts.append(i)
    return cuts


def _subgraph(root: nn.Module, nodes: list[fx.Node], start: int, stop: int, name: str,
              output: fx.Node | None = None) -> fx.GraphModule:
    """A GraphModule taking ``nodes[start]``'s value and running ``nodes[start+1:stop+1]`` (or up to ``output``)."""
    graph = fx.Graph()
    env = {nodes[start]: graph.placeholder("x")}

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:  # parameters and buffers are fetched where used; anything else is cut off
            assert a.op == "get_attr", f"{a} crosses a cut"
            env[a] = graph.get_attr(a.target)
        return env[a]

    for node in nodes[start + 1:stop + 1]:
        env[node] = graph.node_copy(node, arg)
    graph.output(fx.map_arg(output.args[0], arg) if output is not None else env[nodes[stop]])
    return fx.GraphModule(root, graph, class_name=name)


def fx_split(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[nn.Module], nn.Module]:
    """Stages (one per resolution, the first including the stem) and head of a traceable CNN."""
    gm = _trace(model)
    _shape_prop(gm, model, input_shape)
    nodes = [n for n in gm.graph.nodes if n.op != "get_attr"]  # the input, the operations, the output
    output = nodes[-1]
    spatial = [(i, _resolution(nodes[i])) for i in _cuts(nodes) if i > 0 and _resolution(nodes[i])]
    runs = [(res, [i for i, _ in group]) for res, group in groupby(spatial, key=lambda c: c[1])]
    # The global pool's output (1x1), or a parameter-free resize (torchvision VGG's 7x7 adaptive pool),
    # belongs to the head, which then starts after the run before it.
    while len(runs) > 1 and (runs[-1][0] == (1, 1) or not _has_params(gm, nodes, runs[-2][1][-1], runs[-1][1][-1])):
        runs.pop()
    if not runs or runs[-1][0] == (1, 1):
        raise BlockKDError(f"found no spatial stages at input shape {input_shape}; pass a larger input_shape "
                           f"or a model whose layers can be cut between single tensors")
    ends = [max(cuts, key=lambda i: (-_depth(nodes[i], nodes[i + 1]), i)) for _, cuts in runs[:-1]]
    ends.append(runs[-1][1][-1])
    prefix = type(model).__name__
    stages = [_subgraph(gm, nodes, a, b, f"{prefix}Stage{k}") for k, (a, b) in enumerate(zip([0] + ends, ends), 1)]
    return stages, _subgraph(gm, nodes, ends[-1], len(nodes) - 2, f"{prefix}Head", output=output)
