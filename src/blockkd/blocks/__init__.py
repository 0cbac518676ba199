"""Block views of classifiers: ``split(model, n)`` -> ``Blocks`` (stages + head) and ``match``.

Registered splitters (looked up along the model's class MRO) cover the CIFAR zoo, torchvision's
ResNets and MobileNetV2 and timm's CNNs (through their ``feature_info``); any other model that torch.fx
can trace is cut where its resolution changes.
For your own architecture::

    @blockkd.blocks.register_splitter(MyNet)
    def split_mynet(model):
        return [nn.Sequential(model.stem, model.stage1), model.stage2], nn.Sequential(model.pool, model.fc)

or, when its forward runs its children in order, ``register_splitter(MyNet)(children_splitter(["stage2"], "pool"))``.

``Blocks.features(x, preact=True)`` gives each block's output before its final ``nn.ReLU`` (see ``preact``).
"""
from . import timm, torchvision, zoo  # noqa: F401  (registers the built-in splitters; imports neither library)
from .core import Blocks, balanced_ends, children_splitter, find_splitter, named_sequence, register_splitter, split
from .match import common_resolutions, match

__all__ = ["Blocks", "split", "match", "register_splitter", "children_splitter", "find_splitter",
           "named_sequence", "balanced_ends", "common_resolutions"]
