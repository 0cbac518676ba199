"""The model zoo: names, shapes, RepDistiller/mdistiller keys and parameter counts, checkpoint loading."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import blockkd.models as M
from blockkd.errors import BlockKDError
from blockkd.registry import Registry, UnknownNameError

ZOO = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
       "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
       "ResNet18", "ResNet50", "MobileNetV2", "mobile_half", "ShuffleV1", "ShuffleV2"]

# Published CIFAR-100 sizes (RepDistiller / mdistiller tables), in millions.
PUBLISHED_M = {"resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_40_2": 2.26, "resnet56": 0.86, "resnet20": 0.28,
               "resnet110": 1.73, "resnet32": 0.47, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "vgg13": 9.46, "vgg8": 3.96,
               "MobileNetV2": 0.81, "ShuffleV1": 0.95, "ShuffleV2": 1.36, "ResNet50": 23.71}

# A sample of the original checkpoints' keys and shapes (100 classes).
KEYS = {
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                  "layer3.0.bn2.running_var": (256,), "fc.weight": (100, 256)},
    "resnet56": {"layer2.0.downsample.1.weight": (32,), "layer3.8.conv2.weight": (64, 64, 3, 3)},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.bn1.weight": (128,),
                 "bn1.weight": (128,), "fc.bias": (100,)},
    "vgg8": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_mean": (64,),
             "block4.0.weight": (512, 512, 3, 3), "classifier.weight": (100, 512)},
    "vgg13": {"block1.3.weight": (128, 128, 3, 3), "block4.4.bias": (512,)},
    "MobileNetV2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.1.0.conv.3.weight": (48, 1, 3, 3),
                    "blocks.6.0.conv.7.weight": (160,), "conv2.0.weight": (1280, 160, 1, 1),
                    "classifier.0.weight": (100, 1280)},
    "ShuffleV1": {"layer1.0.conv1.weight": (54, 24, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1),
                  "layer3.3.conv3.weight": (960, 80, 1, 1), "linear.weight": (100, 960)},
    "ShuffleV2": {"layer1.0.conv1.weight": (24, 1, 3, 3), "layer1.1.conv1.weight": (58, 58, 1, 1),
                  "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
    "ResNet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "linear.weight": (100, 2048)},
    "ResNet18": {"layer2.0.shortcut.1.weight": (128,), "linear.weight": (100, 512)},
}
# Keys the originals do not have, where ours could easily add them by mistake.
ABSENT = {"ResNet18": "layer1.0.shortcut.0.weight", "wrn_40_2": "block1.layer.1.convShortcut.weight",
          "resnet8": "layer1.0.downsample.0.weight"}


def _children_in_order(model: nn.Module) -> list[nn.Module]:
    """The model's children in registration order, ModuleLists expanded (MobileNetV2's ``blocks``)."""
    out: list[nn.Module] = []
    for child in model.children():
        out.extend(child if isinstance(child, nn.ModuleList) else [child])
    return out


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so loading checks cover buffers too and eval outputs depend on them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_names_cover_the_zoo():
    assert set(ZOO) <= set(M.names())


@pytest.mark.parametrize("name", ZOO)
def test_runs_on_cifar_and_fashion_mnist_and_equals_its_children_in_order(name):
    with torch.no_grad():
        model = M.create(name).eval()
        x = torch.randn(2, 3, 32, 32)
        y = model(x)
        assert y.shape == (2, 100) and torch.isfinite(y).all()
        # The splitter's contract: running the children in order is the model.
        z = x
        for child in _children_in_order(model):
            z = child(z)
        torch.testing.assert_close(z, y, rtol=0, atol=0)

        small = M.create(name, num_classes=10, in_channels=1).eval()
        assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        # Same keys whatever the input size: only the first conv and the classifier change shape.
        assert list(small.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("name,millions", sorted(PUBLISHED_M.items()))
def test_parameter_counts_match_published(name, millions):
    n = M.num_params(M.create(name, num_classes=100))
    assert abs(n / 1e6 - millions) / millions < 0.01, n


@pytest.mark.parametrize("name", sorted(KEYS))
def test_state_dict_keys_and_shapes_match_originals(name):
    sd = M.create(name).state_dict()
    for key, shape in KEYS[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    if name in ABSENT:
        assert ABSENT[name] not in sd


def test_vgg_pools_before_block4_only_for_64px_inputs():
    seen = []
    with torch.no_grad():
        for channels, size in ((3, 32), (3, 64), (1, 28)):
            model = M.create("vgg8", in_channels=channels).eval()
            model.block4.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
            model(torch.randn(1, channels, size, size))
    assert seen == [4, 4, 3]  # 32 px: 4x4, no pool3; 64 px: 8x8 pooled to 4x4; 28 px: 3x3, no pool3


def test_initialisation_follows_the_originals():
    model = M.create("vgg13")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    conv = model.block3[0]  # 512x256x3x3: kaiming fan_out -> std sqrt(2 / (9 * 512))
    assert abs(conv.weight.std().item() / (2 / (9 * 512)) ** 0.5 - 1) < 0.05
    assert torch.all(conv.bias == 0)
    assert abs(model.classifier.weight.std().item() - 0.01) < 0.001 and torch.all(model.classifier.bias == 0)
    assert torch.all(M.create("wrn_16_1").fc.bias == 0)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(UnknownNameError, match="resnet8x4"):
        M.create("resnet8x5")
    with pytest.raises(BlockKDError, match="num_classes"):
        M.create("resnet8", num_classes=0)


def test_register_user_model(monkeypatch):
    fresh: Registry = Registry("model")
    for name, factory in M._MODELS.items():
        fresh.register(name, factory)
    monkeypatch.setattr(M, "_MODELS", fresh)

    @M.register("tiny")
    def tiny(num_classes: int, in_channels: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny" in M.names()
    assert M.create("tiny", num_classes=7, in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 7)


# --- load_weights -------------------------------------------------------------------------------------

@pytest.fixture
def source() -> nn.Module:
    return _randomise_bn(M.create("resnet8"))


def _assert_same_outputs(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_round_trip_repdistiller_checkpoint(tmp_path, source):
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"epoch": 240, "model": source.state_dict(), "best_acc": torch.tensor(72.5)}, path)
    loaded = M.load_weights(M.create("resnet8"), path)
    _assert_same_outputs(source, loaded)


@pytest.mark.parametrize("layout", ["state_dict", "net", "bare", "module.", "safetensors"])
def test_checkpoint_layouts(tmp_path, source, layout):
    sd = source.state_dict()
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(sd, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {f"module.{k}": v for k, v in sd.items()} if layout == "module." else sd
        torch.save(obj if layout in ("bare", "module.") else {layout: obj, "epoch": 3}, path)
    _assert_same_outputs(source, M.load_weights(M.create("resnet8"), path))


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path, source):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, path)
    _assert_same_outputs(source, M.load_weights(M.create("resnet8"), path))


def test_shape_mismatch_names_the_key_and_leaves_the_model_untouched(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    target = M.create("resnet8", num_classes=10)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(BlockKDError, match=r"fc\.weight \(file 100x64, model 10x64\)") as err:
        M.load_weights(target, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_and_unexpected_keys_are_listed(tmp_path, source):
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    with pytest.raises(BlockKDError, match=r"missing: layer1\.1\.conv1\.weight"):
        M.load_weights(M.create("resnet14"), path)
    with pytest.raises(BlockKDError, match=r"unexpected: layer1\.0\.conv1\.weight"):
        M.load_weights(M.create("wrn_16_1"), path)


def test_missing_file_and_file_without_weights(tmp_path):
    with pytest.raises(BlockKDError, match="nope.pth"):
        M.load_weights(M.create("resnet8"), tmp_path / "nope.pth")
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(BlockKDError, match="no state_dict"):
        M.load_weights(M.create("resnet8"), path)


class _Evil:
    """Unpickling this would create a file: the classic code-execution-on-load payload."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(BlockKDError, match="refused for safety") as err:
        M.load_weights(M.create("resnet8"), path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the guard is torch's weights_only loader
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_wrn_shortcut_takes_the_activated_input():
    """The original's quirk: when the width changes, convShortcut sees relu(bn1(x)), not x."""
    block = M.create("wrn_16_2").block1.layer[0].eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.convShortcut(torch.relu(block.bn1(x))))
