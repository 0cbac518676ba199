"""Guarantee 5: no untrusted code runs. Foreign ``.pth`` files load with ``weights_only=True`` only, so a
pickle that would run code is refused with a clear error; our checkpoints are safetensors + JSON (a
tampered run folder cannot run code on eval or --resume); recipes are read with YAML safe loading.

Every payload here would create a marker file if it ran; each test asserts that the marker is absent,
and the first ones show that the same payloads do run when loaded unsafely (so they are live).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from blockkd import config, models
from blockkd.engine import evaluate_checkpoint, train
from blockkd.errors import BlockKDError
from faultlib import cli_here, one_error_line, recipe, write_recipe
from helpers import rows


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the smallest 'arbitrary code' there is."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def malicious_pth(path: Path, marker: Path, kind: str) -> Path:
    """A RepDistiller-looking checkpoint (``{"model": state_dict}``) carrying the payload."""
    obj = {"model": models.create("resnet14", num_classes=10).state_dict(), "epoch": 240, "x": Payload(marker)}
    if kind == "torch.save":
        torch.save(obj, path)
    else:  # a bare pickle file named .pth (torch.load's legacy path)
        path.write_bytes(pickle.dumps(obj))
    return path


YAML_PAYLOAD = "model: !!python/object/apply:builtins.open [{marker}, w]\n"


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_payloads_are_live_when_loaded_unsafely(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = malicious_pth(tmp_path / "evil.pth", marker, kind)
    torch.load(path, weights_only=False) if kind == "torch.save" else pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    yaml.unsafe_load(YAML_PAYLOAD.format(marker=marker))
    assert marker.exists()


@pytest.mark.parametrize("kind", ["torch.save", "pickle"])
def test_load_weights_refuses_a_code_running_pickle(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = malicious_pth(tmp_path / "evil.pth", marker, kind)
    with pytest.raises(BlockKDError, match=rf"weights file {path} was refused for safety: it (would import "
                                           r"(builtins|io)\.open|holds more than tensors) .*weights_only=True"):
        models.load_weights(models.create("resnet14", num_classes=10), path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, commands):
    """``blockkd train`` with a malicious teacher / student .pth, a YAML payload as a recipe and as an
    override, and ``eval``/``--resume`` on run folders whose files were swapped for pickles (with their
    sha256 in meta.json updated, as an attacker would)."""
    cwd = tmp_path_factory.mktemp("untrusted")
    marker = cwd / "pwned"
    write_recipe(cwd / "ok.yaml")
    malicious_pth(cwd / "evil.pth", marker, "torch.save")
    (cwd / "evil.yaml").write_text(YAML_PAYLOAD.format(marker=marker))
    assert cli_here(["train", "ok.yaml"], cwd).returncode == 0
    for file in ("weights.safetensors", "optim.safetensors"):
        run = Path(shutil.copytree(cwd / "runs" / "r", cwd / "runs" / file))
        payload = pickle.dumps(Payload(marker))
        (run / "last" / file).write_bytes(payload)
        meta = json.loads((run / "last" / "meta.json").read_text())
        meta["sha256"][file] = hashlib.sha256(payload).hexdigest()  # a forger who rewrites every checksum
        text = json.dumps(meta)
        (run / "last" / "meta.json").write_text(text)
        (run / "last" / "meta.json.sha256").write_text(hashlib.sha256(text.encode()).hexdigest())
    jobs = {
        "teacher": ["train", "ok.yaml", "teacher.checkpoint=evil.pth", "teacher.allow_random=false",
                    "output.name=teacher"],
        "student": ["train", "ok.yaml", "model.name=resnet14", "model.checkpoint=evil.pth", "output.name=student"],
        "yaml-recipe": ["train", "evil.yaml"],
        "yaml-override": ["train", "ok.yaml", f"model.name=!!python/object/apply:builtins.open [{marker}, w]"],
        "eval-weights": ["eval", "runs/weights.safetensors/last", "--device", "cpu"],
        "resume-weights": ["train", "ok.yaml", "output.name=weights.safetensors", "--resume", "train.epochs=4"],
        "resume-optim": ["train", "ok.yaml", "output.name=optim.safetensors", "--resume", "train.epochs=4"],
    }
    return cwd, marker, commands.run_many({name: (args, cwd) for name, args in jobs.items()})


REFUSALS = {
    "teacher": "error: weights file evil.pth was refused for safety: it would import io.open",
    "student": "error: weights file evil.pth was refused for safety: it would import io.open",
    "yaml-recipe": "error: invalid YAML in evil.yaml, line 1, column 8: could not determine a constructor for "
                   "the tag 'tag:yaml.org,2002:python/object/apply:builtins.open'",
    "yaml-override": "error: cannot parse value '!!python/object/apply:builtins.open",
    "eval-weights": "error: checkpoint file runs/weights.safetensors/last/weights.safetensors is not a readable "
                    "safetensors file",
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_cli_refuses_code_with_one_line(cli_runs, name):
    _, marker, out = cli_runs
    assert one_error_line(out[name]).startswith(REFUSALS[name])
    assert not marker.exists()


@pytest.mark.parametrize("file", ["weights.safetensors", "optim.safetensors"])
def test_resume_skips_a_tampered_checkpoint(cli_runs, file):
    cwd, marker, out = cli_runs
    proc = out[f"resume-{file.split('.')[0]}"]
    assert proc.returncode == 0, proc.stderr
    assert f"runs/{file}/last/{file} is not a readable safetensors file" in proc.stderr
    assert "resuming from last.prev/ (epoch 2)" in proc.stderr
    assert [r["epoch"] for r in rows(cwd / "runs" / file)] == [1, 2, 3, 4]
    assert not marker.exists()


def test_checkpoints_never_go_through_pickle(tmp_path, monkeypatch):
    """Training, --resume and eval of our own run folders work with every unpickler disabled."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was read with pickle")

    cfg = config.validate(recipe(output__dir=str(tmp_path), train__epochs=1))
    train(cfg)
    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    train({**cfg, "train": {**cfg["train"], "epochs": 2}}, resume=True)
    assert evaluate_checkpoint(tmp_path / "r")["epoch"] in (1, 2)
    assert [r["epoch"] for r in rows(tmp_path / "r")] == [1, 2]


def test_recipe_payload_is_refused_in_process(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text("base: ok.yaml\n" + YAML_PAYLOAD.format(marker=marker))
    write_recipe(tmp_path / "ok.yaml")
    with pytest.raises(BlockKDError, match="could not determine a constructor for the tag"):
        config.load(path)
    with pytest.raises(BlockKDError, match="cannot parse value"):
        config.load(tmp_path / "ok.yaml", [f"train.seed=!!python/object/apply:builtins.open [{marker}, w]"])
    assert not marker.exists()
