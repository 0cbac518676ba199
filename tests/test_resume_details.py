"""Resuming a run: TensorBoard keeps every step, more epochs continue the schedule sensibly, flags that
contradict each other are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blockkd import config
from blockkd.engine import train
from blockkd.errors import BlockKDError
from blockkd.optim import lr_factor
from blockkd.optim.schedules import DecayOptions

LR = 0.1


def recipe(out: Path, epochs: int, **output) -> config.Config:
    """4 steps per epoch, a cosine decay to 0 over the run, TensorBoard on."""
    return config.validate({
        "model": {"name": "resnet8"},
        "data": {"name": "synthetic", "image_size": 8, "num_classes": 4, "train_size": 64, "test_size": 32,
                 "batch_size": 16, "eval_batch_size": 32},
        "optim": {"lr": LR}, "schedule": {"name": "cosine"},
        "train": {"epochs": epochs, "device": "cpu", "amp": "off", "deterministic": True},
        "output": {"dir": str(out), "name": "r", "progress": False, "tensorboard": True, "plot": False, **output}})


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_more_epochs_keeps_tensorboard_steps_and_follows_the_new_schedule(tmp_path, caplog):
    train(recipe(tmp_path, 1))
    assert rows(tmp_path / "r")[0]["lr"] == pytest.approx(LR)
    caplog.set_level("INFO", "blockkd")
    train(recipe(tmp_path, 2), resume=True)
    # the rule: every step's lr is the schedule of the recipe's train.epochs at that step (here: step 4 of 8)
    want = LR * lr_factor(4, name="cosine", options=DecayOptions(), steps_per_epoch=4, epochs=2)
    assert want > 0.4 * LR
    assert rows(tmp_path / "r")[1]["lr"] == pytest.approx(want)  # not the finished 1-epoch decay's 0
    assert "train.epochs 1 -> 2: the lr schedule is now that of a 2-epoch run" in caplog.text

    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 9))  # step 4, before the resume, kept
    lrs = {e.step: e.value for e in events.Scalars("step/lr")}
    assert lrs[5] == pytest.approx(LR * lr_factor(5, name="cosine", options=DecayOptions(), steps_per_epoch=4,
                                                  epochs=2))


def test_resume_and_overwrite_together_are_refused(tmp_path):
    train(recipe(tmp_path, 1, tensorboard=False))
    before = (tmp_path / "r" / "last" / "weights.safetensors").read_bytes()
    with pytest.raises(BlockKDError, match="--resume continues a run .* --overwrite deletes it: pass one of them"):
        train(recipe(tmp_path, 2, tensorboard=False), resume=True, overwrite=True)
    assert (tmp_path / "r" / "last" / "weights.safetensors").read_bytes() == before
