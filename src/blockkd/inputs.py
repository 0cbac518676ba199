"""Model inputs: what a batch's ``x`` looks like and how a whole model is run on it.

Why a ground-floor module: blocks, methods, data and the engine all run models on inputs and build
dummy ones; none of them should import another package for that.

* A model input ``x`` is a tensor (images: ``(B, C, H, W)``) or a mapping of per-sample tensors, batch
  first (text: ``{"input_ids": (B, L), "attention_mask": (B, L), ...}``, what a tokenizer returns).
  :func:`call_model` runs a whole model on either (``model(x)`` / ``model(**x)``, then ``.logits`` if
  the output has them), so methods never special-case Hugging Face models.
* An input *spec* says what a dummy input looks like (for probing blocks and matching resolutions): a
  shape ``(C, H, W)`` (zeros), a mapping of per-sample shapes such as ``{"input_ids": (16,),
  "attention_mask": (16,)}`` (:func:`text_input`; integer tensors: ones for ``*mask`` keys, zeros
  otherwise), or an example input itself (a tensor or a mapping of tensors, batch included).
  See :func:`example_input`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn


def call_model(model: nn.Module, x: Any) -> torch.Tensor:
    """``model``'s logits for the model input ``x``: ``model(**x)`` for a mapping, else ``model(x)``;
    an output with ``.logits`` (a Hugging Face ``ModelOutput``) gives those."""
    out = model(**x) if isinstance(x, Mapping) else model(x)
    return getattr(out, "logits", out)


def batch_size_of(x: Any) -> int:
    """The number of samples in a model input (tensor or mapping of tensors)."""
    if isinstance(x, Mapping):
        return next(iter(x.values())).shape[0]
    return x.shape[0]


def text_input(length: int = 16, *, token_type_ids: bool = False) -> dict[str, tuple[int, ...]]:
    """The input spec of a text classifier on sequences of ``length`` tokens (ids and attention mask)."""
    spec = {"input_ids": (length,), "attention_mask": (length,)}
    if token_type_ids:
        spec["token_type_ids"] = (length,)
    return spec


def as_input_spec(spec: Any) -> Any:
    """``spec`` normalised: a shape becomes a tuple of ints, a mapping of shapes a dict of tuples;
    example inputs (tensors, mappings of tensors) are kept as they are."""
    if isinstance(spec, torch.Tensor):
        return spec
    if isinstance(spec, Mapping):
        if all(isinstance(v, torch.Tensor) for v in spec.values()):
            return spec
        return {str(k): tuple(int(d) for d in v) for k, v in spec.items()}
    return tuple(int(d) for d in spec)


def describe_spec(spec: Any) -> str:
    spec = as_input_spec(spec)
    if isinstance(spec, torch.Tensor):
        return f"of shape {tuple(spec.shape)}"
    if isinstance(spec, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(getattr(v, 'shape', v))}" for k, v in spec.items()) + "}"
    return f"of shape {spec}"


def example_input(spec: Any, batch_size: int = 2, *, device: Any = None, dtype: torch.dtype | None = None) -> Any:
    """A dummy model input for the input spec ``spec`` (see the module docstring), on ``device``.

    Image shapes give zeros in ``dtype``; mappings of shapes give integer tensors (token ids and masks):
    ones for keys ending in ``mask``, zeros otherwise. Example inputs are moved to ``device`` (and their
    floating-point tensors cast to ``dtype``).
    """
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype if dtype is not None and t.is_floating_point() else None)

    spec = as_input_spec(spec)
    if isinstance(spec, torch.Tensor):
        return move(spec)
    if isinstance(spec, Mapping):
        if all(isinstance(v, torch.Tensor) for v in spec.values()):
            return {k: move(v) for k, v in spec.items()}
        return {k: (torch.ones if k.endswith("mask") else torch.zeros)(batch_size, *shape, dtype=torch.long,
                                                                        device=device)
                for k, shape in spec.items()}
    return torch.zeros(batch_size, *spec, device=device, dtype=dtype)


def is_image_shape(spec: Any) -> bool:
    return isinstance(spec, Sequence) and not isinstance(spec, str) and all(isinstance(d, int) for d in spec)

