"""Splitters for Hugging Face decoder-only causal LMs: GPT-2 (``GPT2LMHeadModel``) and the Llama family
(``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``: rotary positions,
RMSNorm, optional sliding-window layers).

Blocks as for encoders (:mod:`.hf`): block 1 is the token embeddings (GPT-2: plus learned positions and the
embedding dropout) and decoder layer 1, block k is layer k, and the head is the final norm and the LM head,
giving logits ``(B, L, V)``. Every layer block names ``extra_inputs = ("attention_mask", "position_ids")``
and rebuilds from them what the model's own forward builds once: the causal mask (the modeling module's
``create_causal_mask`` / ``create_sliding_window_causal_mask`` with the model's config, so eager and SDPA
attention both get their format) and, for rotary models, the ``(cos, sin)`` position embeddings of the
model's own ``rotary_emb``. No KV cache is ever made (``cache=None, use_cache=False``): a frozen teacher
in training keeps nothing between batches. The split is checked equal to the model's forward on padded input.

Why the head is ``Sequential(norm, lm_head)``: the token distillers (:mod:`blockkd.methods.lm`) apply it to
a few token positions at a time (``head[0]`` then ``head[1]``), never to the whole ``(B, L, D)`` at once.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import BlockKDError
from .core import Blocks, Chain, register_splitter, verify_on_tokens

CAUSAL_LMS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def positions(h: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """The model's default positions 0..L-1 (``(1, L)``) where the input gives none."""
    if position_ids is not None:
        return position_ids
    return torch.arange(h.shape[1], device=h.device)[None]


class DecoderEmbed(nn.Module):
    """The start of block 1: a model input (mapping, or a tensor of input ids) -> hidden states ``(B, L, D)``."""

    extra_inputs = ("position_ids",)

    def __init__(self, tokens: nn.Module, learned_positions: nn.Module | None = None, drop: nn.Module | None = None):
        super().__init__()
        self.tokens = tokens
        self.learned_positions = learned_positions
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, x: Any, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        ids = x["input_ids"] if isinstance(x, Mapping) else x
        h = self.tokens(ids)
        if self.learned_positions is not None:
            h = h + self.learned_positions(positions(h, position_ids))
        return self.drop(h)


class DecoderLayers(nn.Module):
    """Consecutive decoder layers on hidden states ``(B, L, D)``, with the input's padding mask and positions."""

    extra_inputs = ("attention_mask", "position_ids")

    def __init__(self, layers: list[nn.Module], base: nn.Module, first: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = base.config  # plain attributes: the view pickles and deep-copies
        module = sys.modules[type(base).__module__]
        self.create_mask = module.create_causal_mask
        self.create_sliding = getattr(module, "create_sliding_window_causal_mask", None)
        types = getattr(base.config, "layer_types", None)
        self.types = list(types[first:first + len(layers)]) if types else ["full_attention"] * len(layers)
        self.rotary = getattr(base, "rotary_emb", None)
        self.gpt2 = self.rotary is None  # GPT-2 blocks take (h, cache, attention_mask, ...)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        pos = positions(h, position_ids)
        args = dict(config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=pos)
        masks = {"full_attention": self.create_mask(**args)}
        if "sliding_attention" in self.types:
            masks["sliding_attention"] = self.create_sliding(**args)
        extra = {} if self.gpt2 else {"position_embeddings": self.rotary(h, pos)}
        for layer, kind in zip(self.layers, self.types):
            out = layer(h, attention_mask=masks[kind], position_ids=pos, cache=None, use_cache=False, **extra)
            h = out[0] if isinstance(out, tuple) else out
        return h


def decoder_parts(model: nn.Module) -> tuple[DecoderEmbed, list[nn.Module], nn.Module, nn.Sequential]:
    """(embedding block, decoder layers in order, base model, head = Sequential(final norm, LM head))."""
    if hasattr(model, "transformer"):  # GPT-2
        base = model.transformer
        return DecoderEmbed(base.wte, base.wpe, base.drop), list(base.h), base, nn.Sequential(base.ln_f, model.lm_head)
    base = model.model
    n = base.config.num_hidden_layers
    return DecoderEmbed(base.embed_tokens), list(base.layers[:n]), base, nn.Sequential(base.norm, model.lm_head)


def split_causal_lm(model: nn.Module) -> Blocks:
    """One block per decoder layer (block 1 with the embeddings), then the final norm and LM head; checked exact."""
    embed, layers, base, head = decoder_parts(model)
    if not layers:
        raise BlockKDError(f"{type(model).__name__} has no decoder layers")
    first = Chain(embed, DecoderLayers(layers[:1], base, 0))
    view = Blocks([first, *(DecoderLayers([layer], base, i) for i, layer in enumerate(layers) if i)], head)
    verify_on_tokens(model, view, use_cache=False)
    return view


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of the supported causal LMs (by class name along its MRO)."""
    return any(cls.__name__ in CAUSAL_LMS.values() for cls in type(model).__mro__)


for _module, _cls in CAUSAL_LMS.items():
    register_splitter(f"transformers.models.{_module}.modeling_{_module}.{_cls}")(split_causal_lm)

__all__ = ["DecoderEmbed", "DecoderLayers", "split_causal_lm", "decoder_parts", "is_causal_lm", "CAUSAL_LMS"]
