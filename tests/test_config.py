"""Recipes: every shipped recipe validates; composition, overrides and each kind of user error."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockkd import config, methods
from blockkd.errors import BlockKDError
from blockkd.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FRAGMENT_NAMES = {"base.yaml", "pair.yaml"}


def is_fragment(path: Path) -> bool:
    """Fragments are composed into recipes and are not runnable alone (docs/config.md)."""
    return path.name in FRAGMENT_NAMES or path.parent.name == "methods"


RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not is_fragment(p))
FRAGMENTS = sorted(p for p in CONFIGS.rglob("*.yaml") if is_fragment(p))

# teacher, student, DKD beta (mdistiller), student lr
PAIRS = {
    ("resnet56", "resnet20"): (2.0, 0.05),
    ("resnet110", "resnet32"): (2.0, 0.05),
    ("resnet32x4", "resnet8x4"): (8.0, 0.05),
    ("wrn_40_2", "wrn_16_2"): (6.0, 0.05),
    ("wrn_40_2", "wrn_40_1"): (6.0, 0.05),
    ("vgg13", "vgg8"): (6.0, 0.05),
    ("vgg13", "MobileNetV2"): (6.0, 0.01),
    ("ResNet50", "MobileNetV2"): (8.0, 0.01),
    ("wrn_40_2", "ShuffleV1"): (8.0, 0.01),
    ("resnet32x4", "ShuffleV1"): (8.0, 0.01),
    ("resnet32x4", "ShuffleV2"): (8.0, 0.01),
}


def method_recipes(folder: Path) -> list[Path]:
    """The recipes of a folder named after a registered method (``kd.yaml``; not ``pair.yaml`` or ``kd_dot.yaml``)."""
    return [p for p in sorted(folder.glob("*.yaml")) if p.stem in methods.names()]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tmp(tmp_path, monkeypatch):
    """A temporary working directory: messages then show short relative paths."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def error(path, overrides=(), kind=BlockKDError) -> str:
    with pytest.raises(kind) as info:
        config.load(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------- shipped recipes
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_recipe_validates_and_round_trips(path, tmp_path):
    cfg = config.load(path)
    assert set(cfg) == set(config.SECTIONS)
    assert cfg["model"]["name"] and cfg["output"]["name"]
    again = config.load(write(tmp_path / "dumped.yaml", config.dump(cfg)))
    assert again == cfg


def test_every_fragment_is_used_and_has_known_keys():
    used = set()
    for recipe in RECIPES:
        used |= {Path(src).resolve() for src, _ in config.recipe._layers(recipe)}
    assert set(FRAGMENTS) <= used
    for fragment in FRAGMENTS:
        config.recipe._layers(fragment)  # parses, bases exist, keys known


def test_cifar100_pairs_and_methods():
    teachers = {t for t, _ in PAIRS}
    assert {p.stem for p in (CONFIGS / "cifar100/teachers").glob("*.yaml")} == teachers
    for t in teachers:
        cfg = config.load(CONFIGS / f"cifar100/teachers/{t}.yaml")
        assert (cfg["model"]["name"], cfg["method"]["name"], cfg["optim"]["lr"]) == (t, "ce", 0.05)
    for (t, s), (beta, lr) in PAIRS.items():
        folder = CONFIGS / f"cifar100/{t}_{s}"
        assert {p.stem for p in method_recipes(folder)} >= {"ce", "kd", "dkd", "blockkd", "blockkd-lite"}
        for path in method_recipes(folder):
            cfg, method = config.load(path), path.stem
            assert (cfg["model"]["name"], cfg["teacher"]["name"], cfg["method"]["name"]) == (s, t, method)
            assert cfg["teacher"]["checkpoint"] == f"checkpoints/cifar100/{t}.pth"
            if method.startswith("mlkd"):  # its authors' own lr and schedule: tests/test_recipes_recent.py
                continue
            assert cfg["optim"] == {"name": "sgd", "lr": lr, "momentum": 0.9, "dampening": 0, "nesterov": False,
                                    "weight_decay": 5e-4}
            assert cfg["schedule"]["milestones"] == [150, 180, 210] and cfg["schedule"]["gamma"] == 0.1
            assert (cfg["train"]["epochs"], cfg["data"]["batch_size"], cfg["data"]["name"]) == (240, 64, "cifar100")
        dkd = config.load(folder / "dkd.yaml")["method"]["options"]
        assert dkd == {**dkd, "temperature": 4.0, "alpha": 1.0, "beta": beta, "ce_weight": 1.0, "warmup": 20.0}
        kd = config.load(folder / "kd.yaml")["method"]["options"]
        assert kd == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9, "logit_standardization": False}


