"""The ImageNet code path on a tiny generated image folder: recipes, torchvision models and weights, folder loader.

The recipe runs as shipped (configs/imagenet/resnet34_resnet18/blockkd.yaml) with the real torchvision
ResNet-34 -> ResNet-18, overriding only what a 2-step CPU run needs: the data root and image size, batch
sizes, workers, and the teacher checkpoint (a random ResNet-34 saved by the test, since torchvision's
pretrained weights cannot be downloaded here).
"""
from __future__ import annotations

import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from blockkd import config, data, engine, methods, models
from blockkd.data.folder import random_flip
from blockkd.engine.build import load_model_weights
from blockkd.engine.checkpoint import load_checkpoint
from blockkd.errors import BlockKDError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs/imagenet"
CLASSES = 3


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """3 classes of 8 training and 2 validation JPEGs; each image is a left-to-right brightness ramp
    (so a horizontal flip is visible) tinted by its class."""
    root = tmp_path_factory.mktemp("imagenet")
    ramp = np.linspace(20, 235, 80)[None, :, None]
    for split, count in (("train", 8), ("val", 2)):
        for k in range(CLASSES):
            folder = root / split / f"n0{k}"
            folder.mkdir(parents=True)
            tint = np.eye(3)[k] * 20
            for i in range(count):
                image = np.broadcast_to(ramp + tint + i, (72 + 2 * i, 80, 3)).clip(0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.JPEG", quality=95)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagenet_recipe_trains_torchvision_pair_from_a_local_teacher_file(image_root, tmp_path, num_workers):
    teacher = torchvision.models.resnet34(num_classes=CLASSES)
    torch.save(teacher.state_dict(), tmp_path / "resnet34.pth")
    cfg = config.load(RECIPES / "resnet34_resnet18/blockkd.yaml", [
        f"data.root={image_root}", "data.image_size=64", "data.batch_size=4", "data.eval_batch_size=8",
        f"data.num_workers={num_workers}", f"teacher.checkpoint={tmp_path / 'resnet34.pth'}", "train.max_steps=2",
        "train.device=cpu", f"output.dir={tmp_path / 'runs'}", "output.tensorboard=false", "output.plot=false",
        "output.progress=false"])
    assert (cfg["optim"]["lr"], cfg["schedule"]["milestones"]) == (0.2, [30, 60, 90])  # the recipe's own
    summary = engine.train(cfg)
    assert summary["steps"] == 2 and summary["epochs"] == 1

    # The teacher that was distilled from is the saved file: its test accuracy is that file's.
    test = data.build(cfg["data"], device="cpu").test
    assert summary["teacher_test_top1"] == pytest.approx(engine.evaluate(teacher, test)["top1"])
    weights = load_checkpoint(Path(summary["run_dir"]) / "last").weights
    student = {k[len("student."):] for k in weights if k.startswith("student.")}
    assert student == set(torchvision.models.resnet18(num_classes=CLASSES).state_dict())
    assert any(k.startswith("connectors.") for k in weights)  # the blockkd path, with its connectors

    torch.save(torchvision.models.resnet34(num_classes=5).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(BlockKDError, match="resnet34.pth is for 5 classes"):  # the file is what is loaded
        engine.train(cfg, overwrite=True)


def test_recipes_follow_mdistiller_imagenet_settings():
    for pair, beta in (("resnet34_resnet18", 0.5), ("resnet50_mobilenet_v2", 2.0)):
        for method in ("ce", "kd", "dkd", "blockkd", "blockkd-lite"):
            cfg = config.load(RECIPES / pair / f"{method}.yaml")
            assert cfg["method"]["name"] == method and cfg["model"]["name"].startswith("torchvision.")
            assert (cfg["data"]["name"], cfg["data"]["root"], cfg["data"]["batch_size"]) == (
                "imagefolder", "data/imagenet", 512)
            assert cfg["optim"] == {"name": "sgd", "lr": 0.2, "momentum": 0.9, "dampening": 0, "nesterov": False,
                                    "weight_decay": 1e-4}
            assert (cfg["schedule"]["milestones"], cfg["schedule"]["gamma"], cfg["train"]["epochs"]) == (
                [30, 60, 90], 0.1, 100)
            assert cfg["teacher"]["checkpoint"] == "torchvision://IMAGENET1K_V1"
        assert config.load(RECIPES / pair / "kd.yaml")["method"]["options"] == {
            "temperature": 1.0, "ce_weight": 0.5, "kd_weight": 0.5, "logit_standardization": False}
        dkd = config.load(RECIPES / pair / "dkd.yaml")["method"]["options"]
        assert dkd == {"temperature": 1.0, "alpha": 1.0, "beta": beta, "ce_weight": 1.0, "warmup": 1.0,
                       "logit_standardization": False}
        cfg = config.load(RECIPES / pair / "blockkd.yaml")
        student, teacher = (models.create(getattr(cfg, k).name, num_classes=10) for k in ("model", "teacher"))
        distiller = methods.create("blockkd", student, teacher, (3, 64, 64), options=cfg.method.options)
        assert distiller.num_blocks == 4  # stages end at strides 4, 8, 16, 32 on both sides


# mdistiller's ImageNet baselines (configs/imagenet/{r34_r18,r50_mv1}/*.yaml): options, batch size, lr.
AT = ({"p": 2.0, "ce_weight": 1.0, "feat_weight": 1000.0}, 512, 0.2)
CRD = ({"ce_weight": 1.0, "weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5, "mode": "exact",
        "num_data": 1281167, "seed": 0}, 256, 0.1)
BASELINES = {
    ("resnet34_resnet18", "at"): AT,
    ("resnet50_mobilenetv1", "at"): AT,
    ("resnet34_resnet18", "crd"): CRD,
    ("resnet50_mobilenetv1", "crd"): CRD,
    ("resnet34_resnet18", "reviewkd"): ({"ce_weight": 1.0, "weight": 1.0, "warmup": 1.0, "max_mid_channels": 512,
                                         "student_preact": True}, 256, 0.1),
    ("resnet50_mobilenetv1", "reviewkd"): ({"ce_weight": 1.0, "weight": 8.0, "warmup": 1.0, "max_mid_channels": 256,
                                            "student_preact": True}, 256, 0.1),
    ("resnet50_mobilenetv1", "ofd"): ({"ce_weight": 1.0, "feat_weight": 0.0001, "kernel_size": 1}, 128, 0.05),
}


@pytest.mark.parametrize("pair,method", sorted(BASELINES))
def test_baseline_recipes_follow_mdistiller_imagenet_settings_and_train_a_step(pair, method):
    options, batch_size, lr = BASELINES[pair, method]
    cfg = config.load(RECIPES / pair / f"{method}.yaml")
    assert cfg["method"] == {"name": method, "options": options}
    assert (cfg["data"]["batch_size"], cfg["optim"]["lr"], cfg["optim"]["name"]) == (batch_size, lr, "sgd")
    assert (cfg["schedule"]["milestones"], cfg["train"]["epochs"]) == ([30, 60, 90], 100)
    assert cfg["teacher"]["checkpoint"] == "torchvision://IMAGENET1K_V1"
    # One training step of the recipe's method on its pair (CRD with a small memory bank: 1.3M rows is 1.3 GB).
    student, teacher = (models.create(getattr(cfg, k).name, num_classes=10) for k in ("model", "teacher"))
    small = {"num_data": 64, "nce_k": 16} if method == "crd" else {}
    opts = methods.parse_options(method, {**options, **small})
    distiller = methods.create(method, student, teacher.eval(), (3, 64, 64), options=opts).train()
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 7])
    _, losses = distiller(x, y, epoch=1.0, **({"index": torch.tensor([3, 40])} if method == "crd" else {}))
    assert len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in distiller.student.parameters() if p.requires_grad)


