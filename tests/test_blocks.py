"""Block views: exactness for the zoo and torchvision, registry, torch.fx fallback, regrouping, matching."""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import blockkd
from blockkd import models
from blockkd.blocks import Blocks, children_splitter, match, register_splitter, split
from blockkd.blocks.fx import fx_split
from blockkd.errors import BlockKDError
from helpers import assert_shares

CIFAR, FMNIST, TV = (3, 32, 32), (1, 28, 28), (3, 64, 64)


def assert_exact(view: nn.Module, model: nn.Module, shape, tol: float = 1e-5) -> None:
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert (view(x) - model(x)).abs().max().item() <= tol


def resolutions(view: Blocks, shape) -> list[tuple[int, ...]]:
    return [s[1:] for s in view.probe(shape)]


@lru_cache(maxsize=None)
def zoo(name: str, in_channels: int = 3) -> nn.Module:
    return models.create(name, in_channels=in_channels).eval()


@lru_cache(maxsize=None)
def torchvision_model(name: str) -> nn.Module:
    return tvm.get_model(name, weights=None).eval()


class TinyNet(nn.Module):
    """Unregistered CNN with a functional residual, functional pooling and a size-dependent flatten."""

    def __init__(self, strides=(1, 2, 2), mean_pool: bool = False, in_channels: int = 3):
        super().__init__()
        self.mean_pool = mean_pool
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, strides[0], 1), nn.BatchNorm2d(8), nn.ReLU())
        self.down1 = nn.Conv2d(8, 16, 3, strides[1], 1)
        self.res = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16))
        self.down2 = nn.Conv2d(16, 32, 3, strides[2], 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.down1(self.stem(x)))
        x = x + F.relu(self.res(x))
        x = F.relu(self.down2(x))
        x = x.mean((2, 3)) if self.mean_pool else F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


# --- exactness of the registered splitters ---------------------------------------------------------

# zoo + registered CNNs (the zoo's ViT, one block per transformer block: tests/test_timm.py)
@pytest.mark.parametrize("name", [n for n in models.names() if not n.startswith("vit_")])
def test_zoo_split_is_exact_one_block_per_resolution(name):
    model = zoo(name)
    view = split(model)
    assert view is not model and len(view) == len(view.blocks) >= 3
    assert_exact(view, model, CIFAR)
    assert_shares(view, model)
    res = resolutions(view, CIFAR)
    assert all(a[0] > b[0] for a, b in zip(res, res[1:])), res  # strictly shrinking: one block per resolution
    assert view.probe(CIFAR)[-1][0] == next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features


@pytest.mark.parametrize("name", ["resnet20", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_zoo_split_is_exact_on_one_channel_28px(name):
    model = zoo(name, in_channels=1)
    assert_exact(split(model), model, FMNIST)


def test_vgg_split_is_exact_at_64px_where_pool3_applies():
    model = zoo("vgg8")
    view = split(model)
    assert_exact(view, model, TV)
    assert resolutions(view, TV) == [(64, 64), (32, 32), (16, 16), (4, 4)]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "mobilenet_v2"])
def test_torchvision_split_is_exact(name):
    model = torchvision_model(name)
    view = split(model)
    assert_exact(view, model, TV)
    assert_shares(view, model)
    assert resolutions(view, TV) == [(16, 16), (8, 8), (4, 4), (2, 2)]  # strides 4, 8, 16, 32


def test_zoo_splitters_are_registered_not_fx():
    """The registered splitters give plain module chains, not traced graphs."""
    view = split(zoo("resnet20"))
    assert view.blocks[1] is zoo("resnet20").layer2
    assert not any(isinstance(m, torch.fx.GraphModule) for m in view.modules())


# --- Blocks behaviour ------------------------------------------------------------------------------

def test_probe_restores_modes_and_reports_shapes():
    model = models.create("resnet8")
    model.train()
    model.layer2.eval()
    view = split(model)
    assert view.probe(CIFAR) == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert model.training and model.layer1.training and not model.layer2.training and model.layer3.training
    assert all(m.training for m in model.layer1.modules())
    # eval mode during the probe: running statistics untouched
    assert model.bn1.num_batches_tracked.item() == 0


def test_features_returns_every_block_output():
    model = zoo("resnet8")
    view = split(model)
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        feats, logits = view.features(x)
        assert [tuple(f.shape[1:]) for f in feats] == view.probe(CIFAR)
        assert torch.equal(logits, model(x))


@pytest.mark.parametrize("make", [lambda: models.create("resnet8"), lambda: TinyNet()], ids=["zoo", "fx"])
def test_training_the_view_trains_the_model(make):
    model = make().train()
    view = split(model, input_shape=CIFAR)
    assert_shares(view, model)
    x, y = torch.randn(4, *CIFAR), torch.randint(0, 10, (4,))
    expected = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = view(x)
    assert torch.allclose(out, expected, atol=1e-5)  # train mode too: batch statistics, same modules
    opt = torch.optim.SGD(view.parameters(), lr=0.1)
    F.cross_entropy(out, y).backward()
    opt.step()
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