def test_fashion_mnist_recipes_share_one_pair():
    teacher = config.load(CONFIGS / "fashion_mnist/teacher.yaml")
    assert teacher["method"]["name"] == "ce" and teacher["data"]["name"] == "fashion_mnist"
    for path in method_recipes(CONFIGS / "fashion_mnist"):
        cfg, method = config.load(path), path.stem
        assert cfg["method"]["name"] == method and cfg["schedule"]["name"] == "cosine"
        assert cfg["train"]["epochs"] <= 15 and cfg["data"]["batch_size"] == 128
        if method != "ce":
            assert cfg["teacher"]["name"] == teacher["model"]["name"]
            assert cfg["teacher"]["checkpoint"] == f"{teacher['output']['dir']}/{teacher['output']['name']}"
    # The LS entries of the leaderboard: kd / dkd recipes with logit standardisation, else as their base.
    for entry, method in (("kd-ls", "kd"), ("dkd-ls", "dkd")):
        ls = config.load(CONFIGS / f"fashion_mnist/{entry}.yaml")
        base = config.load(CONFIGS / f"fashion_mnist/{method}.yaml")
        assert ls["method"]["name"] == method and ls["method"]["options"]["logit_standardization"] is True
        assert {k: v for k, v in ls.to_dict().items() if k != "method"} == {
            k: v for k, v in base.to_dict().items() if k != "method"}


def test_docs_reference_is_generated_from_the_declarations():
    """docs/config.md holds config.reference() between its markers: regenerate it with
    `python -m blockkd.config docs/config.md` when a declaration changes."""
    text = (ROOT / "docs/config.md").read_text()
    begin, end = "<!-- BEGIN generated by blockkd.config -->\n", "<!-- END generated by blockkd.config -->"
    assert begin in text and end in text
    assert text.split(begin, 1)[1].split(end, 1)[0] == config.reference()
    rows = re.findall(r"^\| `([a-z_.]+)` \|", config.reference(), re.M)
    for key in ("optim.lr", "train.epochs", "data.batch_size", "schedule.warmup_epochs", "model.name"):
        assert key in rows, key


# ----------------------------------------------------------------------------------------- composition
def test_composition_order_and_deep_merge(tmp):
    write(tmp / "a.yaml", "model: {name: resnet8}\noptim: {lr: 0.1}\ntrain: {epochs: 5}\n"
                          "method: {name: dkd, options: {temperature: 2}}\nteacher: {allow_random: true}\n")
    write(tmp / "b.yaml", "base: a.yaml\noptim: {lr: 0.2}\nschedule: {gamma: 0.5}\nteacher: {name: resnet20}\n")
    write(tmp / "c.yaml", "optim: {momentum: 0.5, lr: 0.3}\nmethod: {options: {beta: 3}}\n")
    recipe = write(tmp / "sub/d.yaml", "base: [../b.yaml, ../c.yaml]\ntrain: {epochs: 7}\ndata:\n")
    cfg = config.load(recipe)
    assert cfg["optim"]["lr"] == 0.3 and cfg["optim"]["momentum"] == 0.5  # c after b after a
    assert cfg["schedule"]["gamma"] == 0.5 and cfg["train"]["epochs"] == 7  # the file itself wins
    assert cfg["method"]["options"]["temperature"] == 2.0 and cfg["method"]["options"]["beta"] == 3.0
    assert cfg["data"]["name"] == "cifar100"  # empty section: defaults kept
    assert cfg["output"]["name"] == "cifar100-resnet20-resnet8-dkd"
    cfg = config.load(recipe, ["optim.lr=0.4", "train.seed=3", "method.options.beta=1"])
    assert (cfg["optim"]["lr"], cfg["method"]["options"]["beta"]) == (0.4, 1.0)
    assert cfg["output"]["name"] == "cifar100-resnet20-resnet8-dkd-seed3"