def test_dot_recipes_follow_mdistiller_imagenet_settings():
    for pair in ("resnet34_resnet18", "resnet50_mobilenetv1"):
        cfg = config.load(RECIPES / pair / "kd_dot.yaml")
        assert cfg["optim"] == {"name": "dot", "lr": 0.2, "momentum": 0.9, "delta": 0.09, "weight_decay": 1e-4}
        assert cfg["method"] == config.load(RECIPES / pair / "kd.yaml")["method"]
        assert cfg["output"]["name"] == config.load(RECIPES / pair / "kd.yaml")["output"]["name"] + "-dot"


def test_torchvision_and_timm_names():
    assert models.prefixes() == ["torchvision.", "timm.", "hf.", "hf-config."]
    for name in models.names():  # every listed name can be created (the prefixes are listed apart)
        with torch.device("meta"):
            assert isinstance(models.create(name, num_classes=10), torch.nn.Module), name
    gray = models.create("torchvision.resnet18", num_classes=7, in_channels=1)  # first conv replaced
    assert gray(torch.zeros(2, 1, 32, 32)).shape == (2, 7)
    assert isinstance(models.create("timm.test_resnet", num_classes=5), torch.nn.Module)
    for name, hint in (("torchvision.resnet19", "torchvision.resnet18"), ("resnet18", "torchvision.resnet18"),
                       ("timm.mobilenetv3_smal_050", "timm.mobilenetv3_small_050")):
        with pytest.raises(BlockKDError, match=f"unknown model '{name}'; did you mean '{hint}'"):
            models.create(name)
    with pytest.raises(BlockKDError, match=r"unknown teacher model 'torchvision.resnet35' \(teacher.name in override"):
        config.load(RECIPES / "resnet34_resnet18/kd.yaml", ["teacher.name=torchvision.resnet35"])


