"""What several test files share: tiny distillers and models, CIFAR batches, dotted recipe changes, reading a run's
metrics, and the resume comparison.

Why one module: a helper copied into several files drifts. Tests import these (``from helpers import ...``;
conftest.py puts tests/ on the path). What the benchmarks also use lives in benchmarks/ and tests import
it from there, never a copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import blockkd
from blockkd.engine import train

SHAPE = (3, 32, 32)
# Wall-clock fields of metrics rows and summaries: they differ between runs that are otherwise equal.
TIMING = ("images_per_s", "train_time_s", "epoch_time_s", "wall_time_s")


def make(method: str, student: str = "resnet8", teacher: str = "resnet14", num_classes: int = 10,
         shape=SHAPE, **options) -> blockkd.methods.Distiller:
    """``method`` on fresh CIFAR-zoo models (tiny by default: resnet14 teaches resnet8)."""
    s = blockkd.models.create(student, num_classes=num_classes, in_channels=shape[0])
    t = blockkd.models.create(teacher, num_classes=num_classes, in_channels=shape[0])
    return blockkd.methods.create(method, s, t, input_shape=shape, **options)


def cifar_pair(teacher: str = "resnet32x4", student: str = "resnet8x4", classes: int = 100):
    """(student, teacher) of the CIFAR zoo, initialised from seed 0."""
    torch.manual_seed(0)
    return blockkd.models.create(student, num_classes=classes), blockkd.models.create(teacher, num_classes=classes)


def cifar_batch(n: int = 8, classes: int = 100, size: int = 32, views: int = 1) -> tuple[torch.Tensor, ...]:
    """``views`` batches of ``n`` random images, then their labels, from one generator seeded 1 (drawn in that
    order: the same tensors for the same arguments)."""
    g = torch.Generator().manual_seed(1)
    images = tuple(torch.randn(n, 3, size, size, generator=g) for _ in range(views))
    return (*images, torch.randint(0, classes, (n,), generator=g))


def three_pairs():
    """(name, student, teacher, input shape, classes) for three pairs: two of the CIFAR zoo (one across two
    families) and torchvision's resnet34 -> resnet18 at 64x64."""
    import torchvision  # only the tests that train on the three pairs need it

    yield "resnet32x4->resnet8x4", *cifar_pair(), (3, 32, 32), 100
    yield "wrn_40_2->ShuffleV1", *cifar_pair("wrn_40_2", "ShuffleV1"), (3, 32, 32), 100
    torch.manual_seed(0)
    yield ("torchvision resnet34->resnet18", torchvision.models.resnet18(num_classes=10),
           torchvision.models.resnet34(num_classes=10), (3, 64, 64), 10)


def tiny_llama(layers: int, width: int, vocab: int = 300, eos_token_id: int = 0, seed: int | None = None):
    """A tiny Llama-style ``LlamaForCausalLM`` (2 heads, 1 key-value head, tied embeddings, token 0 for padding and
    BOS), initialised from ``seed`` when one is given (else from torch's RNG as it stands)."""
    import transformers  # optional heavy dependency: only the LM tests need it

    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=0, eos_token_id=eos_token_id))


def assert_resumes_exactly(cfg: Callable[[str, int], dict], out: Path) -> bytes:
    """Two epochs in one go (run ``full``) == one epoch, then resumed for the second (run ``resumed``): the last
    weights' bytes are equal. ``cfg(name, epochs)`` is the recipe, its runs under ``out``; returns the bytes."""
    train(cfg("full", 2))
    train(cfg("resumed", 1))
    train(cfg("resumed", 2), resume=True)
    weights = [(Path(out) / r / "last" / "weights.safetensors").read_bytes() for r in ("full", "resumed")]
    assert weights[0] == weights[1]
    return weights[0]


def step_kwargs(d: nn.Module, n: int, x: torch.Tensor | None = None) -> dict[str, Any]:
    """The extra keywords of a training step on ``n`` samples, as the trainer passes them: their indices, for
    methods with per-sample state (``needs_index``: CRD's memory bank), and a second view of the batch ``x``
    for methods that ask for one (``needs_strong_view``: MLKD; here the flipped images stand in for it)."""
    kwargs: dict[str, Any] = {"index": torch.arange(n)} if getattr(d, "needs_index", False) else {}
    if getattr(d, "needs_strong_view", False) and x is not None:
        kwargs["x_strong"] = x.flip(-1)
    return kwargs


def with_changes(cfg: dict, **dotted: Any) -> dict:
    """``cfg`` with ``section__key=value`` changes applied in place (``method__options__gamma=2``)."""
    for key, value in dotted.items():
        *path, leaf = key.split("__")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def rows(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def untimed(obj: Any) -> Any:
    """Metrics rows or a summary without the wall-clock fields (and without the run folder's path)."""
    if isinstance(obj, list):
        return [untimed(r) for r in obj]
    return {k: v for k, v in obj.items() if k not in TIMING and k != "run_dir"}


def assert_shares(view: nn.Module, model: nn.Module) -> None:
    """Every parameter of the view is one of the model's (no copies), and all of them are used."""
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
