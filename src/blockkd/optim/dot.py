"""DOT, the Distillation-Oriented Trainer (Zhao et al., "DOT: A Distillation-Oriented Trainer", ICCV 2023).

SGD whose momentum treats the two gradients of a distillation step apart: the task loss's (CE on the
labels) and the distillation losses' (the teacher-matching terms). A parameter that receives both keeps
two momentum buffers, the task one with momentum ``β − Δ`` and the distillation one with ``β + Δ``, and
moves by the sum of the two:

    b_task    ← (β − Δ) · b_task    + (g_task + λ·w)          (first step: b_task    = g_task + λ·w)
    b_distill ← (β + Δ) · b_distill + g_distill               (first step: b_distill = g_distill)
    w         ← w − lr · (b_task + b_distill)

so the distillation gradient accumulates more and the task gradient less; the paper shows this lets the
distillation loss converge further ("breaks the trade-off" between the two). A parameter that receives
only one of the gradients (a connector trained by the distillation loss alone) is plain SGD with momentum
``β`` on it, weight decay included. With ``Δ = 0`` the sum of the two buffers obeys the recursion of one
buffer over ``g_task + g_distill``: exactly ``torch.optim.SGD(momentum=β)`` (no dampening, no Nesterov).

How the two gradients arrive (``needs_loss_split``): :func:`blockkd.engine.train_step` backpropagates the
distillation terms first and calls :meth:`DOT.stash_distill_grads`, which takes them out of ``.grad``;
it then backpropagates the task terms (the method's ``task_losses``) into ``.grad`` and calls ``step()``.
A ``step()`` without a stash treats every gradient as the task's (plain SGD with momentum β).

Defaults as mdistiller's CIFAR-100 DOT recipes (``SOLVER.MOMENTUM`` 0.9, ``SOLVER.DOT.DELTA`` 0.075).
Differences from mdistiller's ``DistillationOrientedTrainer``: the momenta are given as ``momentum`` and
``delta`` (mdistiller's trainer turns them into ``momentum`` / ``momentum_kd``); several param groups are
allowed; weight decay is applied once per parameter in every step, to the task side when the parameter
has a task gradient, else to the distillation side (mdistiller skips it in the first step of a parameter
that only the distillation loss reaches).
"""
from __future__ import annotations

import dataclasses

import torch

from ..schema import OptionError, number, option


@dataclasses.dataclass(frozen=True)
class DOTOptions:
    momentum: float = option(0.9, number(0, hi=1), "β: the momentum of SGD; DOT's task momentum is β − Δ, "
                             "its distillation momentum β + Δ")
    delta: float = option(0.075, number(0), "Δ: how far the two momenta sit from β (mdistiller's DOT.DELTA); "
                          "0 is plain SGD with momentum β")

    def check(self) -> None:
        if self.delta > self.momentum:
            raise OptionError("delta", f"delta ({self.delta:g}) must be at most momentum ({self.momentum:g}): "
                                       f"the task momentum β − Δ would be negative")
        if self.momentum + self.delta >= 1:
            raise OptionError("delta", f"momentum + delta ({self.momentum + self.delta:g}) must be below 1: the "
                                       f"distillation momentum β + Δ would not decay")


class DOT(torch.optim.Optimizer):
    """Distillation-Oriented Trainer (see the module docstring for the update rule)."""

    needs_loss_split = True  # train_step: distillation terms' backward, stash_distill_grads(), task terms' backward

    def __init__(self, params, lr: float, momentum: float = 0.9, delta: float = 0.075, weight_decay: float = 0.0):
        if lr <= 0 or weight_decay < 0 or not 0 <= delta <= momentum or momentum + delta >= 1:
            raise ValueError(f"DOT: need lr > 0, weight_decay >= 0, 0 <= delta <= momentum, momentum + delta < 1 "
                             f"(got lr={lr}, weight_decay={weight_decay}, momentum={momentum}, delta={delta})")
        super().__init__(params, {"lr": lr, "momentum": momentum, "delta": delta, "weight_decay": weight_decay})
        self._distill_grads: dict[torch.Tensor, torch.Tensor] = {}  # this step's, until step(); never saved

    @torch.no_grad()
    def stash_distill_grads(self) -> None:
        """Take the gradients now in ``.grad`` (the distillation terms') out of it, for the next ``step()``."""
        self._distill_grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._distill_grads[p] = p.grad
                    p.grad = None

    @staticmethod
    def _momentum(state: dict, key: str, d_p: torch.Tensor, beta: float) -> torch.Tensor:
        buf = state.get(key)
        if buf is None:
            buf = state[key] = d_p.detach().clone()
        else:
            buf.mul_(beta).add_(d_p)
        return buf

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distill, self._distill_grads = self._distill_grads, {}
        for group in self.param_groups:
            beta, delta, lr, wd = group["momentum"], group["delta"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                g_task, g_distill = p.grad, distill.get(p)
                if g_task is None and g_distill is None:
                    continue
                state = self.state[p]
                both = g_task is not None and g_distill is not None
                update = None
                if g_task is not None:
                    d_p = g_task.add(p, alpha=wd) if wd else g_task
                    update = self._momentum(state, "momentum_buffer", d_p, beta - delta if both else beta)
                if g_distill is not None:
                    d_p = g_distill.add(p, alpha=wd) if wd and not both else g_distill
                    buf = self._momentum(state, "distill_momentum_buffer", d_p, beta + delta if both else beta)
                    update = buf if update is None else update + buf
                p.add_(update, alpha=-lr)
        return loss
