"""blockkd.engine: the training loop, its outputs, checkpoints, exact resume, failure handling, schedules."""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blockkd import config, methods, models
from blockkd.engine import evaluate_checkpoint, load_checkpoint, runtime, save_checkpoint, train
from blockkd.optim import build_scheduler, lr_factor
from blockkd.optim.schedules import DecayOptions, MultistepOptions, NoOptions
from blockkd.errors import BlockKDError
from helpers import rows, untimed, with_changes

CREATE = methods.create  # the real factory, wrapped afresh by each patch_forward


def recipe(out: Path, name: str, **dotted) -> dict:
    """A validated tiny recipe: synthetic 10-class 16x16 data, resnet8, CPU, deterministic, quiet."""
    cfg: dict = {
        "model": {"name": "resnet8"},
        "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 256, "test_size": 128,
                 "batch_size": 64, "eval_batch_size": 128},
        "optim": {"lr": 0.1},
        "schedule": {"name": "multistep", "milestones": [100]},
        "train": {"epochs": 2, "device": "cpu", "deterministic": True, "amp": "off"},
        "output": {"dir": str(out), "name": name, "progress": False, "tensorboard": False, "plot": False},
    }
    return config.validate(with_changes(cfg, **dotted))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def patch_forward(monkeypatch, change) -> None:
    """Pass every training forward's output through ``change(call, output)`` (calls counted from 1 per run)."""
    create, calls = CREATE, [0]

    def patched(*args, **kwargs):
        distiller = create(*args, **kwargs)
        forward = distiller.forward

        def wrapped(x, y=None, *, epoch=0.0):
            out = forward(x, y, epoch=epoch)
            if distiller.training and y is not None:
                calls[0] += 1
                return change(calls[0], out)
            return out

        distiller.forward = wrapped
        return distiller

    monkeypatch.setattr(methods, "create", patched)


def nan_at(step: int):
    def change(call, out):
        logits, losses = out
        return (logits, {**losses, "loss_ce": losses["loss_ce"] * float("nan")}) if call == step else out
    return change


def noisy(call, out):
    """A loss drawn from torch's global RNG, like blockkd-lite's stone draws: resume must restore that RNG."""
    logits, losses = out
    return logits, {k: v * (1 + 0.5 * torch.rand(())) for k, v in losses.items()}


