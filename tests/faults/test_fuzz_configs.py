"""Guarantee 4 (property-based): random mutations of a valid tiny recipe (wrong types, unknown keys,
out-of-range values, random method options, random overrides) never raise anything but BlockKDError,
neither while the recipe is loaded nor when ``engine.train`` starts on it (one step, tiny data)."""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from blockkd import config, engine, methods
from blockkd.errors import BlockKDError
from faultlib import TINY

NAMES = ["resnet8", "resnet14", "resnet8x4", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
         "torchvision.nosuch", "timm.nosuch", "synthetic", "cifar100", "imagefolder", "fashion_mnist",
         *methods.names(), "auto", "cpu", "cuda", "off", "bf16", "fp16", "skip", "stop", "cosine", "constant",
         "conv1x1_bn", "uniform", "weighted"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.sampled_from([2**40, -(2**40)]),
    st.sampled_from([0.0, -1.5, 1e-3, 0.5, 2.0, 1e9, math.nan, math.inf, -math.inf]),
    st.text(max_size=6), st.sampled_from(NAMES))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))
SECTIONS = [*config.SECTIONS, "trainer", "base"]
KEYS = sorted({k.split(".", 1)[1] for k in config.recipe.all_keys()})
OPTIONS = sorted({o for m in methods.names() for o in methods.defaults(m)} | {"temp", "blocks"})


FLOATS = st.floats(-1, 20, allow_nan=False)
# plausible values per key (valid ones and edge cases in range), so that many examples reach the engine
TWEAKS = {
    "model.name": st.sampled_from(NAMES[:10]), "teacher.name": st.sampled_from(NAMES[:10]),
    "data.image_size": st.none() | st.integers(1, 40), "data.num_classes": st.integers(1, 12),
    "data.channels": st.integers(1, 4), "data.train_size": st.integers(1, 200),
    "data.test_size": st.integers(1, 100), "data.batch_size": st.integers(1, 300),
    "data.eval_batch_size": st.integers(1, 300), "data.augment": st.booleans(), "data.drop_last": st.booleans(),
    "data.train_subset": st.none() | st.integers(1, 300), "data.val_split": st.integers(0, 300),
    "optim.lr": st.floats(1e-4, 1e6), "optim.momentum": st.floats(0, 1), "optim.nesterov": st.booleans(),
    "optim.weight_decay": st.floats(0, 10),
    "schedule.name": st.sampled_from(["multistep", "cosine", "linear", "constant"]),
    "schedule.milestones": st.lists(st.integers(1, 5), unique=True).map(sorted), "schedule.gamma": st.floats(0.01, 10),
    "schedule.warmup_epochs": st.floats(0, 5), "schedule.min_lr": st.floats(0, 1),
    "train.epochs": st.integers(1, 3), "train.seed": st.integers(0, 2**32), "train.deterministic": st.booleans(),
    "train.amp": st.sampled_from(["auto", "off", "bf16"]),
    "train.channels_last": st.sampled_from(["auto", True, False]),
    "train.grad_clip": st.none() | st.floats(0.01, 10), "train.nonfinite": st.sampled_from(["stop", "skip"]),
    "train.eval_every": st.integers(1, 3), "teacher.allow_random": st.booleans(),
}


def _option_values(default):
    """Values of a method option's type (and in the neighbourhood of sensible ones)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int) or default is None:
        return st.none() | st.integers(-1, 6)
    if isinstance(default, float):
        return FLOATS
    return st.sampled_from(NAMES)


@st.composite
def mutated(draw) -> dict:
    """TINY with 1-4 random edits: a plausible value, a wrong value, a key removed or added, a section
    replaced, or the method and its options redrawn."""
    cfg = copy.deepcopy(TINY)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["tweak", "tweak", "method", "set", "delete", "add", "section"]))
        section = draw(st.sampled_from(SECTIONS))
        body = cfg.get(section)
        if kind == "tweak":
            key = draw(st.sampled_from(sorted(TWEAKS)))
            section, name = key.split(".")
            if not isinstance(cfg.get(section), dict):
                cfg[section] = {}
            cfg[section][name] = draw(TWEAKS[key])
        elif kind == "method":
            name = draw(st.sampled_from([*methods.names(), "blockdk"]))
            defaults = methods.defaults(name) if name in methods.names() else {"temp": 1.0}
            options = draw(st.dictionaries(st.sampled_from(sorted(defaults) or ["temp"]),
                                           st.one_of(*(_option_values(v) for v in defaults.values()), VALUES)
                                           if defaults else VALUES, max_size=3))
            cfg["method"] = {"name": name, "options": options}
            cfg["teacher"] = {"name": draw(st.sampled_from(NAMES[:10])), "allow_random": True}
        elif kind == "section":
            cfg[section] = draw(VALUES)
        elif isinstance(body, dict) and body and kind == "delete":
            body.pop(draw(st.sampled_from(sorted(body))))
        elif isinstance(body, dict):
            key = draw(st.sampled_from(sorted(body) + KEYS)) if kind == "set" else draw(st.text(min_size=1, max_size=6))
            body[key] = draw(VALUES)
    return cfg


def _loaded(cfg: dict, tmp: Path, overrides: list[str]) -> dict | None:
    """``cfg`` through the file loader (and the overrides); None when it is (correctly) refused."""
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    try:
        return config.load(path, overrides)
    except BlockKDError:
        return None


OVERRIDES = st.lists(st.one_of(
    st.text(max_size=12),
    st.builds("{}={}".format, st.sampled_from([f"{s}.{k}" for s in config.SECTIONS for k in KEYS[:12]]
                                              + ["method.options.temperature", "optim.lrr", "x"]),
              st.sampled_from(["0", "-1", "1e-3", "[1, 2]", "{a: 1}", "null", "nan", "!!python/name:os.system",
                               "x: [", ""]))),
    max_size=2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=mutated(), overrides=OVERRIDES)
def test_loading_a_mutated_recipe_raises_only_blockkd_errors(cfg, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded(cfg, Path(tmp), overrides)
    if loaded is not None:
        stored = loaded.to_dict()
        assert config.validate(stored).to_dict() == stored  # what a run stores validates again, unchanged
    try:
        config.validate(cfg)
    except BlockKDError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=mutated())
def test_starting_a_run_on_a_mutated_recipe_raises_only_blockkd_errors(cfg):
    with tempfile.TemporaryDirectory() as tmp:
        loaded = _loaded(cfg, Path(tmp), [])
        if loaded is None:
            return
        loaded = loaded.to_dict()
        loaded["train"].update(max_steps=1, compile=False)  # one step; compiling would take minutes on a CPU
        loaded["output"].update(dir=tmp, name="run", tensorboard=False, plot=False, progress=False)
        try:
            summary = engine.train(loaded)
        except BlockKDError as e:
            event(f"refused: {str(e)[:40]}")
            return
        event("trained")
        assert summary["steps"] == 1
