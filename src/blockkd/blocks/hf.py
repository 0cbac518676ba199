"""Splitters for Hugging Face encoder classifiers: BERT, DistilBERT, RoBERTa and ALBERT
``*ForSequenceClassification``.

Natural blocks are single encoder layers: block 1 is the embeddings (ALBERT: plus its embedding
projection) and layer 1; block k is layer k; the head is what follows the last layer (BERT and ALBERT:
pooler on the first token, dropout, classifier; DistilBERT: first token, pre-classifier, ReLU, dropout,
classifier; RoBERTa: its classification head, which takes the first token). :func:`blockkd.blocks.match`
then groups consecutive layers so that teacher and student have the same number of blocks (by depth).

Every layer block names ``extra_inputs = ("attention_mask",)``: it receives the model input's 2D padding
mask and builds the model's own 4D attention mask from it (``create_bidirectional_mask`` with the model's
config, so eager and SDPA attention both get what they expect). The model input is what the tokenizer
gives, ``{"input_ids", "attention_mask", "token_type_ids"?, ...}``, or a tensor of input ids.
ALBERT's layers share weights: its blocks are iterations of the shared layer groups, so one module
appears in several blocks (the student's blocks then train the same weights).

transformers is never imported here: the splitters are registered by dotted class name, and every other
``transformers`` class gets a one-line error instead of the torch.fx fallback.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import BlockKDError
from .core import HOW_TO_REGISTER, Blocks, Chain, register_splitter, verify_on_tokens

SUPPORTED = ("BertForSequenceClassification", "DistilBertForSequenceClassification",
             "RobertaForSequenceClassification", "AlbertForSequenceClassification")


class FirstToken(nn.Module):
    """``(B, L, D) -> (B, D)``: the first token (``[CLS]`` / ``<s>``)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]


class Embed(nn.Module):
    """The start of block 1: a model input (mapping, or a tensor of input ids) -> embeddings ``(B, L, D)``."""

    def __init__(self, embeddings: nn.Module, project: nn.Module | None = None):
        super().__init__()
        self.embeddings = embeddings
        self.project = project if project is not None else nn.Identity()
        params = inspect.signature(embeddings.forward).parameters
        self.keys = tuple(k for k in ("input_ids", "token_type_ids", "position_ids", "inputs_embeds") if k in params)

    def forward(self, x: Any) -> torch.Tensor:
        if not isinstance(x, Mapping):
            x = {"input_ids": x}
        return self.project(self.embeddings(**{k: x[k] for k in self.keys if x.get(k) is not None}))


class Layers(nn.Module):
    """Consecutive encoder layers on hidden states ``(B, L, D)``, with the input's attention mask.

    The 2D padding mask becomes what the layers take as the model itself builds it: with the modeling
    module's ``create_bidirectional_mask`` and the model's config (transformers 5: eager, SDPA ... each get
    their format); with older versions, the additive ``(B, 1, 1, L)`` mask (DistilBERT: the 2D mask).
    """

    extra_inputs = ("attention_mask",)

    def __init__(self, layers: list[nn.Module], base: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = base.config  # plain attributes (no closures): the view pickles and deep-copies
        self.create_mask = getattr(sys.modules.get(type(base).__module__), "create_bidirectional_mask", None)
        self.legacy_2d = hasattr(base, "transformer")  # DistilBertModel

    def mask(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        if self.create_mask is not None:
            return self.create_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask)
        if attention_mask is None or self.legacy_2d:
            return attention_mask
        return (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = self.mask(h, attention_mask)
        for layer in self.layers:
            out = layer(h, mask)
            h = out[0] if isinstance(out, tuple) else out
        return h


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None, list[nn.Module], nn.Module, nn.Module]:
    """(embeddings, embedding projection, layers in order, base model, head) of a supported classifier."""
    name = type(model).__name__
    if getattr(model.config, "is_decoder", False):
        raise BlockKDError(f"{name} is configured as a decoder (causal attention); only encoders are supported")
    if hasattr(model, "distilbert"):
        base = model.distilbert
        head = nn.Sequential(FirstToken(), model.pre_classifier, nn.ReLU(), model.dropout, model.classifier)
        return base.embeddings, None, list(base.transformer.layer), base, head
    if hasattr(model, "roberta"):
        base = model.roberta
        return base.embeddings, None, list(base.encoder.layer), base, model.classifier
    if hasattr(model, "albert"):
        base, enc = model.albert, model.albert.encoder
        if base.pooler is None:
            raise BlockKDError(f"{name} has no pooler, which its classifier reads")
        n, groups = model.config.num_hidden_layers, enc.albert_layer_groups
        layers = [groups[int(i / (n / len(groups)))] for i in range(n)]  # as AlbertTransformer.forward
        head = nn.Sequential(FirstToken(), base.pooler, base.pooler_activation, model.dropout, model.classifier)
        return base.embeddings, enc.embedding_hidden_mapping_in, layers, base, head
    base = model.bert
    if base.pooler is None:
        raise BlockKDError(f"{name} has no pooler, which its classifier reads")
    head = nn.Sequential(base.pooler, model.dropout, model.classifier)
    return base.embeddings, None, list(base.encoder.layer), base, head


def split_encoder_classifier(model: nn.Module) -> Blocks:
    """One block per encoder layer (block 1 with the embeddings), then the classifier head; checked exact."""
    embeddings, project, layers, base, head = _parts(model)
    if not layers:
        raise BlockKDError(f"{type(model).__name__} has no encoder layers")
    first = Chain(Embed(embeddings, project), Layers(layers[:1], base))
    view = Blocks([first, *(Layers([layer], base) for layer in layers[1:])], head)
    verify_on_tokens(model, view, first_id=5, pad_ids=True)  # ids past BERT's special tokens
    return view


for _module, _classes in (("bert", ["BertForSequenceClassification"]),
                          ("distilbert", ["DistilBertForSequenceClassification"]),
                          ("roberta", ["RobertaForSequenceClassification"]),
                          ("albert", ["AlbertForSequenceClassification"])):
    for _cls in _classes:
        register_splitter(f"transformers.models.{_module}.modeling_{_module}.{_cls}")(split_encoder_classifier)


@register_splitter("transformers.*")
def split_unsupported(model: nn.Module) -> Blocks:
    name = type(model).__name__
    raise BlockKDError(f"no splitter for Hugging Face model {name}: supported are {', '.join(SUPPORTED)}, and the "
                       f"causal LMs (GPT-2, Llama, Qwen2/3, Mistral *ForCausalLM) on language-model data (data.name "
                       f"lm_*); {HOW_TO_REGISTER.format(cls=name)}")


__all__ = ["Embed", "Layers", "FirstToken", "split_encoder_classifier"]