def test_diamond_bases_are_not_a_cycle(tmp):
    write(tmp / "root.yaml", "model: {name: resnet8}\n")
    write(tmp / "l.yaml", "base: root.yaml\n")
    write(tmp / "r.yaml", "base: root.yaml\n")
    assert config.load(write(tmp / "top.yaml", "base: [l.yaml, r.yaml]\n"))["model"]["name"] == "resnet8"


def test_overrides_are_parsed_as_yaml(tmp):
    recipe = write(tmp / "a.yaml", "model: {name: resnet8}\n")
    cfg = config.load(recipe, ["optim.lr=1e-3", "schedule.milestones=[2, 4]", "output.name=run1",
                               "train.amp=off", "train.grad_clip=5", "data={batch_size: 8}", "model.checkpoint=null"])
    assert cfg["optim"]["lr"] == 0.001 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["schedule"]["milestones"] == [2, 4] and cfg["output"]["name"] == "run1"
    assert cfg["train"]["amp"] == "off" and cfg["train"]["grad_clip"] == 5.0
    assert cfg["data"]["batch_size"] == 8 and cfg["model"]["checkpoint"] is None


def test_method_options_typed_by_their_defaults(tmp):
    recipe = write(tmp / "a.yaml", "model: {name: resnet8}\nteacher: {name: resnet20, allow_random: true}\n"
                                   "method: {name: blockkd, options: {alpha: 2, num_blocks: 3}}\n")
    options = config.load(recipe)["method"]["options"]
    assert options["alpha"] == 2.0 and isinstance(options["alpha"], float)  # int accepted for float
    assert options["num_blocks"] == 3  # None default: anything
    assert set(options) == set(methods.defaults("blockkd"))
    assert error(recipe, ["method.options.alpha=true"]) == (
        "invalid method.options.alpha=true in override 'method.options.alpha=true' (on a.yaml): "
        "expected a number >= 0 for method 'blockkd'")
    assert error(recipe, ["method.options.gamma=[1]"]).startswith("invalid method.options.gamma=[1] in override")
    assert error(recipe, ["method.options.batched_stones=1"]).endswith("expected true or false "
                                                                        "for method 'blockkd'")
    assert error(recipe, ["method.options.temprature=2"]) == (
        "unknown key 'method.options.temprature' in override 'method.options.temprature=2' (on a.yaml); "
        "did you mean 'method.options.temperature'?")
    assert error(recipe, ["method.name=ce", "method.options={}"]) == (
        "method 'ce' takes no options, got method.options.alpha in a.yaml")


def test_validate_is_idempotent_and_fills_defaults():
    cfg = config.validate({"model": {"name": "resnet8"}})
    assert config.validate(cfg) == cfg
    assert cfg["optim"] == {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "dampening": 0,
                            "nesterov": False}
    assert cfg["train"]["epochs"] == 240 and cfg["method"] == {"name": "ce", "options": {}}
    from blockkd import data
    assert cfg["data"] == data.parse({}).flat()


# ----------------------------------------------------------------------------------------- errors
def test_unknown_key_suggests_closest(tmp):
    recipe = write(tmp / "a.yaml", "model: {name: resnet8}\noptim: {lr_rate: 0.1}\n")
    assert error(recipe) == "unknown key 'optim.lr_rate' in a.yaml; did you mean 'optim.lr'?"
    recipe = write(tmp / "b.yaml", "model: {name: resnet8}\noptimizer: {lr: 0.1}\n")
    assert error(recipe) == "unknown key 'optimizer.lr' in b.yaml; did you mean 'optim.lr'?"
    recipe = write(tmp / "c.yaml", "model: {name: resnet8}\ndata: {batchsize: 3}\n")
    assert error(recipe) == "unknown key 'data.batchsize' in c.yaml; did you mean 'data.batch_size'?"
    write(tmp / "d.yaml", "model: {name: resnet8}\ntrain: {epoch: 3}\n")
    assert error(write(tmp / "e.yaml", "base: d.yaml\n")) == (
        "unknown key 'train.epoch' in d.yaml; did you mean 'train.epochs'?")  # names the base that has it
    assert error(write(tmp / "f.yaml", "model: {name: resnet8}\n"), ["lr=0.1"]) == (
        "unknown key 'lr' in override 'lr=0.1' (on f.yaml); did you mean 'optim.lr'?")


