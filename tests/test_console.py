"""What a user sees on the console: a fast ``--help``/``--version``, per-method help, a quiet closed pipe,
progress bars only on a terminal, no stray output from the libraries blockkd calls."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockkd import cli

ROOT = Path(__file__).resolve().parents[1]


def blockkd_cmd(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "blockkd", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def test_help_and_version_do_not_import_torch():
    """``import blockkd`` is lazy: the CLI's --help and --version never import torch (2-7 s before)."""
    code = ("import sys\nfrom blockkd import cli\n"
            "for argv in (['--help'], ['--version']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "import blockkd\nassert blockkd.__version__\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
    import blockkd  # the lazy attributes still work

    assert blockkd.methods.names() and blockkd.models.names() and callable(blockkd.split)
    assert blockkd.Blocks.__name__ == "Blocks"
    with pytest.raises(AttributeError):
        blockkd.no_such_thing  # noqa: B018


def test_help_is_fast():
    """Under one second, measured from the process start (the issue's bound; today it takes well under)."""
    start = time.perf_counter()
    out = blockkd_cmd("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0 and out.stdout.startswith("usage: blockkd")
    assert elapsed < 1.0, f"blockkd --help took {elapsed:.2f}s"


def test_version(capsys):
    from blockkd import __version__

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"blockkd {__version__}"


def test_methods_name_prints_that_method_in_full(capsys):
    assert cli.main(["methods", "blockkd"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("blockkd: ")
    assert "paper: " in out and "teacher: needed" in out
    assert "  num_blocks = " in out and "method.options.<key>" in out
    assert not any(line.startswith(("kd:", "ce:", "dkd:")) for line in out.splitlines())  # that method only
    assert cli.main(["methods", "blockk"]) == 2
    assert "did you mean 'blockkd'" in capsys.readouterr().err


def test_methods_into_a_closed_pipe_exits_quietly():
    """``blockkd methods | head -1``: no BrokenPipeError traceback, the shell's SIGPIPE status."""
    out = subprocess.run(f"{sys.executable} -m blockkd methods | head -1", shell=True, capture_output=True,
                         text=True, timeout=300, executable="/bin/bash",
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.startswith("method")
    assert out.stderr == "", out.stderr
    # a reader gone before the first write (the child spends a second or more importing torch): EPIPE for sure
    proc = subprocess.Popen([sys.executable, "-m", "blockkd", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == cli.EXIT_BROKEN_PIPE and err == "", err


# ------------------------------------------------------------------------------------------- progress
class Stream(io.StringIO):
    """A stand-in stderr: a terminal or a file (``blockkd train ... 2> log``)."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def tiny_recipe(out: Path, name: str, **train) -> dict:
    from blockkd import config

    return config.validate({
        "model": {"name": "resnet8"},
        "data": {"name": "synthetic", "image_size": 8, "num_classes": 4, "train_size": 64, "test_size": 64,
                 "batch_size": 16, "eval_batch_size": 8},
        "schedule": {"name": "constant"},
        "train": {"epochs": 3, "device": "cpu", "amp": "off", **train},
        "output": {"dir": str(out), "name": name, "progress": True, "tensorboard": False, "plot": False}})


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_only_on_a_terminal_and_the_run_eta(tmp_path, monkeypatch, tty):
    from blockkd.engine import train

    err = Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    train(tiny_recipe(tmp_path, "run"))
    monkeypatch.undo()
    if tty:  # the training bar and, over the 8 test batches, the evaluation's
        assert "\r" in err.getvalue() and "epoch 1/3" in err.getvalue() and "eval" in err.getvalue()
    else:  # a log file gets lines only
        assert "\r" not in err.getvalue()
    lines = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3
    assert "run ETA 0:" in lines[0] and "(2 epochs left)" in lines[0] and "(1 epochs left)" in lines[1]
    assert "ETA" not in lines[2]


def test_evaluation_bar(monkeypatch):
    import torch

    from blockkd.engine import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    loader = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(5)]
    for tty, progress, shown in ((True, True, True), (False, True, False), (True, False, False)):
        err = Stream(tty)
        monkeypatch.setattr(sys, "stderr", err)
        assert evaluate(model, loader, progress=progress)["images"] == 10
        monkeypatch.undo()
        assert ("eval" in err.getvalue()) == shown


def test_tokenizer_training_prints_nothing(capfd):
    pytest.importorskip("tokenizers")
    from blockkd.data.text import _train_tokenizer

    for kind in ("wordpiece", "bpe"):
        _train_tokenizer(kind, 100, ["hello world, said the tokenizer"] * 50)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_transformers_bars_are_off_without_progress(tmp_path, capfd):
    """save_pretrained's "Writing model shards" bar: the hf/ export of a run with output.progress false is quiet."""
    transformers = pytest.importorskip("transformers")
    from blockkd.engine.logger import quiet_libraries

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    model = transformers.BertForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "loud")
    assert "Writing model shards" in capfd.readouterr().err  # what transformers does by itself
    with quiet_libraries(True):
        model.save_pretrained(tmp_path / "quiet")
    assert capfd.readouterr().err == ""
    assert transformers.utils.logging.is_progress_bar_enabled()  # restored
    with quiet_libraries(False):
        model.save_pretrained(tmp_path / "shown")
    assert "Writing model shards" in capfd.readouterr().err


def test_eval_of_a_run_folder_says_which_epoch_it_picked(tmp_path, capsys, monkeypatch):
    """Tied best epochs (here every epoch scores the same): eval says it took the earliest, and where the
    final student is; a run whose best is its last epoch gets no note."""
    from blockkd import config
    from blockkd.engine import evaluate_checkpoint, train, trainer

    real = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: {**real(*a, **k), "top1": 50.0})  # a tie
    flat = dict(tiny_recipe(tmp_path, "tied").to_dict(),
                output={"dir": str(tmp_path), "name": "tied", "progress": False, "tensorboard": False, "plot": False})
    train(config.validate(flat))
    monkeypatch.undo()
    result = evaluate_checkpoint(tmp_path / "tied", device="cpu")
    assert result["epoch"] == 1
    assert result["note"] == (f"evaluated {tmp_path / 'tied' / 'best'} (epoch 1, the earliest of the epochs tied at "
                              f"the best test top-1 (1, 2, 3)); {tmp_path / 'tied' / 'last'} holds the final "
                              f"student (epoch 3)")
    assert "note" not in evaluate_checkpoint(tmp_path / "tied" / "best", device="cpu")  # named explicitly
    assert cli.main(["eval", str(tmp_path / "tied"), "--device", "cpu"]) == 0
    assert "note: evaluated" in capsys.readouterr().err
    flat["train"] = {**flat["train"], "epochs": 1}
    flat["output"] = {**flat["output"], "name": "one"}
    train(config.validate(flat))
    assert "note" not in evaluate_checkpoint(tmp_path / "one", device="cpu")
