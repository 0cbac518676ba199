"""Guarantee 3: a NaN/Inf in any loss term stops the run (or, with train.nonfinite=skip, skips the step)
with a message naming the epoch, the step and the term; nothing saved before is overwritten."""
from __future__ import annotations

import logging
import math
import shutil

import pytest
import torch

from blockkd import config, methods
from blockkd.engine import load_checkpoint, train
from blockkd.errors import BlockKDError
from faultlib import recipe, snapshot
from helpers import rows

TERMS = ["loss_task_student", "loss_task_stones", "loss_distill_student", "loss_distill_stones", "loss_cross"]


def _cfg(out, name, **dotted) -> dict:
    return config.validate(recipe(output__dir=str(out), output__name=name, **dotted))


def _poison(monkeypatch, term: str, call: int, value: float) -> None:
    """The ``call``-th training forward of the next run (counted from 1) returns ``value`` in ``term``."""
    create, calls = methods.create, [0]

    def patched(*args, **kwargs):
        distiller = create(*args, **kwargs)
        forward = distiller.forward

        def poisoned(x, y=None, *, epoch=0.0):
            out = forward(x, y, epoch=epoch)
            if not (distiller.training and y is not None):
                return out
            calls[0] += 1
            logits, losses = out
            assert term in losses, f"{term} is not a term of {type(distiller).__name__}: {list(losses)}"
            if calls[0] == call:
                losses = {**losses, term: losses[term] + value}
            return logits, losses

        distiller.forward = poisoned
        return distiller

    monkeypatch.setattr(methods, "create", patched)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A healthy blockkd run after epoch 1 (copied by each test, which then trains epoch 2)."""
    out = tmp_path_factory.mktemp("one")
    train(_cfg(out, "r", train__epochs=1))
    return out / "r"


@pytest.mark.parametrize("term", TERMS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_term_stops_and_keeps_the_checkpoints(one_epoch, tmp_path, monkeypatch, term, value):
    run = shutil.copytree(one_epoch, tmp_path / "r")
    before = snapshot(run, ("last", "best", "last.prev")), (run / "metrics.jsonl").read_bytes()
    _poison(monkeypatch, term, 3, value)  # epoch 2, step 3
    with pytest.raises(BlockKDError) as info:
        train(_cfg(tmp_path, "r", train__epochs=2), resume=True)
    shown = "nan" if math.isnan(value) else "inf"
    assert str(info.value).startswith(f"non-finite loss at epoch 2 step 3: term {term!r} = {shown}")
    assert (snapshot(run, ("last", "best", "last.prev")), (run / "metrics.jsonl").read_bytes()) == before
    assert not list(run.glob(".*.tmp"))


def test_late_detection_still_names_the_step_and_saves_nothing(one_epoch, tmp_path, monkeypatch):
    """32 steps per epoch: the guard reads the device only every few steps, yet names the step it saw first."""
    run = shutil.copytree(one_epoch, tmp_path / "r")
    before = snapshot(run)
    _poison(monkeypatch, "loss_cross", 5, -math.inf)
    with pytest.raises(BlockKDError, match=r"^non-finite loss at epoch 1 step 5: term 'loss_cross' = -inf"):
        train(_cfg(tmp_path, "small", data__batch_size=8))
    assert not (tmp_path / "small" / "last").exists()
    _poison(monkeypatch, "loss_cross", 5, -math.inf)
    with pytest.raises(BlockKDError, match=r"^non-finite loss at epoch 2 step 5: term 'loss_cross' = -inf"):
        train(_cfg(tmp_path, "r", data__batch_size=8, train__epochs=2), resume=True)
    assert snapshot(run) == before


@pytest.mark.parametrize("term", TERMS)
def test_skip_mode_skips_the_step_and_names_it(one_epoch, tmp_path, monkeypatch, caplog, term):
    run = shutil.copytree(one_epoch, tmp_path / "r")
    _poison(monkeypatch, term, 2, math.nan)
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        summary = train(_cfg(tmp_path, "r", train__epochs=2, train__nonfinite="skip"), resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("non-finite")]
    assert warnings == [f"non-finite loss at epoch 2 step 2: term {term!r} = nan; step skipped (1 so far)"]
    assert summary["skipped_steps"] == 1 and summary["epochs"] == 2
    last = rows(run)[-1]
    assert last["skipped_steps"] == 1
    assert all(math.isfinite(last[k]) for k in ["train_loss", *(f"train_{t}" for t in TERMS)])
    for folder in ("last", "best"):
        tensors = load_checkpoint(run / folder).weights
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()), folder


def _poison_grads(monkeypatch, nan_at: int | None, raise_at: int | None = None) -> None:
    """The ``nan_at``-th training forward (counted from 1) keeps finite losses but backpropagates NaN into
    the student's logits (as an SVD of a rank-deficient map does); the ``raise_at``-th raises a RuntimeError
    (as that SVD does on NaN weights)."""
    create, calls = methods.create, [0]

    def patched(*args, **kwargs):
        distiller = create(*args, **kwargs)
        forward = distiller.forward

        def poisoned(x, y=None, *, epoch=0.0):
            training = distiller.training and y is not None
            calls[0] += training
            if training and calls[0] == raise_at:
                raise RuntimeError("linalg.svd: the algorithm failed to converge")
            logits, *rest = forward(x, y, epoch=epoch)
            if training and calls[0] == nan_at:
                logits.register_hook(lambda g: torch.full_like(g, math.nan))
            return (logits, *rest)

        distiller.forward = poisoned
        return distiller

    monkeypatch.setattr(methods, "create", patched)


def test_nan_gradient_of_a_finite_loss_stops_and_keeps_the_checkpoints(one_epoch, tmp_path, monkeypatch):
    run = shutil.copytree(one_epoch, tmp_path / "r")
    before = snapshot(run, ("last", "best", "last.prev")), (run / "metrics.jsonl").read_bytes()
    _poison_grads(monkeypatch, 3)
    with pytest.raises(BlockKDError, match=r"^non-finite gradient at epoch 2 step 3 \(the loss was finite"):
        train(_cfg(tmp_path, "r", train__epochs=2), resume=True)
    assert (snapshot(run, ("last", "best", "last.prev")), (run / "metrics.jsonl").read_bytes()) == before


def test_an_error_after_a_nan_gradient_names_the_nan_step(one_epoch, tmp_path, monkeypatch):
    """The corrupted weights may make the next forward raise before the guard's next read of the device:
    the run still ends in the guard's line, naming the step that went wrong first."""
    run = shutil.copytree(one_epoch, tmp_path / "r")
    before = snapshot(run)
    _poison_grads(monkeypatch, 4, raise_at=5)  # 32 steps per epoch: the device is read after steps 3, 6, ...
    with pytest.raises(BlockKDError, match=r"^non-finite gradient at epoch 2 step 4 .*then, in a later step: "
                                           r"RuntimeError") as info:
        train(_cfg(tmp_path, "r", data__batch_size=8, train__epochs=2), resume=True)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert snapshot(run) == before
    # Without a NaN step before it, the same error is the method's own and passes through unchanged.
    run2 = shutil.copytree(one_epoch, tmp_path / "r2")
    monkeypatch.undo()
    _poison_grads(monkeypatch, None, raise_at=2)
    with pytest.raises(RuntimeError, match="failed to converge"):
        train(_cfg(tmp_path, run2.name, data__batch_size=8, train__epochs=2), resume=True)


def test_skip_mode_skips_a_nan_gradient_step(one_epoch, tmp_path, monkeypatch, caplog):
    run = shutil.copytree(one_epoch, tmp_path / "r")
    _poison_grads(monkeypatch, 2)
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        summary = train(_cfg(tmp_path, "r", train__epochs=2, train__nonfinite="skip"), resume=True)
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("non-finite")]
    assert warnings == ["non-finite gradient at epoch 2 step 2 (the loss was finite); step skipped (1 so far)"]
    assert summary["skipped_steps"] == 1
    for folder in ("last", "best"):
        tensors = load_checkpoint(run / folder).weights
        assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()), folder
