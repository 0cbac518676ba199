"""End to end through the real command line: teacher -> Block-KD student -> resume -> eval; the CIFAR-100
recipe on a generated CIFAR-100 folder; the demo's quick mode on the real Fashion-MNIST files."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch
from safetensors.torch import load_file

import blockkd

# End-to-end runs and the demo: minutes; `make test-fast` (pytest -m "not slow") skips them.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SYNTH = ["data.name=synthetic", "data.image_size=16", "data.train_size=512", "data.test_size=256",
         "data.batch_size=64", "data.eval_batch_size=256", "data.train_subset=null", "train.device=cpu",
         "output.tensorboard=true"]


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "blockkd", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"blockkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e")
    cli("train", str(REPO / "configs/fashion_mnist/teacher.yaml"), *SYNTH, "model.name=resnet14",
        "train.epochs=4", "optim.lr=0.1", f"output.dir={out}", "output.name=teacher", cwd=out)
    return out / "teacher"


def test_teacher_then_blockkd_student_then_resume_then_eval(teacher):
    out = teacher.parent
    teacher_rows = history(teacher)
    assert teacher_rows[-1]["train_loss"] < teacher_rows[0]["train_loss"]  # it learned (no CPU-specific threshold)
    student = ["train", str(REPO / "configs/fashion_mnist/blockkd.yaml"), *SYNTH, "model.name=resnet8",
               "teacher.name=resnet14", f"teacher.checkpoint={teacher}", f"output.dir={out}", "output.name=student"]
    proc = cli(*student, "train.epochs=2", cwd=out)
    run = out / "student"
    assert "teacher resnet14: test top-1" in proc.stdout + proc.stderr
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "curves.png", "train.log"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    weights = load_file(str(run / "last" / "weights.safetensors"))
    assert any(k.startswith("connectors.") for k in weights) and any(k.startswith("student.") for k in weights)
    assert not any(k.startswith("teacher.") for k in weights)
    rows = history(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss_task_stones", "train_loss_cross", "test_top1", "test_top5"} <= set(rows[0])
    # the stepping-stones seen from outside: each stone's and the ensemble's test top-1 beside the student's,
    # and the gradient norm each part of the loss sends into the student (measured once per epoch)
    stones = {f"test_top1_stone{i}" for i in (1, 2, 3)} | {"test_top1_ensemble"}
    grads = {f"train_grad_norm_stone{i}" for i in (1, 2, 3)} | {"train_grad_norm_student"}
    assert stones | grads <= set(rows[0]) and all(0 <= rows[0][k] <= 100 for k in stones)
    assert all(rows[0][k] > 0 for k in grads)

    # An existing run is refused without --resume; --resume continues to 4 epochs from last/.
    refused = cli(*student, "train.epochs=4", cwd=out, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    cli(*student, "train.epochs=4", "--resume", cwd=out)
    rows = history(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    final = json.loads((run / "summary.json").read_text())
    assert final["last"]["epoch"] == 4 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert final["best"]["test_top1"] == max(r["test_top1"] for r in rows)
    assert final["best"]["epoch"] == next(r["epoch"] for r in rows if r["test_top1"] == final["best"]["test_top1"])

    # `blockkd eval` of a run folder evaluates best/ (the best epoch, which need not be the last one on
    # every CPU); of last/, the last epoch. Each reproduces the top-1 its epoch logged.
    best = cli("eval", str(run), cwd=out).stdout
    assert f"epoch {final['best']['epoch']})" in best and f"top-1 {final['best']['test_top1']:.2f}%" in best
    best_row = next(r for r in rows if r["epoch"] == final["best"]["epoch"])  # and its stepping-stones' top-1
    assert "heads: " + "  ".join(f"{k} top-1 {best_row['test_top1_' + k]:.2f}%"
                                 for k in ("stone1", "stone2", "stone3", "ensemble")) in best
    last = cli("eval", str(run / "last"), cwd=out).stdout
    assert "epoch 4)" in last and f"top-1 {final['last']['test_top1']:.2f}%" in last


def _write_fake_cifar100(root: Path, n_train: int = 256, n_test: int = 128) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": rng.integers(0, 100, n).tolist(), "coarse_labels": [0] * n}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def test_cifar100_recipe_starts_on_cpu_with_plain_lines(tmp_path):
    """The published recipe (resnet32x4 -> resnet8x4, blockkd) with a RepDistiller-style teacher .pth; its
    output is piped, not a terminal: lines, no progress bar (tests/test_console.py checks the bar on one)."""
    _write_fake_cifar100(tmp_path / "data")
    teacher = blockkd.models.create("resnet32x4", num_classes=100)
    torch.save({"model": teacher.state_dict(), "epoch": 240}, tmp_path / "resnet32x4.pth")
    proc = cli("train", str(REPO / "configs/cifar100/resnet32x4_resnet8x4/blockkd.yaml"),
               f"teacher.checkpoint={tmp_path / 'resnet32x4.pth'}", f"data.root={tmp_path / 'data'}",
               "train.max_steps=3", "train.device=cpu", f"output.dir={tmp_path / 'runs'}", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "device cpu" in log
    assert "\r" not in log  # no bar updates in a log
    assert re.search(r"^epoch 1/\d+: loss .* img/s", log, re.M)  # the epoch (cut by max_steps=3) as a line
    run = next((tmp_path / "runs").iterdir())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["method"]["name"], cfg["model"]["name"], cfg["teacher"]["name"]) == (
        "blockkd", "resnet8x4", "resnet32x4")
    assert set(cfg["data"]) == {"name", "batch_size", "eval_batch_size", "augment", "train_subset", "val_split",
                                "drop_last", "root", "download"}  # only the keys that apply to CIFAR-100
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_demo_quick_prints_the_table(tmp_path, monkeypatch, capsys):
    """The README's main job, in its quick mode, on the real Fashion-MNIST files (`make data` installs them)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "blockkd", "demo", "--quick", "--out", str(tmp_path / "demo")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("model "):]
    for method in ("teacher", "ce", "kd", "dkd", "blockkd"):
        assert f" {method} " in table
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(report["students"]) == {"ce", "kd", "dkd", "blockkd"}
    # Asking again for the same teacher recipe reuses the cached run instead of training it again.
    from blockkd import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run, summary = demo.train_or_reuse_teacher(demo.recipes_dir(), list(demo.QUICK))
    assert "teacher: reusing" in capsys.readouterr().out
    assert summary == report["teacher"] and run.parent == tmp_path / "cache" / "blockkd" / "demo"