@pytest.mark.parametrize("body, message", [
    ("train: {epochs: ten}", "invalid train.epochs=ten in a.yaml: expected an integer >= 1"),
    ("train: {epochs: 0}", "invalid train.epochs=0 in a.yaml: expected an integer >= 1"),
    ("train: {epochs: 2.5}", "invalid train.epochs=2.5 in a.yaml: expected an integer >= 1"),
    ("optim: {lr: -0.1}", "invalid optim.lr=-0.1 in a.yaml: expected a number > 0"),
    ("optim: {lr: .nan}", "invalid optim.lr=.nan in a.yaml: expected a number > 0"),
    ("optim: {momentum: 1.5}", "invalid optim.momentum=1.5 in a.yaml: expected a number >= 0 and <= 1"),
    ("data: {batch_size: 0}", "invalid data.batch_size=0 in a.yaml: expected an integer >= 1"),
    ("data: {augment: 1}", "invalid data.augment=1 in a.yaml: expected true or false"),
    ("train: {amp: fp32}", "invalid train.amp=fp32 in a.yaml: expected one of auto, off, bf16, fp16; did you mean "
                           "'fp16'?"),
    ("train: {channels_last: 1}", "invalid train.channels_last=1 in a.yaml: expected one of auto, true, false"),
    ("train: {device: gpu0}",
     "invalid train.device=gpu0 in a.yaml: expected 'auto' or a torch device such as cpu, cuda, cuda:1"),
    ("schedule: {milestones: [150, 150]}",
     "invalid schedule.milestones=[150, 150] in a.yaml: expected a list of strictly increasing integers >= 1"),
    ("schedule: {milestones: 150}",
     "invalid schedule.milestones=150 in a.yaml: expected a list of strictly increasing integers >= 1"),
    ("schedule: {name: step}", "unknown schedule 'step' (schedule.name in a.yaml); did you mean 'multistep'?"),
    ("schedule: {name: cosine, milestones: [3]}", "schedule.milestones (set in a.yaml) does not apply to schedule "
     "'cosine'; its keys: min_lr, name, warmup_epochs (set schedule.milestones=null to drop it)"),
    ("output: {name: ''}", "invalid output.name='' in a.yaml: expected a folder name inside output.dir (not absolute, "
                                   "no '..') or null"),
    ("optim: 0.1", "invalid optim=0.1 in a.yaml: expected a mapping of optim keys"),
    ("method: {options: [1]}", "invalid method.options=[1] in a.yaml: expected a mapping"),
])
def test_bad_values(tmp, body, message):
    assert error(write(tmp / "a.yaml", "model: {name: resnet8}\n" + body + "\n")) == message


def test_bad_names_use_registry_suggestions(tmp):
    recipe = write(tmp / "a.yaml", "model: {name: resnet8x5}\n")
    assert error(recipe, kind=UnknownNameError) == (
        "unknown model 'resnet8x5' (model.name in a.yaml); did you mean 'resnet8x4'?")
    recipe = write(tmp / "b.yaml", "model: {name: resnet8}\nmethod: {name: blokkd}\n")
    assert error(recipe, kind=UnknownNameError) == (
        "unknown method 'blokkd' (method.name in b.yaml); did you mean 'blockkd'?")
    assert error(recipe, ["method.name=kd", "teacher.name=wrn40_2"], kind=UnknownNameError) == (
        "unknown teacher model 'wrn40_2' (teacher.name in override 'teacher.name=wrn40_2' (on b.yaml)); did you mean "
        "'wrn_40_2'?")
    assert "did you mean 'cifar100'?" in error(recipe, ["method.name=ce", "data.name=cifar1000"], kind=UnknownNameError)


