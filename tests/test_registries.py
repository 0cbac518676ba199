"""The contract of each registry's entries, checked for every registered name (a new entry is picked up).

Optimizers take a step from their defaults; schedules give finite factors in [0, 1] that end no higher than
they start; connectors map a feature map to the target shape from a larger and a smaller one, gradients
reaching every weight; datasets declare help for every key and are listed in docs/config.md. What each
entry computes is tested beside it (test_engine.py, test_dot.py, test_data.py ...).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

import blockkd.blocks  # noqa: F401  (imports the splitter modules it lists)
from blockkd import config, data, optim, schema
from blockkd.methods.connectors import CONNECTORS, Connector

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", optim.OPTIMIZERS.names())
def test_every_optimizer_steps_from_its_defaults(name):
    section = config.validate({"model": {"name": "resnet8"}, "optim": {"name": name, "lr": 0.01},
                               "data": {"name": "synthetic"}}).optim
    w = torch.nn.Parameter(torch.ones(3))
    opt = optim.build_optimizer([w], section)
    loss = (w * torch.arange(3.0)).sum()
    loss.backward()
    if optim.OPTIMIZERS.get(name).needs_loss_split:  # the gradient so far is the distillation one (see DOT)
        opt.stash_distill_grads()
        w.grad = None
        (w ** 2).sum().backward()
    opt.step()
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), torch.ones(3))


@pytest.mark.parametrize("warmup", [0.0, 1.0])
@pytest.mark.parametrize("name", optim.SCHEDULES.names())
def test_every_schedule_gives_factors_in_0_1(name, warmup):
    options = optim.SCHEDULES.get(name).options()
    if hasattr(options, "milestones"):  # a milestone inside these 4 epochs
        options = dataclasses.replace(options, milestones=[2])
    factors = [optim.lr_factor(s, name=name, options=options, steps_per_epoch=4, epochs=4, warmup_epochs=warmup)
               for s in range(16)]
    assert all(math.isfinite(f) and 0 <= f <= 1 for f in factors), factors
    assert factors[-1] <= factors[0] if not warmup else factors[0] < factors[4]


@pytest.mark.parametrize("source", [(8, 8, 8), (8, 2, 2)], ids=["larger map", "smaller map"])
@pytest.mark.parametrize("kind", CONNECTORS.names())
def test_every_connector_maps_to_the_target_shape(kind, source):
    c = Connector(source, (16, 4, 4), kind).train()
    out = c(torch.randn(2, *source))
    assert out.shape == (2, 16, 4, 4)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in c.parameters())


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_every_dataset_is_declared_and_documented(name):
    entry = data.DATASETS.get(name)
    assert entry.help.strip()
    assert all(h.strip() for _, _, _, h in schema.describe(entry.options)), "every key needs its help text"
    assert f"- `{name}` — " in (ROOT / "docs" / "config.md").read_text(), "regenerate docs/config.md"


def test_every_splitter_module_is_imported_by_the_package():
    """A module of blocks/ that registers splitters must be imported in blocks/__init__.py, or its models
    silently fall back to torch.fx."""
    folder = ROOT / "src" / "blockkd" / "blocks"
    registering = sorted(p.stem for p in folder.glob("*.py")
                         if p.stem not in ("__init__", "core") and "register_splitter(" in p.read_text())
    assert registering, "no splitter module found: the test no longer matches blocks/"
    missing = [m for m in registering if f"blockkd.blocks.{m}" not in sys.modules]
    assert not missing, f"import {missing} in src/blockkd/blocks/__init__.py"
