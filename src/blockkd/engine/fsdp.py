"""Sharded training of causal LMs with PyTorch FSDP2 (``train.fsdp: true`` under ``torchrun``).

Why these units: the methods run the models through block views (:mod:`blockkd.blocks.hf_lm`) that call the
embeddings, each decoder layer and the final norm + LM head directly, never the model's own forward. So every
decoder layer is an FSDP unit (gathered for its forward, resharded after), and the modules outside the layers
(embeddings, final norm, LM head: tied weights stay one parameter) are one unit kept gathered from its first
forward to the end of the backward (``reshard_after_forward=False``: the LM head runs once per chunk, in the
forward and again in the backward's recomputation). The frozen teacher is sharded the same way (its units are
never reduced). The methods' own modules (Block-KD's connectors) are units one by one, as they are called, and
the distiller is the root.

Checkpoints hold full tensors (gathered on every rank, written by rank 0) in the format of unsharded runs, so a
sharded run resumes on any number of ranks and its ``hf/`` export is a plain ``save_pretrained`` folder.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import BlockKDError


def _fsdp():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        raise BlockKDError(f"train.fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is "
                           f"{torch.__version__}") from None
    return fully_shard, MixedPrecisionPolicy


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise BlockKDError(f"train.fsdp: {type(model).__name__} has no list of decoder layers to shard")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def shard(distiller: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
    """Shard the distiller's student and teacher (see the module docstring), in place; bf16 mixed precision
    (parameters and activations in bf16, gradients reduced in float32) when ``amp_dtype`` is bf16."""
    fully_shard, MixedPrecisionPolicy = _fsdp()
    if getattr(distiller, "task", None) != "causal_lm":
        raise BlockKDError("train.fsdp shards causal language models (the lm-* methods); use DDP (train.fsdp: "
                           "false) for the others")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if amp_dtype == torch.bfloat16 else MixedPrecisionPolicy()
    for model in (distiller.student, distiller.teacher):
        if model is None:
            continue
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, mp_policy=mp)
        inside = {id(p) for p in layers.parameters()}
        rest = [m for m in model.modules() if any(id(p) not in inside for p in m.parameters(recurse=False))]
        if rest:
            fully_shard(rest, mp_policy=mp, reshard_after_forward=False)
    for name, child in distiller.named_children():  # the method's own modules, called one by one (connectors)
        if name in ("student", "teacher") or not any(True for _ in child.parameters()):
            continue
        for unit in (child.values() if isinstance(child, nn.ModuleDict) else
                     child if isinstance(child, (nn.ModuleList, nn.Sequential)) else [child]):
            if any(True for _ in unit.parameters()):
                fully_shard(unit, mp_policy=mp)
    fully_shard(distiller, mp_policy=mp)
    # FSDP picks its root at the first forward; the first may be the teacher's own (the teacher check, samples),
    # which would make its units roots of their own: the distiller is made the root now (torch's lazy init).
    distiller._get_fsdp_state()._lazy_init()
    return distiller


def _full(v: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (v.full_tensor() if isinstance(v, DTensor) else v).detach()


def full_state(module: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``state`` (default: ``module.state_dict()``) with every shard gathered into a full tensor. Collective:
    every rank calls it."""
    state = module.state_dict() if state is None else state
    return {k: _full(v) for k, v in state.items()}


def shard_like(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors ``state`` cut into this rank's shards where ``module``'s own tensors are sharded (to load)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = module.state_dict()
    return {k: distribute_tensor(v.to(own[k].device, own[k].dtype), own[k].device_mesh, own[k].placements,
                             src_data_rank=None)
            if isinstance(own.get(k), DTensor) else v for k, v in state.items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with full tensors: the format of an unsharded run's (collective)."""
    sd = optimizer.state_dict()
    return {"state": {i: {k: _full(v) if torch.is_tensor(v) else v for k, v in st.items()}
                      for i, st in sd["state"].items()}, "param_groups": sd["param_groups"]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a full optimizer state (:func:`optimizer_state`, or an unsharded run's), cut into this rank's shards."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                    if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
                    for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


__all__ = ["shard", "full_state", "shard_like", "optimizer_state", "load_optimizer_state", "decoder_layers"]
