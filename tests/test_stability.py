"""Block-KD's defaults train stably at the learning rate users take for KD, even with a confident teacher.

The objective sums many KL·T² terms whose gradients reach the student through the frozen teacher's later
blocks; a teacher with large logits (std ≳ 15) makes those gradients large. benchmarks/stability.py
measures it on Fashion-MNIST; this test keeps the property on synthetic data in seconds.
"""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from blockkd import config, data, models
from blockkd.engine import train
from blockkd.engine.build import build_model


def recipe(out, name, method, **extra) -> dict:
    cfg = {
        "model": {"name": "resnet8"},
        "method": {"name": method},
        "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 512, "test_size": 256,
                 "batch_size": 64, "eval_batch_size": 256},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "constant"},
        "train": {"epochs": 3, "device": "cpu", "seed": 0},
        "output": {"dir": str(out), "name": name, "progress": False, "tensorboard": False, "plot": False},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return config.validate(cfg)


def test_blockkd_defaults_are_stable_with_a_confident_teacher(tmp_path):
    teacher_run = train(recipe(tmp_path, "teacher", "ce", model={"name": "resnet14"}, schedule={"name": "cosine"},
                              train={"epochs": 4}))
    assert teacher_run["last"]["test_top1"] > 60
    cfg = recipe(tmp_path, "probe", "ce")
    bundle = data.build(cfg["data"], device="cpu")
    teacher = build_model({"name": "resnet14", "checkpoint": str(tmp_path / "teacher")}, bundle, role="teacher")
    teacher.eval()
    with torch.no_grad():
        x, _ = next(iter(bundle.test))
        std = teacher(x).std(dim=1).mean().item()
        scale = 20.0 / std  # a confident teacher: same argmax, logit std 20
        teacher.fc.weight.mul_(scale)
        teacher.fc.bias.mul_(scale)
        assert teacher(x).std(dim=1).mean().item() > 15
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(tmp_path / "confident.safetensors"))
    confident = {"name": "resnet14", "checkpoint": str(tmp_path / "confident.safetensors")}
    # Same schedule as the teacher's, at the KD learning rate; a non-finite loss would stop the run.
    student = train(recipe(tmp_path, "student", "blockkd", teacher=confident, schedule={"name": "cosine"},
                           train={"epochs": 4}))
    assert student["last"]["test_top1"] > 50, student["last"]  # chance is 10%; α=β=γ=1 gets about 27