def test_a_teacher_pre_trained_again_is_not_reused_from_the_cache(tmp_path):
    """The cached teacher is keyed by its recipe and by the local files it starts from (a pre-trained
    ``hf.<folder>``, a tokenizer folder): after ``fortunes_mlm.py --force`` the recipe is the same but the
    weights are not, and the teacher fine-tuned from the earlier ones must not be reused."""
    from blockkd import config, demo

    pre = tmp_path / "mlm"
    pre.mkdir()
    (pre / "model.safetensors").write_bytes(b"weights")
    cfg = config.load(REPO / "configs" / "fortunes" / "teacher.yaml",
                      [f"model.name=hf.{pre}", f"data.tokenizer={pre}"])
    first = demo.teacher_cache_dir(cfg)
    assert demo.teacher_cache_dir(cfg) == first  # nothing changed: the same teacher
    (pre / "model.safetensors").write_bytes(b"weights, pre-trained again")
    assert demo.teacher_cache_dir(cfg) != first
    # a recipe that starts from no local files keeps its former cache folder (the recipe's fingerprint alone)
    plain = config.load(REPO / "configs" / "fashion_mnist" / "teacher.yaml")
    assert demo.teacher_cache_dir(plain).name == "teacher-" + config.fingerprint(
        plain, ignore=("output", "train.device", "train.diagnostics_every"))
