"""Block-KD's defaults train stably at the learning rate users take for KD, even with a confident teacher.

The objective sums many KL·T² terms whose gradients reach the student through the frozen teacher's later
blocks; a teacher with large logits (std ≳ 15) makes those gradients large. benchmarks/stability.py and
benchmarks/weight_sweep.py measure it; the first test runs the weight sweep's setting (synthetic data, a
resnet14 teacher scaled to logit std 20, resnet8 student, SGD lr 0.05) with the defaults and with the paper's
unit weights (α = β = γ = 1): both train to the end on finite losses that fall. It used to assert the defaults
~10 points above the unit weights too; since the student's task term joined the warm-up (which the unit weights
get as well) the two are level there, and in that 4-epoch toy the defaults' rank against KD turns on the thread
count (`python benchmarks/weight_sweep.py --variants ce kd unit defaults`; results/README.md, "Block-KD's
default weights: stable with a confident teacher").
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import torch

import blockkd
from blockkd.engine import train
from first_gradients import confident_pair, student_grad_norm  # benchmarks/first_gradients.py: the same pair
from weight_sweep import confident_teacher, recipe  # benchmarks/weight_sweep.py: the setting this test runs

# Two short trainings and a teacher's: minutes; `make test-fast` (pytest -m "not slow") skips them.
pytestmark = pytest.mark.slow


def test_blockkd_defaults_are_stable_with_a_confident_teacher(tmp_path):
    teacher = confident_teacher(tmp_path)
    defaults = train(recipe(tmp_path, "defaults", "blockkd", teacher=teacher))
    unit = train(recipe(tmp_path, "unit", "blockkd", teacher=teacher,
                        method={"options": {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}}))
    for summary in (defaults, unit):  # both trained to the end on finite losses that fell
        rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(math.isfinite(r["train_loss"]) for r in rows)
        assert rows[-1]["train_loss"] < rows[0]["train_loss"], rows


def test_blockkd_first_gradients_are_no_harsher_than_kds():
    """Block-KD's defaults, built beside KD's in one process on the same confident pairs (three initialisations):
    the gradient into the student on the first batch (at the progress the trainer passes for step 1 of 8 epochs
    of 8 steps) is at most 1.5x KD's, and 16 steps at an aggressive SGD lr stay finite. Why it can be harsher:
    the untrained connectors feed large errors back through the frozen teacher; the stones (and the student's
    task term) ramp in over stone_warmup_fraction of training. (blockkd 0.1's defaults, no ramp: 1.34x, 3.67x,
    2.77x here.)"""
    epochs, steps = 8, 8
    for seed in range(3):
        norms = {}
        for method in ("kd", "blockkd"):
            student, teacher, x, y = confident_pair(seed)
            d = blockkd.methods.create(method, student, teacher, input_shape=(3, 16, 16), epochs=epochs).train()
            norms[method] = student_grad_norm(d, x, y, epoch=1 / steps)
            if seed:
                continue
            opt = torch.optim.SGD(d.trainable_parameters(), lr=0.3, momentum=0.9)
            for step in range(16):
                xb, yb = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
                _, losses = d(xb, yb, epoch=(step + 1) / steps)
                loss = sum(losses.values())
                assert torch.isfinite(loss), (method, step, {k: v.item() for k, v in losses.items()})
                opt.zero_grad()
                loss.backward()
                opt.step()
        assert norms["blockkd"] <= 1.5 * norms["kd"], (seed, norms)
