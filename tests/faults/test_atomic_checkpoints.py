"""Guarantee 2: checkpoints are atomic. A write that fails half-way (an I/O error, a full disk) leaves the
previous checkpoint in place and readable; a damaged file is detected on load and named; --resume falls
back to the previous good checkpoint with a warning."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from blockkd.engine import checkpoint, load_checkpoint, save_checkpoint
from blockkd.engine.checkpoint import copy_checkpoint
from blockkd.errors import BlockKDError
from faultlib import cli_here, one_error_line, snapshot, write_recipe
from helpers import rows, untimed


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"student.w": torch.randn(64, 64, generator=gen), "connectors.0.b": torch.randn(64, generator=gen)}


def _state(seed: int) -> dict:
    return {"optimizer": {"state": {0: {"momentum_buffer": torch.full((8,), float(seed))}}, "lr": 0.1 * seed}}


def _save(root: Path, epoch: int) -> None:
    """One epoch's checkpoints, as the trainer writes them: last/ (keeping last.prev/), then best/."""
    save_checkpoint(root / "last", weights=_weights(epoch), meta={"epoch": epoch}, state=_state(epoch))
    copy_checkpoint(root / "last", root / "best")


def _fail_writing(monkeypatch, tmp_name: str, file: str, err: int) -> None:
    """``file`` of the temporary folder ``tmp_name`` gets half its bytes, then the OSError ``err``."""
    real = checkpoint.write_synced

    def write_bytes(path: Path, data: bytes) -> None:
        if path.parent.name == tmp_name and path.name == file:
            real(path, data[: len(data) // 2])
            raise OSError(err, os.strerror(err), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_synced", write_bytes)


def _fail_renaming(monkeypatch, tmp_name: str, err: int) -> None:
    """The rename that publishes ``tmp_name`` fails, after the old folder was already moved aside."""
    real = os.replace

    def replace(src, dst):
        if Path(src).name == tmp_name:
            raise OSError(err, os.strerror(err), str(src))
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)


FAILURES = [  # (folder, where, errno)
    ("last", "weights.safetensors", errno.ENOSPC),
    ("last", "optim.safetensors", errno.EIO),
    ("last", "meta.json", errno.ENOSPC),
    ("last", "rename", errno.EIO),
    ("best", "weights.safetensors", errno.ENOSPC),
    ("best", "meta.json", errno.EIO),
    ("best", "rename", errno.ENOSPC),
]


@pytest.mark.parametrize("folder,where,err", FAILURES, ids=[f"{f}-{w}-{errno.errorcode[e]}" for f, w, e in FAILURES])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, folder, where, err):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    before = snapshot(tmp_path)
    if where == "rename":
        _fail_renaming(monkeypatch, f".{folder}.tmp", err)
    else:
        _fail_writing(monkeypatch, f".{folder}.tmp", where, err)
    with pytest.raises(BlockKDError) as info:
        _save(tmp_path, 3)
    message = str(info.value)
    assert f"cannot write checkpoint {tmp_path / folder}: {os.strerror(err)}" in message and "\n" not in message
    monkeypatch.undo()
    after = snapshot(tmp_path)
    if folder == "last":  # nothing changed
        assert after == before
    else:  # last/ moved on to epoch 3 (with last.prev/ = epoch 2); best/ is still epoch 2, byte for byte
        assert after["best"] == before["best"] and after["last.prev"] == before["last"]
        assert load_checkpoint(tmp_path / "last").meta["epoch"] == 3
    assert load_checkpoint(tmp_path / folder).meta["epoch"] == 2  # readable, verified against its sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "last", "last.prev"]  # no temporary left


@pytest.mark.parametrize("file", ["weights.safetensors", "optim.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "flip-one-bit"])
def test_damaged_file_is_detected_and_named(tmp_path, file, damage):
    _save(tmp_path, 1)
    path = tmp_path / "last" / file
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:  # same length: only the checksum can tell (here: a float inside the tensor data)
        data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BlockKDError, match=rf"checkpoint file {path} is corrupt or truncated \(sha256"):
        load_checkpoint(tmp_path / "last")
    (tmp_path / "last" / "meta.json").write_text('{"format": "blockkd-checkpoint", "epo')
    with pytest.raises(BlockKDError, match=rf"checkpoint file {tmp_path / 'last' / 'meta.json'} is unreadable"):
        load_checkpoint(tmp_path / "last")


def test_disk_full_during_training_stops_cleanly_and_resumes_exactly(tmp_path, monkeypatch):
    """A full disk while epoch 2's last/ is written: one error line, exit 2, epoch 1's checkpoint intact;
    once space is back, --resume finishes exactly like an uninterrupted run."""
    write_recipe(tmp_path / "ref" / "r.yaml")
    write_recipe(tmp_path / "full" / "r.yaml")
    assert cli_here(["train", "r.yaml"], tmp_path / "ref").returncode == 0
    run = tmp_path / "full" / "runs" / "r"
    seen: list[dict] = []
    real = checkpoint.write_synced

    def write_bytes(path: Path, data: bytes) -> None:
        if path.parent.name == ".last.tmp" and (run / "last").exists():  # the second last/ (epoch 2)
            seen.append(snapshot(run))
            real(path, data[:1000])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_synced", write_bytes)
    out = cli_here(["train", "r.yaml"], tmp_path / "full")
    monkeypatch.undo()
    assert out.returncode == 2 and out.stderr == (
        f"error: cannot write checkpoint {Path('runs/r/last')}: No space left on device; the previous checkpoint "
        "is kept\n")
    assert snapshot(run) == seen[0] and load_checkpoint(run / "last").meta["epoch"] == 1
    assert cli_here(["train", "r.yaml", "--resume"], tmp_path / "full").returncode == 0
    ref = tmp_path / "ref" / "runs" / "r"
    assert untimed(rows(run)) == untimed(rows(ref))
    assert (run / "last" / "weights.safetensors").read_bytes() == (ref / "last" / "weights.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def damaged_run(tmp_path_factory, commands):
    """A finished 3-epoch run whose last/weights.safetensors has one flipped bit, then ``blockkd eval`` of
    last/ and ``blockkd train --resume train.epochs=4`` on it (side by side)."""
    cwd = tmp_path_factory.mktemp("damaged")
    write_recipe(cwd / "r.yaml")
    assert cli_here(["train", "r.yaml"], cwd).returncode == 0
    weights = cwd / "runs" / "r" / "last" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    return cwd, commands.run_many({"eval": (["eval", "runs/r/last", "--device", "cpu"], cwd),
                                   "resume": (["train", "r.yaml", "--resume", "train.epochs=4"], cwd)})


def test_eval_of_a_damaged_checkpoint_names_the_file(damaged_run):
    _, out = damaged_run
    line = one_error_line(out["eval"])
    assert line == ("error: checkpoint file runs/r/last/weights.safetensors is corrupt or truncated "
                    "(sha256 mismatch with meta.json)")


def test_resume_falls_back_to_the_previous_checkpoint_with_a_warning(damaged_run):
    cwd, out = damaged_run
    resume = out["resume"]
    assert resume.returncode == 0, resume.stderr
    warnings = [line for line in resume.stderr.splitlines() if line.startswith("warning:")]
    assert any("runs/r/last/weights.safetensors is corrupt" in w and "resuming from last.prev/ (epoch 2)" in w
               for w in warnings), resume.stderr
    history = rows(cwd / "runs" / "r")
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert load_checkpoint(cwd / "runs" / "r" / "last").meta["epoch"] == 4