def test_torchvision_weights_cached_offline_and_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BlockKDError, match=r"cannot download .* download https://download.pytorch.org/models/"
                                           r"resnet18-f37072fd.pth and pass its path instead of torchvision://DEFAULT"):
        models.torchvision_state_dict("torchvision.resnet18", "torchvision://DEFAULT")
    # Once downloaded (here: a file put where torch.hub caches it), it is read without the network.
    sd = torchvision.models.resnet18().state_dict()
    (tmp_path / "hub/checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(sd, tmp_path / "hub/checkpoints/resnet18-f37072fd.pth")
    loaded = models.torchvision_state_dict("torchvision.resnet18", "torchvision://IMAGENET1K_V1")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(BlockKDError, match="has no weights 'IMAGENET9K'; choose from IMAGENET1K_V1, DEFAULT"):
        models.torchvision_state_dict("torchvision.resnet18", "torchvision://IMAGENET9K")
    with pytest.raises(BlockKDError, match="not a torchvision"):
        models.torchvision_state_dict("resnet8", "torchvision://DEFAULT")


def test_folder_loader_flips_on_the_device(image_root):
    cfg = {"name": "imagefolder", "root": str(image_root), "image_size": 32, "batch_size": 24,
           "eval_batch_size": 6, "num_workers": 0}

    def direction(x: torch.Tensor) -> torch.Tensor:  # +1: dark to bright (as stored), -1: mirrored
        return torch.sign(x[:, :, :, -4:].mean((1, 2, 3)) - x[:, :, :, :4].mean((1, 2, 3)))

    bundle = data.build(cfg, device="cpu")
    signs = []
    for epoch in range(3):
        bundle.set_epoch(epoch)
        signs += [direction(x) for x, _ in bundle.train]
    signs = torch.cat(signs)
    assert 0.25 < (signs < 0).float().mean() < 0.75  # about half of the training images are mirrored
    assert all((direction(x) > 0).all() for x, _ in bundle.test)  # evaluation never flips
    assert all((direction(x) > 0).all() for x, _ in data.build({**cfg, "augment": False}, device="cpu").train)

    x = torch.arange(24, dtype=torch.uint8).view(4, 1, 2, 3)
    out = random_flip(x, torch.Generator().manual_seed(0))
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, x))


# ----------------------------------------------------------------------------------------- DeiT-style ViT recipes
VIT_PAIRS = {"deit_small_deit_tiny": ("timm.deit_small_patch16_224", "timm://fb_in1k", 0.5),
             "resnet50_deit_tiny": ("torchvision.resnet50", "torchvision://IMAGENET1K_V1", 2.0)}


