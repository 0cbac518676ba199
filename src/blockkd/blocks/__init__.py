"""Block views of classifiers: ``split(model, n)`` -> ``Blocks`` (stages + head) and ``match``.

Registered splitters (looked up along the model's class MRO) cover the CIFAR zoo, torchvision's
ResNets and MobileNetV2, timm's CNNs (through their ``feature_info``), timm's Vision Transformers
(:mod:`.vit`), Hugging Face encoder classifiers (:mod:`.hf`) and causal LMs (:mod:`.hf_lm`); any other
model that torch.fx can trace is cut where its resolution changes. Model inputs may be tensors or mappings of
tensors (text); see :mod:`blockkd.inputs` for model inputs and :mod:`.core` for how blocks receive extra
inputs such as the attention mask.
For your own architecture::

    @blockkd.blocks.register_splitter(MyNet)
    def split_mynet(model):
        return [nn.Sequential(model.stem, model.stage1), model.stage2], nn.Sequential(model.pool, model.fc)

or, when its forward runs its children in order, ``register_splitter(MyNet)(children_splitter(["stage2"], "pool"))``.

``Blocks.features(x, preact=True)`` gives each block's output before its final ``nn.ReLU`` (see ``preact``).
"""
from . import hf, hf_lm, timm_cnn, torchvision_cnn, vit, zoo  # noqa: F401  (registers the built-in splitters)
from ..inputs import as_input_spec, call_model, example_input, text_input  # re-exported: the public API names them here
from .core import (Blocks, Chain, balanced_ends, children_splitter, find_splitter, named_sequence, register_splitter,
                   split)
from .match import common_resolutions, match

__all__ = ["Blocks", "Chain", "split", "match", "register_splitter", "children_splitter", "find_splitter",
           "named_sequence", "balanced_ends", "common_resolutions", "call_model", "example_input", "text_input",
           "as_input_spec"]