# --- registry ------------------------------------------------------------------------------------

class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = -x
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("model", [Untraceable(), MLP()], ids=["untraceable", "no-spatial-stages"])
def test_unsplittable_model_says_how_to_register(model):
    with pytest.raises(BlockKDError) as err:
        split(model, input_shape=CIFAR)
    msg = str(err.value)
    assert "\n" not in msg and type(model).__name__ in msg
    assert f"@blockkd.blocks.register_splitter({type(model).__name__})" in msg


class Custom(nn.Module):
    """A forward that is *not* its children in order (head first in registration order)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)
        self.b2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(x)).amax((2, 3)))


class CustomChild(Custom):
    pass


class AmaxHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax((2, 3))


@register_splitter(Custom)
def split_custom(model: Custom):
    return [model.b1, model.b2], nn.Sequential(AmaxHead(), model.fc)


def test_custom_registration_is_used_and_inherited_through_the_mro():
    for model in (Custom().eval(), CustomChild().eval()):
        view = split(model)
        assert view.blocks[0] is model.b1 and view.blocks[1] is model.b2
        assert_exact(view, model, CIFAR)
    assert blockkd.blocks.find_splitter(CustomChild()) is split_custom


def test_registration_by_dotted_class_name_wins_over_a_base_class():
    class Named(Custom):
        pass

    @register_splitter(f"{Named.__module__}.{Named.__qualname__}")
    def one_block(model):
        return [nn.Sequential(model.b1, model.b2)], nn.Sequential(AmaxHead(), model.fc)

    model = Named().eval()
    assert blockkd.blocks.find_splitter(model) is one_block
    assert len(split(model)) == 1
    assert_exact(split(model), model, CIFAR)


def test_children_splitter_names_a_missing_child():
    with pytest.raises(BlockKDError, match="no child 'layer9'.*layer3"):
        children_splitter(["layer9"], "avgpool")(zoo("resnet8"))


def test_bad_splitter_output_is_reported():
    class Bad(nn.Module):
        pass

    register_splitter(Bad)(lambda m: ([], nn.Identity()))
    with pytest.raises(BlockKDError, match="splitter for Bad"):
        split(Bad())


# --- torch.fx fallback -----------------------------------------------------------------------------

@pytest.mark.parametrize("mean_pool", [False, True], ids=["adaptive-pool", "mean"])
def test_fx_fallback_on_a_custom_cnn(mean_pool):
    model = TinyNet(mean_pool=mean_pool).eval()
    view = split(model, input_shape=CIFAR)
    assert all(isinstance(b, torch.fx.GraphModule) for b in view.blocks)
    assert view.probe(CIFAR) == [(8, 32, 32), (16, 16, 16), (32, 8, 8)]  # stage 2 ends after the residual add
    assert_exact(view, model, CIFAR)
    assert_shares(view, model)
    assert view.blocks[1].get_submodule("model.down1") is model.down1


def test_fx_fallback_default_probe_shape_uses_first_conv_channels():
    model = TinyNet(in_channels=1).eval()
    view = split(model)
    assert view.probe(FMNIST) == [(8, 28, 28), (16, 14, 14), (32, 7, 7)]
    assert_exact(view, model, FMNIST)


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_x_400mf"])
def test_fx_fallback_on_unregistered_torchvision_models(name):
    model = torchvision_model(name)
    assert blockkd.blocks.find_splitter(model) is None
    view = split(model, input_shape=TV)
    assert_exact(view, model, TV)
    assert_shares(view, model)
    shapes = view.probe(TV)
    assert [s[1:] for s in shapes] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    # stages end between torchvision's feature blocks (their output widths), not inside one
    assert [s[0] for s in shapes] == {"efficientnet_b0": [16, 24, 40, 112, 1280],
                                      "regnet_x_400mf": [32, 32, 64, 160, 400]}[name]


@pytest.mark.parametrize("name", ["resnet20", "ResNet18", "MobileNetV2", "vgg8"])
def test_fx_fallback_agrees_with_registered_splitters(name):
    model = zoo(name)
    view = Blocks(*fx_split(model, CIFAR))
    assert_exact(view, model, CIFAR)
    assert view.probe(CIFAR) == split(model).probe(CIFAR)


# --- regrouping --------------------------------------------------------------------------------

@pytest.mark.parametrize("n, first", [(1, (2048, 4, 4)), (2, (512, 16, 16)), (3, (512, 16, 16)), (4, (256, 32, 32))])
def test_split_regroups_consecutive_stages(n, first):
    model = zoo("ResNet50")
    view = split(model, n)
    assert len(view) == n
    assert view.probe(CIFAR)[0] == first  # extra stages join the earlier blocks
    assert view.probe(CIFAR)[-1] == (2048, 4, 4)
    assert_exact(view, model, CIFAR)
    assert_shares(view, model)


@pytest.mark.parametrize("n", [0, 5, 4.0, True])
def test_split_rejects_impossible_n(n):
    with pytest.raises(BlockKDError, match="4 natural stages"):
        split(zoo("ResNet50"), n)


def test_split_of_a_view_regroups_it():
    view = split(zoo("vgg8"))
    assert len(split(view, 2)) == 2 and split(view) is view


# --- matching ------------------------------------------------------------------------------------

PAIRS = [  # teacher, student, n at 32x32 (shared resolutions ending before both ends, plus the end)
    ("vgg13", "MobileNetV2", 3), ("resnet32x4", "ShuffleV1", 2), ("resnet32x4", "ShuffleV2", 2),
    ("ResNet50", "MobileNetV2", 3), ("wrn_40_2", "ShuffleV1", 2),
    ("resnet56", "resnet20", 3), ("resnet110", "resnet32", 3), ("resnet32x4", "resnet8x4", 3),
    ("wrn_40_2", "wrn_16_2", 3), ("wrn_40_2", "wrn_40_1", 3), ("vgg13", "vgg8", 4),
]


def check_match(student, teacher, shape, n_expected, n=None):
    s_view, t_view = match(student, teacher, shape, n=n)
    assert len(s_view) == len(t_view) == n_expected
    rs, rt = resolutions(s_view, shape), resolutions(t_view, shape)
    assert rs[:-1] == rt[:-1], (rs, rt)  # every boundary but the end at the same resolution
    assert_exact(s_view, student, shape)
    assert_exact(t_view, teacher, shape)
    return rs, rt


@pytest.mark.parametrize("teacher, student, n", PAIRS, ids=[f"{t}-{s}" for t, s, _ in PAIRS])
def test_match_cifar_pairs(teacher, student, n):
    check_match(zoo(student), zoo(teacher), CIFAR, n)


@pytest.mark.parametrize("teacher, student, n", [
    ("wrn_40_2", "ShuffleV1", 2), ("vgg13", "MobileNetV2", 3), ("ResNet50", "MobileNetV2", 3),
    ("resnet32x4", "ShuffleV2", 2), ("resnet56", "resnet20", 3)])
def test_match_fashion_mnist_pairs(teacher, student, n):
    check_match(zoo(student, 1), zoo(teacher, 1), FMNIST, n)


def test_match_vgg13_mobilenetv2_boundaries():
    rs, rt = check_match(zoo("MobileNetV2"), zoo("vgg13"), CIFAR, 3)
    assert rs == [(16, 16), (8, 8), (2, 2)] and rt == [(16, 16), (8, 8), (4, 4)]


@pytest.mark.parametrize("teacher, student", [("resnet34", "resnet18"), ("resnet50", "mobilenet_v2")])
def test_match_torchvision_pairs(teacher, student):
    shape = (3, 96, 96)
    rs, _ = check_match(torchvision_model(student), torchvision_model(teacher), shape, 4)
    assert rs == [(24, 24), (12, 12), (6, 6), (3, 3)]


def test_match_smaller_n_keeps_aligned_boundaries():
    rs, rt = check_match(zoo("vgg8"), zoo("vgg13"), CIFAR, 2, n=2)
    assert rs == rt == [(16, 16), (4, 4)]


def test_match_larger_n_pairs_stages_by_position():
    s_view, t_view = match(zoo("ShuffleV1"), zoo("resnet32x4"), CIFAR, n=3)
    assert resolutions(s_view, CIFAR) == [(16, 16), (8, 8), (4, 4)]
    assert resolutions(t_view, CIFAR) == [(32, 32), (16, 16), (8, 8)]
    assert_exact(s_view, zoo("ShuffleV1"), CIFAR)


def test_match_too_many_blocks_names_counts_and_resolutions():
    with pytest.raises(BlockKDError) as err:
        match(zoo("resnet20"), zoo("resnet56"), CIFAR, n=4)
    msg = str(err.value)
    assert "n=4" in msg and "3 stages ending at [32x32, 16x16, 8x8]" in msg and "\n" not in msg


def test_match_without_shared_resolutions():
    student, teacher = TinyNet(strides=(3, 3, 3)).eval(), zoo("resnet20")
    with pytest.raises(BlockKDError) as err:
        match(student, teacher, CIFAR)
    msg = str(err.value)
    assert "share no resolution" in msg and "[11x11, 4x4, 2x2]" in msg and "[32x32, 16x16, 8x8]" in msg
    s_view, t_view = match(student, teacher, CIFAR, n=2)  # by position
    assert len(s_view) == len(t_view) == 2
    assert_exact(s_view, student, CIFAR)
