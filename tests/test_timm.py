"""timm models: ``timm.<name>`` in the model registry and block views through their ``feature_info``."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import blockkd
from blockkd import config, engine, methods, models
from blockkd.blocks import match, split
from blockkd.blocks.timm_cnn import split_timm
from blockkd.blocks.core import find_splitter

SHAPE = (3, 64, 64)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "convnext_atto", "test_efficientnet"])
def test_blocks_equal_the_model_and_end_at_strides_4_to_32(name):
    model = models.create(f"timm.{name}", num_classes=10).eval()
    assert find_splitter(model) is split_timm
    blocks = split(model)
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert (blocks(x) - model(x)).abs().max() <= 1e-5
    assert [s[1:] for s in blocks.probe(SHAPE)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in blocks.parameters()} == own  # a view: the model's own modules, all of them


def test_timm_vit_splits_into_transformer_blocks_exactly():
    model = models.create("timm.test_vit", num_classes=10).eval()
    view = split(model)
    x = torch.randn(2, 3, *model.default_cfg["input_size"][1:])
    with torch.no_grad():
        assert len(view) == len(model.blocks) and torch.allclose(view(x), model(x), atol=1e-5)


def test_resnet_teacher_and_mobilenetv3_student_pair_and_train(tmp_path):
    student = models.create("timm.mobilenetv3_small_050", num_classes=10)
    teacher = models.create("timm.resnet18", num_classes=10)
    s, t = match(student, teacher, SHAPE)
    assert len(s) == len(t) == 4 and [a[1:] for a in s.probe(SHAPE)] == [b[1:] for b in t.probe(SHAPE)]

    distiller = methods.create("blockkd", student, teacher, SHAPE)
    distiller.train()
    logits, losses = distiller(torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 3]))
    sum(losses.values()).backward()
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in distiller.connectors.parameters())
    assert all(p.grad is None for p in distiller.teacher.parameters())

    cfg = config.validate({
        "model": {"name": "timm.mobilenetv3_small_050"},
        "teacher": {"name": "timm.resnet18", "allow_random": True},
        "method": {"name": "blockkd"},
        "data": {"name": "synthetic", "image_size": 64, "train_size": 16, "test_size": 8, "batch_size": 8},
        "train": {"max_steps": 2, "device": "cpu"},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False, "plot": False}})
    summary = engine.train(cfg)
    assert summary["steps"] == 2 and summary["trainable_params"] > models.num_params(student)


def test_timm_is_imported_only_for_timm_models():
    code = ("import sys, blockkd; blockkd.split(blockkd.models.create('resnet8')); "
            "assert 'timm' not in sys.modules, 'timm imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "timm." in blockkd.models.prefixes() and not any(n.startswith("timm.") for n in blockkd.models.names())


def test_zoo_vit_for_small_images_splits_exactly_and_distils_from_a_cnn():
    """vit_tiny_p4 (the CNN -> ViT pairs at Fashion-MNIST / CIFAR scale): 28 and 32 px inputs, a ViT split into
    its 6 transformer blocks, and Block-KD from a zoo CNN through connectors mapping its tokens to feature maps."""
    student = models.create("vit_tiny_p4", num_classes=10, in_channels=1).eval()
    assert "vit_tiny_p4" in models.names() and 0.15e6 < models.num_params(student) < 0.3e6
    view = split(student)
    assert len(view) == 6 and view.probe((1, 28, 28))[0] == (50, 64)  # 7x7 patches of 4 px + the class token
    with torch.no_grad():
        for size in (28, 32):
            x = torch.randn(2, 1, size, size)
            assert torch.allclose(view(x), student(x), atol=1e-5) and student(x).shape == (2, 10)
    teacher = models.create("resnet20", num_classes=10, in_channels=1)
    distiller = methods.create("blockkd", student, teacher, input_shape=(1, 28, 28)).train()
    logits, losses = distiller(torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    sum(losses.values()).backward()
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())
    assert student.patch_embed.proj.weight.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
