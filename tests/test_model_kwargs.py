"""model.kwargs / teacher.kwargs: a torchvision or timm model's constructor arguments from the recipe, e.g. a
timm ViT on 32-px images (img_size, patch_size) without registering a custom model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockkd import config, models
from blockkd.engine import evaluate_checkpoint, train
from blockkd.errors import BlockKDError

pytest.importorskip("timm")

VIT = "timm.vit_tiny_patch16_224"
SMALL_VIT = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def write_recipe(folder: Path) -> Path:
    path = folder / "vit.yaml"
    path.write_text(
        f"model: {{name: {VIT}}}\n"
        "data: {name: synthetic, image_size: 32, num_classes: 4, train_size: 32, test_size: 16, batch_size: 16}\n"
        "optim: {name: adamw, lr: 0.001, weight_decay: 0.0}\nschedule: {name: constant}\n"
        "train: {epochs: 1, device: cpu, amp: 'off'}\n"
        f"output: {{dir: {folder / 'runs'}, name: vit, progress: false, tensorboard: false, plot: false}}\n")
    return path


def test_a_timm_vit_at_32_px_from_the_recipe(tmp_path):
    overrides = [f"model.kwargs.{k}={v}" for k, v in SMALL_VIT.items()]
    cfg = config.load(write_recipe(tmp_path), overrides)
    assert cfg.model.kwargs == SMALL_VIT and "img_size: 32" in config.dump(cfg)
    summary = train(cfg)
    assert summary["params"] == models.num_params(models.create(VIT, 4, 3, **SMALL_VIT))
    # the run stores the arguments: eval rebuilds the same 32-px ViT from the run folder
    result = evaluate_checkpoint(tmp_path / "runs" / "vit", device="cpu")
    assert result["top1"] == pytest.approx(summary["last"]["test_top1"])


def test_a_teacher_built_by_name_takes_its_own_kwargs(tmp_path):
    cfg = config.load(write_recipe(tmp_path), [
        "method.name=kd", f"teacher.name={VIT}", "teacher.allow_random=true", "train.max_steps=1",
        *(f"teacher.kwargs.{k}={v}" for k, v in {**SMALL_VIT, "depth": 3}.items()),
        *(f"model.kwargs.{k}={v}" for k, v in SMALL_VIT.items())])
    assert train(cfg)["steps"] == 1


def test_constructor_arguments_are_checked():
    model = models.create(VIT, num_classes=4, in_channels=3, **SMALL_VIT)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    tv = models.create("torchvision.resnet18", num_classes=4, in_channels=3, zero_init_residual=True)
    assert torch.count_nonzero(tv.layer1[0].bn2.weight) == 0
    with pytest.raises(BlockKDError, match=r"cannot build timm.vit_tiny_patch16_224 with the constructor "
                                           r"arguments \{'no_such_arg': 1\}"):
        models.create(VIT, num_classes=4, in_channels=3, no_such_arg=1)
    with pytest.raises(BlockKDError, match="model.kwargs.in_chans is set by blockkd"):
        models.create(VIT, 4, 3, in_chans=1)


def test_kwargs_apply_to_torchvision_and_timm_models_only(tmp_path):
    recipe = write_recipe(tmp_path)
    with pytest.raises(BlockKDError, match=r"model.kwargs \(in override 'model.kwargs.img_size=32'.*\) are a "
                                           r"torchvision.\* or timm.\* model's constructor arguments; model.name is "
                                           r"resnet8"):
        config.load(recipe, ["model.name=resnet8", "model.kwargs.img_size=32"])
    with pytest.raises(BlockKDError, match=r"model.kwargs.num_classes \(in override 'model.kwargs.num_classes=2'.*\) "
                                           r"is set by blockkd"):
        config.load(recipe, ["model.kwargs.num_classes=2"])
    with pytest.raises(BlockKDError, match="invalid model.kwargs=3 .* expected a mapping of keyword arguments"):
        config.load(recipe, ["model.kwargs=3"])
