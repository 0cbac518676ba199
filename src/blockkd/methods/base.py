"""The interface every distillation method implements.

Why one base class: the trainer, the checkpoints and the CLI treat every method the same way —
``distiller(x, y, epoch=e)`` gives ``(student_logits, losses)`` in training and the student's logits
otherwise; only ``trainable_parameters()`` are optimised; only ``train_state_dict()`` is saved.
``x`` is a model input: a tensor, or a mapping of tensors for text (``input_ids``, ``attention_mask``,
...); models are always run through :func:`blockkd.inputs.call_model`, which takes either.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn

from ..errors import BlockKDError
from ..inputs import as_input_spec, call_model


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher: no gradients, eval mode (BN statistics never change)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


class Distiller(nn.Module):
    """Base distiller: a student, an optional frozen teacher and method-specific extra modules.

    Subclasses set ``Options`` (a frozen dataclass of :func:`blockkd.schema.option` fields: the one
    declaration of their options, their checks and help), ``needs_teacher``, ``paper`` (a citation
    for listings), ``task_losses`` where their task terms are not named ``loss_ce``, and implement
    :meth:`forward_train`, reading their options from ``self.opts``.
    ``epoch`` is training progress in epochs as a float (2.5 = half-way through the third epoch): the
    one mechanism for losses that depend on progress (DKD's warm-up). ``epochs`` is the training length,
    for terms that ramp in over a fraction of training (Block-KD's stones); the trainer sets it, API users
    pass ``blockkd.methods.create(..., epochs=E)`` (None: unknown).
    ``needs_strong_view``: the method compares a second, strongly augmented view of each training sample
    (MLKD); the trainer asks the training loader for it (:mod:`blockkd.data.strong`) and passes it as
    ``forward_train(x, y, epoch=..., x_strong=...)``; a method that does not ask gets one view, at no cost.
    """

    Options: ClassVar[type] = NoOptions
    needs_teacher: ClassVar[bool] = True
    # The names of the task terms among the losses (supervision by the labels); the others are the
    # distillation terms. Optimizers that treat the two gradients apart (DOT) read it.
    task_losses: ClassVar[tuple[str, ...]] = ("loss_ce",)
    paper: ClassVar[str] = ""
    epochs: float | None = None
    # Prefixes of student parameter names (as in ``student.named_parameters()``) the method leaves
    # without gradient on purpose, e.g. ``("fc.",)`` for a method that classifies with the teacher's
    # head; a property may compute them from ``self.student`` (its head's names differ between models).
    # The method contract test (tests/test_method_contract.py) requires a finite gradient on every
    # other student parameter after one step, and none on these.
    untrained_student_parameters: ClassVar[tuple[str, ...]] = ()
    needs_strong_view: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, options: Any = None,
                 input_shape: Any = (3, 32, 32)):
        super().__init__()
        self.opts = options if options is not None else self.Options()
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        # An input spec: an image shape (C, H, W), or for text a mapping of per-sample shapes
        # ({"input_ids": (L,), "attention_mask": (L,)}); see blockkd.inputs.example_input.
        self.input_shape = as_input_spec(input_shape)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.opts).items())

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode whatever the distiller's mode
        return self

    def forward(self, x: Any, y: torch.Tensor | None = None, *, epoch: float = 0.0,
                x_strong: torch.Tensor | None = None):
        if not self.training or y is None:
            return self.student_logits(x)
        if x_strong is not None:
            return self.forward_train(x, y, epoch=epoch, x_strong=x_strong)
        return self.forward_train(x, y, epoch=epoch)

    def student_logits(self, x: Any) -> torch.Tensor:
        """The student's logits for the model input ``x`` (a tensor or a mapping of tensors)."""
        return call_model(self.student, x)

    def forward_train(self, x: torch.Tensor, y: torch.Tensor, *, epoch: float):
        raise NotImplementedError

    def deployed_model(self) -> nn.Module:
        """The model that classifies after training (what a run's evaluation rebuilds): the student here;
        SimKD's is the student's blocks + its projector + the teacher's head."""
        return self.student

    def eval_logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named logits to evaluate (accuracy of each): the student's here; Block-KD adds its stones and
        their ensemble. Runs in the current mode and grad mode (evaluate under ``eval()`` and ``no_grad``)."""
        return {"student": self.student_logits(x)}

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor, *, epoch: float) -> dict[str, float]:
        """Method-specific numbers to log every N steps (Block-KD: each stone's gradient norm); none here."""
        return {}

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, without autograd bookkeeping."""
        return call_model(self.teacher, x)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates: every parameter outside the teacher."""
        for name, p in self.named_parameters():
            if not name.startswith("teacher.") and p.requires_grad:
                yield p

    def train_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything trained (student and extra modules such as connectors), never the teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_train_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``train_state_dict`` saved; a checkpoint of another shape fails in one line, before
        anything is loaded (torch's own error lists every mismatched tensor over many lines)."""
        own = self.train_state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                    if k in state and state[k].shape != v.shape]
        if missing or unexpected or reshaped:
            raise BlockKDError(f"checkpoint does not fit this distiller: missing {missing[:5]}, unexpected "
                               f"{unexpected[:5]}, other shapes {reshaped[:3]}")
        self.load_state_dict(state, strict=False)