def noisy_then_killed_at(step: int):
    def change(call, out):
        if call == step:
            raise KeyboardInterrupt  # stands for a kill: nothing of the interrupted epoch may be kept
        return noisy(call, out)
    return change


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> tuple[Path, dict]:
    """A resnet14 trained with CE on synthetic data, with every output switched on."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = recipe(out, "t", model__name="resnet14", train__epochs=4, data__train_size=512,
                 output__tensorboard=True, output__plot=True, schedule__name="cosine",
                 schedule__milestones=None)
    return out / "t", train(cfg)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory) -> Path:
    """A finished 2-epoch resnet8 CE run (copied by tests that damage or extend it)."""
    out = tmp_path_factory.mktemp("two")
    train(recipe(out, "r"))
    return out / "r"


def copy_run(src: Path, dest_parent: Path) -> Path:
    return Path(shutil.copytree(src, dest_parent / src.name))


# ------------------------------------------------------------------------------------------- outputs
def test_ce_run_writes_every_output(teacher_run):
    run, summary = teacher_run
    for name in ("config.yaml", "metrics.csv", "metrics.jsonl", "summary.json", "curves.png", "train.log"):
        assert (run / name).stat().st_size > 0, name
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"step/loss", "step/loss_ce", "step/lr", "epoch/test_top1", "epoch/train_loss"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("epoch/test_top1")] == [1, 2, 3, 4]
    history = rows(run)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert len((run / "metrics.csv").read_text().splitlines()) == 5  # header + 4 epochs
    for key in ("lr", "train_loss", "train_loss_ce", "train_top1", "test_top1", "test_top5", "test_loss",
                "images_per_s", "epoch_time_s", "best_top1"):
        assert history[-1][key] is not None, key
    assert history[0]["lr"] == pytest.approx(0.1)  # cosine starts at the base lr
    assert history[-1]["lr"] < history[0]["lr"]
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["last"]["epoch"] == 4 and summary["last"]["test_top1"] == history[-1]["test_top1"]
    best = max(history, key=lambda r: r["test_top1"])
    assert summary["best"] == {"epoch": best["epoch"], "test_top1": best["test_top1"], "test_top5": best["test_top5"]}
    assert history[-1]["train_loss"] < history[0]["train_loss"]  # it trained (no CPU-specific accuracy threshold)
    assert summary["teacher_test_top1"] is None and summary["params"] > 0 and summary["images_per_s"] > 0
    classes = [f"class_{i}" for i in range(10)]  # the data's class names, recorded with the run
    assert summary["classes"] == classes and load_checkpoint(run / "best").meta["classes"] == classes
    assert (run / "run.lock").read_text() == ""  # the run's lock, released
    assert config.validate(yaml.safe_load((run / "config.yaml").read_text()))["model"]["name"] == "resnet14"
    for ck in ("last", "best"):
        ckpt = load_checkpoint(run / ck)
        assert ckpt.weights and all(k.startswith("student.") for k in ckpt.weights)
        assert ckpt.meta["epoch"] == (4 if ck == "last" else best["epoch"])
        assert set(ckpt.state) == {"optimizer", "scheduler", "scaler"}
    ev = evaluate_checkpoint(run)
    assert ev["epoch"] == best["epoch"]
    assert ev["top1"] == pytest.approx(best["test_top1"]) and ev["loss"] == pytest.approx(best["test_loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["kd", "blockkd"])
def test_distillation_from_a_teacher_run(teacher_run, tmp_path, caplog, method):
    run, summary = teacher_run
    if method not in methods.names():
        pytest.fail(f"method {method} is not registered")
    cfg = recipe(tmp_path, "s", method__name=method, teacher__name="resnet14", teacher__checkpoint=str(run),
                 train__epochs=1)
    with caplog.at_level(logging.INFO, logger="blockkd.engine"):
        result = train(cfg)
    teacher_top1 = evaluate_checkpoint(run, data_overrides=cfg["data"])["top1"]  # the teacher's best/ on this data
    assert result["teacher_test_top1"] == pytest.approx(teacher_top1)
    assert f"teacher resnet14: test top-1 {teacher_top1:.1f}%" in caplog.text
    assert "CHANCE" not in caplog.text
    weights = load_checkpoint(tmp_path / "s" / "last").weights
    assert not any(k.startswith("teacher.") for k in weights)
    assert any(k.startswith("student.") for k in weights)
    if method == "blockkd":
        assert any(k.startswith("connectors.") for k in weights)
    terms = [k for k in rows(tmp_path / "s")[0] if k.startswith("train_loss_")]
    assert len(terms) == (2 if method == "kd" else 5)


def test_teacher_checkpoint_formats_and_checks(teacher_run, tmp_path, caplog):
    run, _ = teacher_run
    teacher = load_checkpoint(run / "best").student_weights()
    one_step = dict(method__name="kd", teacher__name="resnet14", train__epochs=1, train__max_steps=1)

    foreign = tmp_path / "ckpt_epoch_240.pth"  # RepDistiller/mdistiller layout
    torch.save({"model": teacher, "epoch": 240}, foreign)
    cfg = recipe(tmp_path, "pth", teacher__checkpoint=str(foreign), **one_step)
    assert train(cfg)["teacher_test_top1"] == pytest.approx(
        evaluate_checkpoint(run, data_overrides=cfg["data"])["top1"])

    random_teacher = tmp_path / "random.safetensors"
    safetensors.torch.save_file(models.create("resnet14", num_classes=10).state_dict(), str(random_teacher))
    with caplog.at_level(logging.INFO, logger="blockkd.engine"):
        result = train(recipe(tmp_path, "chance", teacher__checkpoint=str(random_teacher), **one_step))
    assert result["steps"] == 1
    assert "THE TEACHER IS AT CHANCE LEVEL" in caplog.text

    cfg = recipe(tmp_path, "mismatch", teacher__checkpoint=str(run), data__num_classes=5, **one_step)
    for _ in range(2):  # the folder of a failed start is reused without --overwrite
        with pytest.raises(BlockKDError, match=r"10 classes.*\(synthetic\) has 5 classes"):
            train(cfg)
    with pytest.raises(BlockKDError, match="holds a resnet14, but teacher.name is resnet8"):
        train(recipe(tmp_path, "wrong", teacher__checkpoint=str(run), **{**one_step, "teacher__name": "resnet8"}))


# ------------------------------------------------------------------------------------------- resume
def test_resume_is_exact(two_epochs, tmp_path, monkeypatch):
    full = train(recipe(tmp_path, "full", train__epochs=3))
    reference = untimed(rows(tmp_path / "full"))
    ref_weights = (tmp_path / "full" / "last" / "weights.safetensors").read_bytes()
    assert untimed(rows(two_epochs)) == reference[:2]  # two runs with one seed agree

    # 1) a finished 2-epoch run extended to 3 epochs
    run = copy_run(two_epochs, tmp_path)
    with pytest.raises(BlockKDError, match="exists; pass --resume"):
        train(recipe(tmp_path, "r", train__epochs=3))
    resumed = train(recipe(tmp_path, "r", train__epochs=3), resume=True)
    assert untimed(rows(run)) == reference
    assert (run / "last" / "weights.safetensors").read_bytes() == ref_weights
    assert resumed["best"] == full["best"] and resumed["last"] == full["last"]

    # 2) killed in the middle of epoch 3 (4 steps per epoch), then resumed; the loss uses torch's RNG
    patch_forward(monkeypatch, noisy)
    train(recipe(tmp_path, "noisy", train__epochs=3))
    reference = untimed(rows(tmp_path / "noisy"))
    ref_weights = (tmp_path / "noisy" / "last" / "weights.safetensors").read_bytes()
    cfg = recipe(tmp_path, "killed", train__epochs=3)
    patch_forward(monkeypatch, noisy_then_killed_at(10))
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert load_checkpoint(tmp_path / "killed" / "last").meta["epoch"] == 2
    patch_forward(monkeypatch, noisy)
    train(cfg, resume=True)
    assert untimed(rows(tmp_path / "killed")) == reference
    assert (tmp_path / "killed" / "last" / "weights.safetensors").read_bytes() == ref_weights


def test_corrupt_last_falls_back_with_a_warning(two_epochs, tmp_path, caplog):
    run = copy_run(two_epochs, tmp_path)
    weights = run / "last" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(BlockKDError, match="weights.safetensors"):
        load_checkpoint(run / "last")
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        train(recipe(tmp_path, "r", train__epochs=3), resume=True)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "weights.safetensors" in warning and "last.prev/ (epoch 1)" in warning
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert load_checkpoint(run / "last").meta["epoch"] == 3


def forget_setting(checkpoint: Path, key: str) -> None:
    """Rewrite ``checkpoint``'s meta.json (and its checksum) as a blockkd from before ``key`` existed wrote it."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    *path, leaf = key.split(".")
    node = meta["config"]
    for part in path:
        node = node[part]
    del node[leaf]
    text = json.dumps(meta, indent=1).encode("utf-8")
    (checkpoint / "meta.json").write_bytes(text)
    (checkpoint / "meta.json.sha256").write_text(hashlib.sha256(text).hexdigest())


