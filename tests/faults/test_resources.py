"""Guarantee 6: resource limits. Running out of device memory is one line that says which batch size to
try; Ctrl-C stops a run with exit status 130 and a message, leaving a resumable checkpoint (even when it
arrives while a checkpoint is being written), and DataLoader workers end with the run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from blockkd.engine import checkpoint, evaluation, load_checkpoint, trainer
from faultlib import cli_here, env, wait_for_line, write_recipe
from helpers import rows, untimed


# ----------------------------------------------------------------------------------------- memory
def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("where,batch,expected", [
    ("step", 64, "out of memory at batch size 64; try data.batch_size=32"),
    ("step", 1, "out of memory at batch size 1; try a smaller model or a larger device"),
    ("eval", 64, "out of memory at eval batch size 48; try data.eval_batch_size=24"),
])
def test_out_of_memory_names_the_batch_size_to_try(tmp_path, monkeypatch, where, batch, expected):
    write_recipe(tmp_path / "r.yaml")
    if where == "step":
        monkeypatch.setattr(trainer.Trainer, "step_once", _oom)
    else:
        monkeypatch.setattr(trainer, "evaluate", _oom)
    out = cli_here(["train", "r.yaml", f"data.batch_size={batch}", "data.eval_batch_size=48",
                    "data.drop_last=false"], tmp_path)
    assert (out.returncode, out.stderr) == (2, f"error: {expected}\n")
    assert not (tmp_path / "runs" / "r" / "last").exists()


def test_out_of_memory_in_blockkd_eval(tmp_path, monkeypatch):
    write_recipe(tmp_path / "r.yaml", train__epochs=1)
    assert cli_here(["train", "r.yaml"], tmp_path).returncode == 0
    monkeypatch.setattr(evaluation, "evaluate", _oom)
    out = cli_here(["eval", "runs/r", "--data", "eval_batch_size=100"], tmp_path)
    assert (out.returncode, out.stderr) == (2, "error: out of memory at eval batch size 100; try "
                                               "data.eval_batch_size=50\n")


# ----------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_while_a_checkpoint_is_written_finishes_it_first(tmp_path, monkeypatch):
    """A real SIGINT arrives while epoch 2's last/ is being written: the checkpoint is completed (last/
    and best/ agree), then the run stops with 130; --resume ends exactly like an uninterrupted run."""
    for name in ("ref", "int"):
        write_recipe(tmp_path / name / "r.yaml")
    assert cli_here(["train", "r.yaml"], tmp_path / "ref").returncode == 0
    run = tmp_path / "int" / "runs" / "r"
    real, sent = checkpoint.write_synced, []

    def write_bytes(path: Path, data: bytes) -> None:
        if path.parent.name == ".last.tmp" and (run / "last").exists() and not sent:  # epoch 2's last/
            sent.append(path.name)
            signal.raise_signal(signal.SIGINT)  # delivered to this (the main) thread right away
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_synced", write_bytes)
    out = cli_here(["train", "r.yaml"], tmp_path / "int")
    monkeypatch.undo()
    assert sent == ["weights.safetensors"]
    assert out.returncode == 130 and "interrupted; run the same command with --resume" in out.stderr
    last = load_checkpoint(run / "last")
    assert last.meta["epoch"] == 2 and [r["epoch"] for r in rows(run)] == [1, 2]
    assert load_checkpoint(run / "best").meta["epoch"] == last.meta["best_epoch"]
    assert not list(run.glob(".*.tmp"))
    assert cli_here(["train", "r.yaml", "--resume"], tmp_path / "int").returncode == 0
    ref = tmp_path / "ref" / "runs" / "r"
    assert untimed(rows(run)) == untimed(rows(ref))
    assert (run / "last" / "weights.safetensors").read_bytes() == (ref / "last" / "weights.safetensors").read_bytes()


def _image_folder(root: Path) -> None:
    """4 classes of small JPEGs (12 train, 3 val each), a colour per class plus noise."""
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 3)):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(20, 20, 3, generator=gen) * 60 + 60 * c).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg")


def _session(sid: int) -> dict[int, str]:
    """Live (non-zombie) processes of session ``sid``: pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # the process ended while we looked
    return found


def test_ctrl_c_mid_epoch_with_dataloader_workers(tmp_path, commands):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while epoch 2 runs on an image
    folder with 2 DataLoader workers: exit 130 with a message, no process of the run left behind,
    last/ holds epoch 1, and --resume completes the run."""
    _image_folder(tmp_path / "images")
    write_recipe(tmp_path / "r.yaml", method={"name": "ce"}, teacher={},
                 data={"name": "imagefolder", "root": "images", "image_size": 16, "batch_size": 8,
                       "eval_batch_size": 12, "num_workers": 2},
                 train__epochs=2)
    proc = subprocess.Popen([sys.executable, "-m", "blockkd", "train", "r.yaml"], cwd=tmp_path,
                            env=env(BLOCKKD_FAULT="pause@step:step=8"),  # epoch 2 (6 steps per epoch), step 3
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_line(proc, "fault point step reached", timeout=180)
        running = _session(proc.pid)
        assert len(running) >= 3, running  # the run and its two workers
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "warning: interrupted in epoch 2; runs/r/last holds epoch 1" in stderr
    assert stderr.rstrip().endswith("interrupted; run the same command with --resume to continue from the last "
                                     "checkpoint")
    assert "Traceback" not in stderr
    time.sleep(0.5)
    assert _session(proc.pid) == {}, "processes of the interrupted run are still alive"
    run = tmp_path / "runs" / "r"
    assert load_checkpoint(run / "last").meta["epoch"] == 1
    resumed = commands.run(["train", "r.yaml", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and json.loads((run / "summary.json").read_text())["epochs"] == 2
    assert [r["epoch"] for r in rows(run)] == [1, 2]
