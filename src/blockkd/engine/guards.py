"""What stops a run cleanly instead of corrupting it: non-finite losses and running out of memory.

Why together: both turn a failure deep inside a training step into one clear line, before any
checkpoint is written from a broken state.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from ..errors import BlockKDError
from . import runtime
from .logger import RunLogger


@contextlib.contextmanager
def oom_advice(key: str, batch_size: int) -> Iterator[None]:
    """Turn running out of device memory into one line that says which batch size to lower, and to what."""
    try:
        yield
    except torch.OutOfMemoryError:
        what = "eval batch size" if "eval" in key else "batch size"
        tip = f"try {key}={batch_size // 2}" if batch_size > 1 else "try a smaller model or a larger device"
        raise BlockKDError(f"out of memory at {what} {batch_size}; {tip}") from None


class NonFiniteGuard:
    """Catches NaN/Inf loss terms, and NaN/Inf gradients of finite losses.

    ``stop``: the first bad step is recorded on the device and reported at the next sync point (no
    host sync per step); the run then raises before any checkpoint is written from the corrupted state.
    ``skip``: needs the answer before the optimizer step, so it syncs every step and skips bad steps.
    """

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device, self.skipped = mode, device, 0
        self.start_epoch()

    def start_epoch(self) -> None:
        self.counter = torch.zeros((), dtype=torch.long, device=self.device)  # step index in the epoch
        self.first = torch.full((), -1, dtype=torch.long, device=self.device)
        self.values: torch.Tensor | None = None
        self.first_grad = torch.full((), -1, dtype=torch.long, device=self.device)  # a finite loss's NaN gradient

    @staticmethod
    def describe(names, values) -> str:
        bad = [f"term {k!r} = {v}" for k, v in zip(names, values) if not math.isfinite(v)]
        return ", ".join(bad) or "the total"

    def ok(self, terms: torch.Tensor, names, epoch: int, step: int, log: RunLogger) -> bool:
        """False when this step must be skipped (``skip`` mode only)."""
        bad = ~torch.isfinite(terms)
        if self.mode == "skip":
            # Under DDP every rank must skip together, or the gradient all-reduce would hang.
            if not runtime.all_reduce_sum(bad.any().float()[None]).item():
                return True
            self.skipped += 1
            log.warning(f"non-finite loss at epoch {epoch + 1} step {step + 1}: "
                        f"{self.describe(names, terms.tolist())}; step skipped ({self.skipped} so far)")
            return False
        new = bad.any() & (self.first < 0)
        self.first = torch.where(new, self.counter, self.first)
        self.values = terms if self.values is None else torch.where(new, terms, self.values)
        self.counter += 1
        return True

    def grads_ok(self, finite: torch.Tensor, epoch: int, step: int, log: RunLogger) -> bool:
        """After :meth:`ok` passed this step's loss: False when its gradients are not all finite and the
        step must be skipped (``skip`` mode only). Under DDP the gradients are already all-reduced, so
        every rank reaches the same answer."""
        if self.mode == "skip":
            if finite.item():
                return True
            self.skipped += 1
            log.warning(f"non-finite gradient at epoch {epoch + 1} step {step + 1} (the loss was finite); "
                        f"step skipped ({self.skipped} so far)")
            return False
        new = ~finite & (self.first_grad < 0)
        self.first_grad = torch.where(new, self.counter - 1, self.first_grad)
        return True

    def check(self, names, epoch: int) -> None:
        """Raise if a bad step was recorded here or on another rank (one host sync)."""
        if self.mode != "stop":
            return
        bad_ranks = runtime.all_reduce_sum(((self.first >= 0) | (self.first_grad >= 0)).float()[None]).item()
        self.raise_recorded(names, epoch)
        if bad_ranks:
            raise BlockKDError(f"non-finite loss or gradient at epoch {epoch + 1} on another rank (see its message)")

    def raise_recorded(self, names, epoch: int, cause: BaseException | None = None) -> None:
        """Raise if this rank recorded a bad step (no collective: also safe while ``cause``, an error of a
        later step that the corrupted weights may have caused, unwinds)."""
        if self.mode != "stop":
            return
        loss, grad = int(self.first), int(self.first_grad)
        later = f" (then, in a later step: {type(cause).__name__})" if cause is not None else ""
        if loss >= 0 and (grad < 0 or loss <= grad):
            raise BlockKDError(f"non-finite loss at epoch {epoch + 1} step {loss + 1}: "
                               f"{self.describe(names, self.values.tolist())}{later}") from cause
        if grad >= 0:
            raise BlockKDError(f"non-finite gradient at epoch {epoch + 1} step {grad + 1} (the loss was finite; "
                               f"train.nonfinite=skip skips such steps){later}") from cause
