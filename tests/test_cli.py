"""The ``blockkd`` command: listings, one-line user errors, --debug tracebacks, wiring to the library."""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

import blockkd
from blockkd import cli, config
from blockkd.errors import BlockKDError

ROOT = Path(__file__).resolve().parents[1]
KD_RECIPE = ROOT / "configs/cifar100/resnet32x4_resnet8x4/kd.yaml"


TYPO_RECIPE = "model: {name: resnet8}\noptim: {lr_rate: 0.1}\n"

# name -> arguments of ``python -m blockkd``, run from a folder holding the typo recipe as a.yaml.
COMMANDS = {
    "help": ["--help"],
    "models": ["models"],
    "methods": ["methods"],
    "typo": ["train", "a.yaml"],
    "typo_debug": ["train", "a.yaml", "--debug"],
    "bad_model": ["train", str(KD_RECIPE), "model.name=resnet8x5", "--print-config"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every command of COMMANDS in a fresh interpreter, as a user would run it (in parallel: each
    spends seconds importing torch)."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "a.yaml").write_text(TYPO_RECIPE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(args):
        return subprocess.run([sys.executable, "-m", "blockkd", *args], capture_output=True, text=True,
                              cwd=cwd, env=env, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the CI machine has two cores
        return dict(zip(COMMANDS, pool.map(run, COMMANDS.values())))


@pytest.fixture
def typo_recipe(tmp_path):
    (tmp_path / "a.yaml").write_text(TYPO_RECIPE)
    return tmp_path


# ----------------------------------------------------------------------------------------- subprocess
def test_help(runs):
    out = runs["help"]
    assert out.returncode == 0 and out.stdout.startswith("usage: blockkd")
    for command in ("train", "eval", "models", "methods", "demo"):
        assert command in out.stdout


def test_models_lists_every_model_with_its_size(runs):
    out = runs["models"]
    assert out.returncode == 0, out.stderr
    rows = dict(line.split()[:2] for line in out.stdout.splitlines()[1:])
    assert list(rows) == blockkd.models.names() + [f"{p}<name>" for p in blockkd.models.prefixes()]
    model = blockkd.models.create("resnet8x4", num_classes=100)
    assert float(rows["resnet8x4"]) == pytest.approx(blockkd.models.num_params(model) / 1e6, abs=0.006)


def test_methods_lists_names_options_and_description(runs):
    out = runs["methods"]
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    names = [line.split()[0] for line in lines[1:] if not line.startswith(" ")]
    assert names == blockkd.methods.names() and {"ce", "kd", "dkd", "blockkd", "blockkd-lite"} <= set(names)
    kd = lines.index(next(line for line in lines if line.startswith("kd ")))
    assert blockkd.methods.get("kd").__doc__.strip().splitlines()[0] in lines[kd]
    assert "Hinton et al." in lines[kd + 1]
    options = [line.split()[0] for line in lines[kd + 2:kd + 2 + len(blockkd.methods.defaults("kd"))]]
    assert options == list(blockkd.methods.defaults("kd")) and "temperature = 4.0:" in lines[kd + 2]


def test_user_error_is_one_line_without_traceback(runs):
    out = runs["typo"]
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["error: unknown key 'optim.lr_rate' in a.yaml; did you mean 'optim.lr'?"]


def test_debug_after_the_subcommand_shows_the_traceback(runs):
    out = runs["typo_debug"]
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "BlockKDError: unknown key 'optim.lr_rate'" in out.stderr


def test_unknown_model_name_gets_a_suggestion(runs):
    out = runs["bad_model"]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith("error: unknown model 'resnet8x5'") and "did you mean 'resnet8x4'?" in out.stderr


# ----------------------------------------------------------------------------------------- in-process
def test_debug_before_the_subcommand_reraises(typo_recipe, monkeypatch):
    monkeypatch.chdir(typo_recipe)
    with pytest.raises(BlockKDError, match="did you mean 'optim.lr'"):
        cli.main(["--debug", "train", "a.yaml"])
    assert cli.main(["train", "a.yaml"]) == 2


def test_print_config_applies_overrides_given_anywhere(capsys):
    assert cli.main(["train", str(KD_RECIPE), "optim.lr=0.2", "--print-config", "train.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config.load(KD_RECIPE, ["optim.lr=0.2", "train.epochs=3"]).to_dict()
    assert (printed["optim"]["lr"], printed["train"]["epochs"]) == (0.2, 3)


@pytest.fixture
def fake_engine(monkeypatch):
    """Stand-in for blockkd.engine that records its calls (training itself is tested elsewhere)."""
    calls = []
    engine = types.ModuleType("blockkd.engine")
    engine.train = lambda cfg, **kw: calls.append(("train", cfg, kw)) or {
        "run_dir": "runs/x", "best": {"epoch": 200, "test_top1": 71.5123}, "history": [1, 2]}
    engine.evaluate_checkpoint = lambda path, data, device=None: calls.append(("eval", path, data, device)) or {
        "model": "resnet8x4", "method": "kd", "epoch": 240, "data": "cifar100",
        "top1": 71.25, "top5": 91.5, "loss": 1.23456, "images_per_s": 1234.4}
    monkeypatch.setitem(sys.modules, "blockkd.engine", engine)
    monkeypatch.setattr(blockkd, "engine", engine, raising=False)
    return calls


def test_train_loads_the_recipe_and_calls_the_engine(fake_engine, capsys):
    assert cli.main(["train", str(KD_RECIPE), "--resume", "train.epochs=2"]) == 0
    (kind, cfg, kwargs), = fake_engine
    assert kind == "train" and cfg == config.load(KD_RECIPE, ["train.epochs=2"])
    assert kwargs == {"resume": True, "overwrite": False}
    assert capsys.readouterr().out.splitlines() == ["run_dir: runs/x", "best: epoch=200 test_top1=71.51"]


def test_eval_passes_checked_data_overrides(fake_engine, capsys):
    assert cli.main(["eval", "runs/x", "--data", "eval_batch_size=512", "root=/d", "--device", "cpu"]) == 0
    assert fake_engine == [("eval", "runs/x", ["eval_batch_size=512", "root=/d"], "cpu")]
    assert capsys.readouterr().out.strip() == (
        "resnet8x4 (kd, epoch 240) on cifar100: top-1 71.25%  top-5 91.50%  loss 1.2346  1234 images/s")
    assert cli.main(["eval", "runs/x", "--data", "batchsize=3"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown key 'data.batchsize' in --data 'batchsize=3'; did you mean 'data.batch_size'?\n")
    assert cli.main(["eval", "runs/x", "--device", "gpu1"]) == 2
    assert capsys.readouterr().err == ("error: invalid train.device=gpu1 in --device: expected 'auto' or a torch "
                                       "device such as cpu, cuda, cuda:1\n")
    assert len(fake_engine) == 1  # bad inputs stopped it before the checkpoint was read


def test_demo_gets_its_arguments(monkeypatch):
    seen = []
    demo = types.ModuleType("blockkd.demo")
    demo.run = lambda args: seen.append(args) or 0
    monkeypatch.setitem(sys.modules, "blockkd.demo", demo)
    monkeypatch.setattr(blockkd, "demo", demo, raising=False)
    assert cli.main(["demo", "--quick", "--out", "d", "--epochs", "3"]) == 0
    assert (seen[0].quick, seen[0].out, seen[0].epochs, seen[0].device) == (True, "d", 3, None)


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "load", interrupted)
    from blockkd import engine
    monkeypatch.setattr(engine, "evaluate_checkpoint", interrupted)
    assert cli.main(["train", "x.yaml"]) == 130
    assert capsys.readouterr().err == (
        "interrupted; run the same command with --resume to continue from the last checkpoint\n")
    assert cli.main(["eval", "runs/x"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_multi_line_messages_are_printed_on_one_line(monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise BlockKDError("first\nsecond")

    monkeypatch.setattr(config, "load", fails)
    assert cli.main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == "error: first second\n"


@pytest.mark.parametrize("argv", [[], ["train"], ["train", "a.yaml", "--bogus"], ["frobnicate"]])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and "usage: blockkd" in capsys.readouterr().err


def test_other_exceptions_propagate(monkeypatch):
    monkeypatch.setattr(config, "load", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["train", "x.yaml"])