def test_resume_names_settings_the_run_predates(teacher_run, tmp_path, caplog):
    """A run saved before a setting existed resumes with today's default for it: the user is told which,
    and when the checkpoint then does not fit (blockkd-lite's num_stones went from null, every stone, to 2),
    how to fix it."""
    run, _ = teacher_run
    lite = dict(method__name="blockkd-lite", teacher__name="resnet14", teacher__checkpoint=str(run))
    train(recipe(tmp_path, "old", **lite, train__epochs=1, method__options={"num_stones": None}))
    for ck in ("last", "best"):
        forget_setting(tmp_path / "old" / ck, "method.options.num_stones")
    with pytest.raises(BlockKDError, match=r"does not fit this distiller.*unexpected \['connectors\.2\..*"
                                           r"saved config predates method\.options\.num_stones=2: pass"):
        train(recipe(tmp_path, "old", **lite), resume=True)
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        train(recipe(tmp_path, "old", **lite, method__options={"num_stones": None}), resume=True)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "predates these settings (today's defaults apply): method.options.num_stones=null" in warning
    assert [r["epoch"] for r in rows(tmp_path / "old")] == [1, 2]


def test_resume_refuses_a_removed_option_that_trained_differently(teacher_run, tmp_path):
    """A run saved by a blockkd that still had an option since removed (docs/blockkd.md): its former default
    resumes as before; a value whose behaviour is gone is refused in one line naming it."""
    run, _ = teacher_run
    bkd = dict(method__name="blockkd", teacher__name="resnet14", teacher__checkpoint=str(run))
    train(recipe(tmp_path, "old", **bkd, train__epochs=1))
    for value, refused in ((1, False), (4, True)):
        for ck in ("last", "best"):
            set_setting(tmp_path / "old" / ck, "method.options.stones_every", value)
        if refused:
            with pytest.raises(BlockKDError) as e:
                train(recipe(tmp_path, "old", **bkd, train__epochs=3), resume=True)
            assert str(e.value) == ("this run was trained with method.options.stones_every=4, removed in blockkd 0.2 "
                                    "(below KD, round 12: see docs/blockkd.md); resume it with the blockkd that "
                                    "started it, or start a new run")
        else:
            train(recipe(tmp_path, "old", **bkd, train__epochs=2), resume=True)
    assert [r["epoch"] for r in rows(tmp_path / "old")] == [1, 2]
    with pytest.raises(BlockKDError, match=r"^method\.options\.stones_every was removed in blockkd 0\.2 .*; delete it"):
        recipe(tmp_path, "new", **bkd, method__options={"stones_every": 1})