@pytest.mark.parametrize("pair", sorted(VIT_PAIRS))
def test_vit_recipes_follow_deit_settings(pair):
    teacher, weights, beta = VIT_PAIRS[pair]
    for method in ("ce", "kd", "dkd", "blockkd"):
        cfg = config.load(RECIPES / pair / f"{method}.yaml")  # validates every key, model and method name
        assert cfg["method"]["name"] == method and cfg["model"]["name"] == "timm.deit_tiny_patch16_224"
        assert (cfg["teacher"]["name"], cfg["teacher"]["checkpoint"]) == (teacher, weights)
        assert (cfg["data"]["name"], cfg["data"]["image_size"], cfg["data"]["batch_size"]) == ("imagefolder", 224, 1024)
        optim = cfg["optim"]
        assert (optim["name"], optim["lr"], optim["weight_decay"], optim["betas"], optim["eps"]) == (
            "adamw", 5e-4 * 1024 / 512, 0.05, [0.9, 0.999], 1e-8)
        assert cfg["schedule"] == {"name": "cosine", "warmup_epochs": 5, "min_lr": 1e-5}
        assert cfg["train"]["epochs"] == 300
    assert config.load(RECIPES / pair / "dkd.yaml")["method"]["options"]["beta"] == beta
    assert config.load(RECIPES / pair / "blockkd.yaml")["method"]["options"] == config.load(
        RECIPES / "resnet34_resnet18/blockkd.yaml")["method"]["options"]  # the shared ImageNet settings


@pytest.mark.parametrize("pair", sorted(VIT_PAIRS))
def test_blockkd_step_on_a_small_vit_pair(pair):
    """One Block-KD step with the recipe's architectures, built for 32x32 images (timm's img_size) and 10
    classes: the ViT student's transformer blocks match the teacher's blocks, and every part gets gradients."""
    import timm

    cfg = config.load(RECIPES / pair / "blockkd.yaml")
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    family, arch = cfg["teacher"]["name"].split(".", 1)
    teacher = (timm.create_model(arch, num_classes=10, img_size=32) if family == "timm"
               else torchvision.models.get_model(arch, num_classes=10))
    distiller = methods.create("blockkd", student, teacher, (3, 32, 32), options=cfg.method.options)
    distiller.train()
    logits, losses = distiller(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    sum(losses.values()).backward()
    assert logits.shape == (4, 10) and all(torch.isfinite(v) for v in losses.values())
    assert distiller.num_blocks >= 2 and all(p.grad is not None for p in distiller.connectors.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in distiller.teacher.parameters())


def test_timm_weights_from_the_hub_offline_and_unknown(tmp_path, monkeypatch):
    """timm://TAG: timm's pretrained weights through its Hugging Face hub download (replaced here: the
    network is never used); offline, a one-line error names the file to fetch and the path to pass."""
    import safetensors.torch
    import timm
    import timm.models._hub as hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BlockKDError, match=r"cannot load the timm weights deit_tiny_patch16_224.fb_in1k .* download "
                                           r"https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k/resolve/main/"
                                           r"model.safetensors and pass its path instead of timm://fb_in1k"):
        models.timm_state_dict("timm.deit_tiny_patch16_224", "timm://fb_in1k")
    # Downloaded (here: a file the replaced download returns), the weights are those of the file.
    sd = timm.create_model("deit_tiny_patch16_224").state_dict()
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors")
    asked = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda repo_id, filename, **kw: asked.append((repo_id, filename))
                        or str(tmp_path / "model.safetensors"))
    loaded = models.timm_state_dict("timm.deit_tiny_patch16_224", "timm://DEFAULT")
    assert asked[0] == ("timm/deit_tiny_patch16_224.fb_in1k", "model.safetensors")  # timm's default tag
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    teacher = timm.create_model("deit_tiny_patch16_224")  # as teacher.checkpoint: timm://fb_in1k
    imagenet = SimpleNamespace(num_classes=1000, in_channels=3, name="imagenet")
    load_model_weights(teacher, "timm://fb_in1k", role="teacher", name="timm.deit_tiny_patch16_224", data=imagenet)
    assert torch.equal(teacher.state_dict()["head.weight"], sd["head.weight"])
    with pytest.raises(BlockKDError, match="has no pretrained weights 'in22k'; choose from DEFAULT, fb_in1k"):
        models.timm_state_dict("timm.deit_tiny_patch16_224", "timm://in22k")
    with pytest.raises(BlockKDError, match="not a timm"):
        models.timm_state_dict("torchvision.resnet18", "timm://DEFAULT")