def test_teacher_required_by_distillation_methods(tmp):
    recipe = write(tmp / "a.yaml", "model: {name: resnet8}\nmethod: {name: kd}\n")
    assert error(recipe) == "method 'kd' needs a teacher: set teacher.name in a.yaml or on the command line"
    assert error(recipe, ["teacher.name=resnet20"]) == (
        "method 'kd' needs the teacher's weights: set teacher.checkpoint in a.yaml or on the command line, "
        "e.g. teacher.checkpoint=path/to/resnet20.pth")
    assert config.load(recipe, ["teacher.name=resnet20", "teacher.allow_random=true"])["teacher"]["allow_random"]


def test_file_errors(tmp):
    assert error(tmp / "none.yaml") == "recipe file not found: none.yaml"
    assert error(write(tmp / "bad.yaml", "model:\n  name: a: b\n")) == (
        "invalid YAML in bad.yaml, line 2, column 10: mapping values are not allowed here")
    assert error(write(tmp / "list.yaml", "- 1\n- 2\n")) == (
        "recipe list.yaml must be a YAML mapping of sections, got [1, 2]")
    write(tmp / "x.yaml", "base: y.yaml\nmodel: {name: resnet8}\n")
    write(tmp / "y.yaml", "base: [z.yaml]\n")
    write(tmp / "z.yaml", "base: x.yaml\n")
    assert error(tmp / "x.yaml") == "base cycle: x.yaml -> y.yaml -> z.yaml -> x.yaml"
    assert error(write(tmp / "self.yaml", "base: self.yaml\n")) == "base cycle: self.yaml -> self.yaml"
    assert error(write(tmp / "m.yaml", "base: [nope.yaml]\n")) == (
        "base file 'nope.yaml' not found (in m.yaml; looked for nope.yaml)")
    assert error(write(tmp / "n.yaml", "base: 3\n")) == (
        "invalid base=3 in n.yaml: expected a path or a list of paths relative to the file")
    assert error(write(tmp / "o.yaml", "optim: {lr: 0.1}\n")) == (
        "missing required key 'model.name' in o.yaml: the student (for ce: the model trained): a blockkd.models "
        "name, torchvision.<name>, timm.<name>, hf.<hub id or folder> or hf-config.<config.json>")
    assert error(tmp / "o.yaml", ["optim.lr"]) == "override 'optim.lr' must look like key=value, e.g. optim.lr=0.1"
    assert error(tmp / "o.yaml", ["optim.lr=[1"]).startswith("cannot parse value '[1' as YAML: ")


def test_data_overrides_for_eval():
    saved = {"name": "cifar100", "batch_size": 64, "eval_batch_size": 256, "root": None,
             "num_classes": 10}  # older runs stored every dataset's keys: they are ignored
    assert config.parse_data_overrides(["eval_batch_size=512", "root=/data"], saved) == {
        **config.validate({"model": {"name": "resnet8"}}).to_dict()["data"], "eval_batch_size": 512, "root": "/data"}
    with pytest.raises(BlockKDError, match=r"^unknown key 'data.batchsize' in --data 'batchsize=3'; "
                                           r"did you mean 'data.batch_size'\?$"):
        config.parse_data_overrides(["batchsize=3"], saved)
    with pytest.raises(BlockKDError, match=r"^invalid data.eval_batch_size=-1 in --data"):
        config.parse_data_overrides(["eval_batch_size=-1"], saved)


def test_eval_refuses_data_keys_of_another_dataset():
    """``blockkd eval RUN --data root=/x`` on a text-file run: refused as train refuses it, not ignored."""
    saved = {"name": "textfile", "train": "a.csv", "test": "b.csv", "tokenizer": "wordpiece", "batch_size": 8,
             "root": None}  # an older run's stored key of another dataset: still dropped silently
    with pytest.raises(BlockKDError, match=r"^data.root \(set in --data 'root=/x'\) does not apply to dataset "
                                           r"'textfile'; its keys: .*test, .*train"):
        config.parse_data_overrides(["root=/x"], saved)
    assert config.parse_data_overrides(["test=c.csv"], saved)["test"] == "c.csv"
    switched = config.parse_data_overrides(["name=cifar10", "root=/x"], saved)  # another dataset: its keys apply
    assert switched["name"] == "cifar10" and switched["root"] == "/x" and "train" not in switched


