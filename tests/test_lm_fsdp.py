"""FSDP2 (``train.fsdp``) under ``torchrun --nproc_per_node=2`` on CPU (gloo): lm-kd and lm-blockkd train like a
single process on the global batch (losses and weights to 1e-4 relative: float rounding of the sharded
reductions; a wrong average or shard would be far larger); a sharded run killed (SIGKILL, mid-epoch) and resumed
ends bit-identical to the uninterrupted sharded run; its ``hf/`` export is a plain ``save_pretrained`` folder
holding the checkpoint's weights; on-policy generation steps the ranks together."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from blockkd import config, engine
from blockkd.engine.checkpoint import load_checkpoint
from helpers import tiny_llama

# torchrun with 2 gloo ranks: minutes; `make test-fast` (pytest -m "not slow") skips them.
pytestmark = pytest.mark.slow

VOCAB, LENGTH = 300, 32
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    for role, (layers, width) in {"teacher": (2, 32), "student": (2, 16)}.items():
        tiny_llama(layers, width).config.to_json_file(str(root / f"{role}.json"))
    return root


def recipe(folder: Path, method: str, epochs: int) -> Path:
    cfg = {"model": {"name": f"hf-config.{folder / 'student.json'}"},
           "teacher": {"name": f"hf-config.{folder / 'teacher.json'}", "allow_random": True},
           "method": {"name": method, "options": {"chunk": 16}},
           "data": {"name": "lm_fortunes", "categories": ["pets", "paradoxum"], "vocab_size": VOCAB,
                    "seq_len": LENGTH, "batch_size": 4, "eval_batch_size": 8, "train_subset": 16},
           "optim": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "constant"},
           "train": {"epochs": epochs, "device": "cpu", "seed": 2, "amp": "off"},
           "output": {"dir": str(folder / "runs"), "progress": False, "tensorboard": False, "plot": False}}
    path = folder / f"{method}-{epochs}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(path: Path, *args: str, fault: str | None = None) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    env.pop("BLOCKKD_FAULT", None)
    if fault:  # the fault suite's hook: every rank SIGKILLs itself at that point
        env["BLOCKKD_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "blockkd",
           "train", str(path), "train.fsdp=true", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert (out.returncode != 0) == bool(fault), out.stdout[-3000:] + out.stderr[-3000:]
    if not fault:  # the summary is printed once, by rank 0
        assert out.stdout.count("run_dir:") == 1, out.stdout


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last", with_state=False).weights


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(a: Path, b: Path) -> None:
    for ra, rb in zip(rows(a), rows(b), strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["test_loss"] == pytest.approx(rb["test_loss"], rel=1e-4)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_lm_kd_sharded_matches_one_process_resumes_exactly_and_exports(folder, monkeypatch):
    monkeypatch.setenv("BLOCKKD_DATA", str(folder / "data"))
    path = recipe(folder, "lm-kd", 2)
    engine.train(config.load(path, ["output.name=single"]))
    torchrun(path, "output.name=fsdp")
    torchrun(path, "output.name=resumed", fault="step:step=6")  # killed mid-epoch 2 (4 steps per epoch)
    assert json.loads((folder / "runs" / "resumed" / "last" / "meta.json").read_text())["epoch"] == 1
    torchrun(path, "output.name=resumed", "--resume")
    runs = folder / "runs"
    assert_close_runs(runs / "fsdp", runs / "single")
    assert rows(runs / "fsdp")[-1]["train_loss"] < rows(runs / "fsdp")[0]["train_loss"]  # it trained
    assert (runs / "fsdp" / "last" / "weights.safetensors").read_bytes() == \
        (runs / "resumed" / "last" / "weights.safetensors").read_bytes()
    hf = transformers.AutoModelForCausalLM.from_pretrained(runs / "fsdp" / "hf")
    saved = weights(runs / "fsdp")
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(v, saved[f"student.{k}"], rtol=0, atol=0)
    assert (runs / "fsdp" / "samples.md").read_text().count("---") == 3


def test_lm_blockkd_sharded_matches_one_process(folder, monkeypatch):
    monkeypatch.setenv("BLOCKKD_DATA", str(folder / "data"))
    path = recipe(folder, "lm-blockkd", 1)
    engine.train(config.load(path, ["output.name=bkd-single"]))
    torchrun(path, "output.name=bkd-fsdp")
    assert_close_runs(folder / "runs" / "bkd-fsdp", folder / "runs" / "bkd-single")


def test_on_policy_generation_under_fsdp_keeps_the_ranks_in_step(folder, monkeypatch):
    """Each rank continues other prompts, so their generations end at different lengths: without synced
    generation a rank would wait forever for the other's gathers (the run would time out)."""
    monkeypatch.setenv("BLOCKKD_DATA", str(folder / "data"))
    path = recipe(folder, "lm-kd", 1)
    torchrun(path, "output.name=gkd", "method.options.on_policy=0.5", "method.options.max_new_tokens=12",
             "method.options.gen_temperature=2.0")
    summary = json.loads((folder / "runs" / "gkd" / "summary.json").read_text())
    assert summary["steps"] == 4 and rows(folder / "runs" / "gkd")[-1]["train_loss_kd"] > 0