def set_setting(checkpoint: Path, key: str, value) -> None:
    """Rewrite ``checkpoint``'s meta.json (and its checksum) with ``key`` set to ``value``."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    *path, leaf = key.split(".")
    node = meta["config"]
    for part in path:
        node = node[part]
    node[leaf] = value
    text = json.dumps(meta, indent=1).encode("utf-8")
    (checkpoint / "meta.json").write_bytes(text)
    (checkpoint / "meta.json.sha256").write_text(hashlib.sha256(text).hexdigest())


def test_nonfinite_loss_stops_without_touching_checkpoints(two_epochs, tmp_path, monkeypatch, caplog):
    run = copy_run(two_epochs, tmp_path)
    before = {name: files(run / name) for name in ("last", "last.prev", "best")}
    patch_forward(monkeypatch, nan_at(2))  # epoch 3, step 2
    with pytest.raises(BlockKDError, match=r"non-finite loss at epoch 3 step 2: term 'loss_ce' = nan"):
        train(recipe(tmp_path, "r", train__epochs=3), resume=True)
    assert {name: files(run / name) for name in before} == before
    assert len(rows(run)) == 2

    patch_forward(monkeypatch, nan_at(2))
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        summary = train(recipe(tmp_path, "skip", train__nonfinite="skip"))
    assert summary["skipped_steps"] == 1 and summary["epochs"] == 2
    assert "step skipped" in caplog.text
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "skip" / "last").weights.values()
               if v.is_floating_point())


def test_run_folder_guards(tmp_path):
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("not a run")
    with pytest.raises(BlockKDError, match="refusing to delete"):
        train(recipe(tmp_path, "keep"), overwrite=True)
    assert (tmp_path / "keep" / "notes.txt").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(BlockKDError, match="not writable"):
        train(recipe(tmp_path / "file", "r"))


# ------------------------------------------------------------------------------------------- units
def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    weights = {f"student.{k}": v for k, v in model.state_dict().items()}
    folder = save_checkpoint(tmp_path / "last", weights=weights, meta={"epoch": 1},
                             state={"optimizer": opt.state_dict()})
    save_checkpoint(tmp_path / "last", weights=weights, meta={"epoch": 2}, state={"optimizer": opt.state_dict()})
    assert load_checkpoint(tmp_path / "last.prev").meta["epoch"] == 1
    ckpt = load_checkpoint(folder)
    assert (ckpt.meta["epoch"] == 2 and ckpt.meta["version"] == 2
            and len(ckpt.meta["sha256"]["weights.safetensors"]) == 64)
    assert all(torch.equal(ckpt.weights[k], v) for k, v in weights.items())
    restored = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(ckpt.state["optimizer"])
    assert torch.equal(restored.state[model.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"])
    assert not list(tmp_path.glob(".*tmp"))
    (folder / "optim.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(BlockKDError, match="optim.safetensors"):
        load_checkpoint(folder)
    # meta.json holds the tensors' checksums, and is covered by its own: an edit that keeps it valid JSON
    # (a changed epoch, a forged sha256 of a replaced tensor file) is caught and named
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "epoch": 7}))
    with pytest.raises(BlockKDError,
                       match=r"meta\.json is corrupt or truncated \(sha256 mismatch with meta\.json\.sha256\)"):
        load_checkpoint(folder)
    (folder / "meta.json.sha256").unlink()
    with pytest.raises(BlockKDError, match=r"meta\.json\.sha256 is missing"):
        load_checkpoint(folder)
    (folder / "meta.json").write_text("{")
    with pytest.raises(BlockKDError, match="meta.json"):
        load_checkpoint(folder)


def test_schedules():
    ms = dict(name="multistep", steps_per_epoch=10, epochs=6, options=MultistepOptions(milestones=[2, 4], gamma=0.1))
    assert [lr_factor(s, **ms) for s in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = dict(ms, warmup_epochs=1)
    assert [lr_factor(s, **warm) for s in (0, 4, 9, 10, 25)] == pytest.approx([0.1, 0.5, 1, 1, 0.1])
    cos = dict(name="cosine", steps_per_epoch=10, epochs=2, options=DecayOptions(min_lr=0.01), base_lr=0.1)
    assert [lr_factor(s, **cos) for s in (0, 10, 20)] == pytest.approx([1, 0.55, 0.1])
    assert lr_factor(7, name="constant", options=NoOptions(), steps_per_epoch=10, epochs=1) == 1
    lin = dict(name="linear", steps_per_epoch=10, epochs=2, options=DecayOptions(min_lr=0.0), base_lr=0.1,
               warmup_epochs=0.5)  # transformer fine-tuning: 5 warm-up steps, then linear to 0 over 15
    assert [lr_factor(s, **lin) for s in (0, 4, 5, 20)] == pytest.approx([0.2, 1, 1, 0])
    assert lr_factor(12, **lin) == pytest.approx(1 - 7 / 15)
    warm_cos = dict(cos, warmup_epochs=0.5)  # 5 warm-up steps, then cosine over the remaining 15
    assert [lr_factor(s, **warm_cos) for s in (0, 4, 5)] == pytest.approx([0.2, 1, 1])

    def scheduler():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        section = config.validate({"model": {"name": "resnet8"}, "schedule": {
            "name": "multistep", "milestones": [1], "gamma": 0.5, "warmup_epochs": 0.5}}).schedule
        return opt, build_scheduler(opt, section, steps_per_epoch=4, epochs=3)

    opt, sched = scheduler()
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.05, 0.05])
    opt2, sched2 = scheduler()
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(json.loads(json.dumps(sched.state_dict())))  # JSON-safe, as in meta.json
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] and sched2.last_epoch == 6


def test_runtime_settings_are_resolved_and_restored():
    cpu = torch.device("cpu")
    assert runtime.resolve_amp("auto", cpu) is None and runtime.resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(BlockKDError, match="fp16 needs a CUDA device"):
        runtime.resolve_amp("fp16", cpu)
    rt = runtime.resolve("cpu", "auto", "auto")
    assert (rt.device, rt.amp_dtype, rt.channels_last) == (cpu, None, True)
    assert not runtime.resolve("cpu", "auto", False).channels_last
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with runtime.reproducibility(True):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before
    runtime.seed_everything(3)
    state = runtime.rng_state()
    a = (torch.rand(3), np.random.rand(), random.random())
    runtime.set_rng_state(json.loads(json.dumps(state)))  # as stored in meta.json
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_precise_bn_changes_the_evaluated_statistics_and_nothing_trained(tmp_path, monkeypatch):
    """``train.precise_bn``: the evaluated student's BN statistics are the average over the last epoch's first
    training batches under the final weights; the weights (and the loss's RNG draws) are those of a run
    without it."""
    from blockkd import data as data_lib
    from blockkd.engine.precise_bn import recompute_bn
    patch_forward(monkeypatch, noisy)
    train(recipe(tmp_path, "plain"))
    done = train(recipe(tmp_path, "precise", train__precise_bn=2))
    plain, precise = (safetensors.torch.load_file(tmp_path / r / "last" / "weights.safetensors")
                      for r in ("plain", "precise"))
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    assert stats and plain.keys() == precise.keys()
    assert all(torch.equal(plain[k], precise[k]) for k in plain if k not in stats and "num_batches" not in k)
    assert not all(torch.allclose(plain[k], precise[k]) for k in stats)

    cfg = recipe(tmp_path, "again")
    model = models.create("resnet8", 10, 3)
    model.load_state_dict({k.removeprefix("student."): v for k, v in plain.items() if k.startswith("student.")})
    data = data_lib.build(cfg.data, device="cpu", seed=cfg.train.seed)
    data.set_epoch(1)
    recompute_bn(model, data.train, 2)
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(v, precise[f"student.{k}"], rtol=1e-4, atol=1e-6), k
    assert done["last"]["test_top1"] == evaluate_checkpoint(tmp_path / "precise" / "last")["top1"]