# ----------------------------------------------------------------------------------------- property test
VALID = {"model": {"name": "resnet8"}, "teacher": {"name": "resnet20", "allow_random": True},
         "method": {"name": "blockkd", "options": {"beta": 2.0}},
         "data": {"name": "synthetic", "batch_size": 16}, "train": {"epochs": 2}}
KEYS = config.recipe.all_keys() + ["data.batch_size", "data.root", "method.options.beta",
                                     "method.options.num_blocks", "method.options.connector"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["ce", "kd", "dkd", "blockkd", "resnet8", "auto", "off", "cpu"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
    max_leaves=6)
known = st.sampled_from(KEYS + list(config.SECTIONS))
paths = st.one_of(known, known, known, st.lists(st.text(max_size=8), min_size=1, max_size=3).map(".".join))


def _mutate(cfg: dict, path: str, value, delete: bool) -> None:
    *parents, leaf = path.split(".")
    node = cfg
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if delete:
        node.pop(leaf, None)
    else:
        node[leaf] = value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(paths, values, st.booleans()), min_size=1, max_size=4))
def test_random_mutations_validate_or_raise_blockkd_error(mutations):
    cfg = yaml.safe_load(yaml.safe_dump(VALID))
    for path, value, delete in mutations:
        _mutate(cfg, path, value, delete)
    try:
        out = config.validate(cfg)
    except BlockKDError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert config.dump(config.validate(out)) == config.dump(out)  # idempotent (dump: NaN-safe equality)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(paths, st.text(max_size=10)), max_size=3))
def test_random_overrides_load_or_raise_blockkd_error(tmp_path_factory, overrides):
    recipe = tmp_path_factory.mktemp("r") / "a.yaml"
    recipe.write_text(yaml.safe_dump(VALID))
    try:
        cfg = config.load(recipe, [f"{k}={v}" for k, v in overrides])
    except BlockKDError as e:
        assert "\n" not in str(e)
    else:
        assert all(math.isfinite(cfg["optim"][k]) for k in ("lr", "momentum", "weight_decay"))


def test_paths_in_names_and_run_names(tmp_path, monkeypatch):
    """Paths inside model names: one file named two ways is one model (runs stored before paths were resolved
    name theirs relative to where they were started); run folder names show them short; output.name stays in
    output.dir (sub-folders allowed)."""
    from blockkd.config import paths

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "t.json").write_text("{}")
    (tmp_path / "models" / "u.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    absolute = f"hf-config.{tmp_path / 'models' / 't.json'}"
    assert paths.same_path_name("hf-config.models/t.json", absolute)
    assert paths.same_path_name("hf-config.models/../models/t.json", "hf-config.models/t.json")
    assert not paths.same_path_name("hf-config.models/u.json", absolute)
    assert not paths.same_path_name("hf.models/t.json", absolute) and not paths.same_path_name("resnet8", "resnet20")
    assert paths.short(absolute) == "hf-config.models/t.json" and paths.short("hf-config./else/where/c.json") == \
        "hf-config.c.json" and paths.short("resnet8") == "resnet8"
    for name in ("a", "group/a", "a.b"):
        assert config.validate({"model": {"name": "resnet8"}, "output": {"name": name}}).output.name == name
    for name in ("../escape", "a/../../b", "/tmp/x", "~/x", "", "."):
        with pytest.raises(BlockKDError, match="expected a folder name inside output.dir"):
            config.validate({"model": {"name": "resnet8"}, "output": {"name": name}})


def test_a_key_added_later_keeps_fingerprints_at_the_value_that_trains_as_before():
    """Cached teachers and benchmark runs are named by fingerprint: train.precise_bn (added after them) at 0
    must leave those names alone, and any other value must make another fingerprint."""
    cfg = config.load("configs/fashion_mnist/teacher.yaml")
    flat = cfg.to_dict()
    before = {**flat, "train": {k: v for k, v in flat["train"].items() if k != "precise_bn"}}
    assert config.fingerprint(cfg) == config.fingerprint(before)
    assert config.fingerprint(cfg.replace(train=dataclasses.replace(cfg.train, precise_bn=20))) != \
        config.fingerprint(cfg)
