"""Batch-norm statistics recomputed from training batches before an evaluation ("precise BN", Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021; pycls and detectron2 do the same).

Why: a BN layer evaluates with running averages that mix the statistics of the last ~10 steps' weights. A
student whose eval-mode forward is sensitive to them can fall by tens of points at one epoch's end while its
weights are fine: a ShuffleV1 student taught by wrn_16_2 fell from 79.14 to 60.67 % in epoch 4, and the same
weights read 81.57 % with their statistics recomputed over 20 training batches (results/precise_bn.md). The
weights and every RNG are left as they were, so training goes on unchanged.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import runtime
from .runtime import Runtime


def trained_batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BN layers with running statistics outside a distiller's frozen teacher."""
    return [m for name, m in model.named_modules() if not name.split(".")[0] == "teacher"
            and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_bn(model: nn.Module, loader, batches: int, rt: Runtime | None = None) -> int:
    """Replace the running statistics of ``model``'s trained BN layers by their plain average over the first
    ``batches`` batches of ``loader``, under the current weights; returns the batches used (0: no BN layer).

    ``model`` is a distiller (every head of ``eval_logits`` runs, so Block-KD's connectors are refreshed too)
    or a plain network. Its mode, the layers' momenta and every RNG state are restored afterwards.
    """
    norms = trained_batch_norms(model)
    if not norms or batches <= 0:
        return 0
    rt = rt or Runtime(next(model.parameters()).device, None, False)
    forward = getattr(model, "eval_logits", model)
    momenta, was_training, rng = [m.momentum for m in norms], model.training, runtime.rng_state()
    used = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # None: a cumulative average over the batches, not an exponential one
        model.train()
        for x, _, *_ in loader:
            if used == batches:
                break
            with rt.autocast():
                forward(rt.prepare(x.to(rt.device, non_blocking=True) if torch.is_tensor(x) else x))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
        runtime.set_rng_state(rng)
    return used
