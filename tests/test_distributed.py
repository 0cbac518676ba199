"""DDP as users run it: ``torchrun --nproc_per_node=2 -m blockkd train`` on CPU (gloo), tiny synthetic runs.

What is checked, through the ``$BLOCKKD_DEBUG_LOG`` hook (each rank appends the sample indices of every
training batch its loader delivers and a sha256 of its trained weights after every epoch):
- the two ranks train on disjoint halves of exactly the global batch a single process trains on;
- both ranks end every epoch with identical weights (BN running statistics included), equal to rank 0's
  checkpoint;
- a DDP run stopped after epoch 1 and resumed with ``--resume`` reproduces, epoch by epoch, the metrics
  of an uninterrupted single-process run with the same global batch.

Why the last comparison uses a kd run with a LayerNorm student (timm's ``test_convnext``): under DDP
without SyncBatchNorm (CUDA only) each rank normalises its half batch with its own BatchNorm statistics,
so a BN student legitimately drifts from the single-process run. With per-sample normalisation, no
augmentation and the teacher in eval mode, DDP's average of the two half-batch gradients equals the
full-batch gradient up to float rounding, so metrics agree to ~1e-6 relative (checked at 1e-5): a wrong gradient
average (sum instead of mean), a wrong shard or a lossy resume would be orders of magnitude larger.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockkd import config, engine
from blockkd.engine.checkpoint import load_checkpoint
from blockkd.engine.runtime import state_digest

# torchrun runs of several processes: minutes; `make test-fast` (pytest -m "not slow") skips them.
pytestmark = pytest.mark.slow

DATA = ("{name: synthetic, num_classes: 10, train_size: 64, test_size: 32, batch_size: 16, eval_batch_size: 32, "
        "augment: false}")
COMMON = f"""
data: {DATA}
optim: {{lr: 0.05}}
schedule: {{name: constant}}
train: {{epochs: 2, deterministic: true, device: cpu, channels_last: false}}
output: {{tensorboard: false, progress: false, plot: false}}
"""
# channels_last off: oneDNN's channels-last convolutions round differently at a rank's half batch than at the
# global batch, which would blur the 1e-5 comparison of DDP with one process (the layout is not under test).
STEPS_PER_EPOCH = 64 // 16
# kd with a LayerNorm student: DDP then trains like one process on the global batch (module docstring).
KD_LAYERNORM = """
model: {name: timm.test_convnext}
teacher: {name: resnet8, allow_random: true}
method: {name: kd}
"""


def recipe(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(body + COMMON)
    return path


def torchrun(path: Path, *args: str, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLOCKKD_DEBUG_LOG": str(log)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "blockkd", "train", str(path), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def single(path: Path, *overrides: str, log: Path, monkeypatch) -> dict:
    monkeypatch.setenv("BLOCKKD_DEBUG_LOG", str(log))
    return engine.train(config.load(path, list(overrides)))


def records(log: Path, rank: int, key: str) -> list[dict]:
    lines = Path(f"{log}.rank{rank}").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_trains_like_one_process(runs: Path, log: Path) -> list[dict]:
    """The kd run ``runs/ddp`` (2 epochs, 2 ranks) against ``runs/single``: the same losses epoch by epoch (to
    1e-5), test top-1 within one near-tie, training that moved, and both ranks' weights identical after each
    epoch. Returns the DDP run's metrics."""
    ddp, ref = metrics(runs / "ddp"), metrics(runs / "single")
    assert [m["epoch"] for m in ddp] == [1, 2]
    for a, b in zip(ddp, ref):
        for key in ("train_loss", "train_loss_ce", "train_loss_kd", "test_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["epoch"], key)
        assert abs(a["test_top1"] - b["test_top1"]) <= 100 / 32 + 1e-9  # at most one near-tie flipped
    assert ddp[1]["train_loss"] != pytest.approx(ddp[0]["train_loss"], rel=1e-3)  # it did train
    digests = [[r["weights_sha256"] for r in records(log, rank, "weights_sha256")] for rank in (0, 1)]
    assert len(digests[0]) == 2 and digests[0] == digests[1]  # one per epoch (over every launch)
    return ddp


def test_blockkd_ranks_train_disjoint_halves_of_the_global_batch_and_stay_identical(tmp_path, monkeypatch):
    path = recipe(tmp_path, "blockkd", """
model: {name: resnet8}
teacher: {name: resnet20, allow_random: true}
method: {name: blockkd}
""")
    runs = tmp_path / "runs"
    torchrun(path, f"output.dir={runs}", "output.name=ddp", "data.image_size=16", log=tmp_path / "ddp")
    single(path, f"output.dir={runs}", "output.name=single", "data.image_size=16", log=tmp_path / "single",
           monkeypatch=monkeypatch)

    batches = [records(tmp_path / "ddp", r, "indices") for r in (0, 1)]
    reference = records(tmp_path / "single", 0, "indices")
    assert len(batches[0]) == len(batches[1]) == len(reference) == 2 * STEPS_PER_EPOCH
    for a, b, ref in zip(*batches, reference):
        assert a["epoch"] == b["epoch"] == ref["epoch"]
        assert len(a["indices"]) == len(b["indices"]) == 8  # the global batch of 16, halved
        assert not set(a["indices"]) & set(b["indices"])
        assert sorted(a["indices"] + b["indices"]) == sorted(ref["indices"])
    for epoch in (0, 1):  # each epoch covers the training set once, in a new order
        seen = [i for r in (0, 1) for b in batches[r] if b["epoch"] == epoch for i in b["indices"]]
        assert sorted(seen) == list(range(64))
    assert batches[0][0]["indices"] != batches[0][STEPS_PER_EPOCH]["indices"]

    digests = [[r["weights_sha256"] for r in records(tmp_path / "ddp", rank, "weights_sha256")] for rank in (0, 1)]
    assert len(digests[0]) == 2 and digests[0] == digests[1]
    assert digests[0][0] != digests[0][1]  # training changed the weights
    assert state_digest(load_checkpoint(runs / "ddp" / "last").weights) == digests[0][-1]
    assert [m["epoch"] for m in metrics(runs / "ddp")] == [1, 2]  # rank 0 alone wrote the metrics, once each


def test_resumed_ddp_run_matches_a_single_process_run(tmp_path, monkeypatch):
    path = recipe(tmp_path, "kd", KD_LAYERNORM)
    runs = tmp_path / "runs"
    common = [f"output.dir={runs}", "data.image_size=32"]
    torchrun(path, *common, "output.name=ddp", f"train.max_steps={STEPS_PER_EPOCH}", log=tmp_path / "ddp")
    assert [m["epoch"] for m in metrics(runs / "ddp")] == [1]  # stopped after epoch 1
    torchrun(path, *common, "output.name=ddp", "--resume", log=tmp_path / "ddp")
    single(path, *common, "output.name=single", log=tmp_path / "single", monkeypatch=monkeypatch)

    ddp = assert_trains_like_one_process(runs, tmp_path / "ddp")
    assert [m["step"] for m in ddp] == [4, 8]


def test_dot_under_torchrun_matches_a_single_process_run(tmp_path, monkeypatch):
    """DOT's two backward passes per step run outside DDP's sync and are averaged by hand: the DDP run must
    train like one process on the global batch (same LayerNorm-student argument as above). A pass left
    unaveraged (each rank stepping on its own half) or summed would leave the metrics far apart."""
    path = recipe(tmp_path, "dot", KD_LAYERNORM)
    runs = tmp_path / "runs"
    common = [f"output.dir={runs}", "data.image_size=32", "optim.name=dot", "optim.delta=0.075"]
    torchrun(path, *common, "output.name=ddp", log=tmp_path / "ddp")
    single(path, *common, "output.name=single", log=tmp_path / "single", monkeypatch=monkeypatch)
    assert_trains_like_one_process(runs, tmp_path / "ddp")


def test_text_blockkd_under_torchrun_keeps_the_ranks_identical(tmp_path):
    """The text path (tokenised dict batches, dynamic padding, length buckets, token connectors) under DDP:
    two ranks train a tiny BERT student with Block-KD from a BERT teacher, and end every epoch with
    identical weights, equal to rank 0's checkpoint; rank 0 alone writes the run and the save_pretrained folder.
    The tokenizer the data trains (a fresh cache) is trained by rank 0 alone and sent to rank 1, which reads the
    same ids: trained once per rank, it need not be the same."""
    import transformers

    models = {}
    for role, (layers, hidden) in {"teacher": (2, 32), "student": (1, 16)}.items():
        cfg = transformers.BertConfig(vocab_size=300, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=32)
        cfg.to_json_file(str(tmp_path / f"{role}.json"))
        models[role] = f"hf-config.{tmp_path / f'{role}.json'}"
    path = tmp_path / "text.yaml"
    path.write_text(f"""
model: {{name: {models['student']}}}
teacher: {{name: {models['teacher']}, allow_random: true}}
method: {{name: blockkd}}
data: {{name: fortunes, categories: [computers, food], max_per_class: 24, max_length: 32, vocab_size: 300,
        batch_size: 8, eval_batch_size: 16}}
optim: {{name: adamw, lr: 1.0e-3}}
schedule: {{name: linear, warmup_epochs: 0.5}}
train: {{epochs: 2, deterministic: true, device: cpu}}
output: {{dir: {tmp_path / 'runs'}, name: ddp, tensorboard: false, progress: false, plot: false}}
""")
    env_data = {"BLOCKKD_DATA": str(tmp_path / "data")}  # the trained tokenizer's cache
    os.environ.update(env_data)
    try:
        torchrun(path, log=tmp_path / "ddp")
    finally:
        for key in env_data:
            os.environ.pop(key, None)
    digests = [[r["weights_sha256"] for r in records(tmp_path / "ddp", rank, "weights_sha256")] for rank in (0, 1)]
    assert len(digests[0]) == 2 and digests[0] == digests[1] and digests[0][0] != digests[0][1]
    tokenizers = [records(tmp_path / "ddp", rank, "tokenizer_sha256") for rank in (0, 1)]
    assert [[r["tokenizer_source"] for r in t] for t in tokenizers] == [["trained or cached"], ["rank 0"]]
    assert tokenizers[0][0]["tokenizer_sha256"] == tokenizers[1][0]["tokenizer_sha256"]
    run = tmp_path / "runs" / "ddp"
    assert state_digest(load_checkpoint(run / "last").weights) == digests[0][-1]
    assert [m["epoch"] for m in metrics(run)] == [1, 2] and (run / "hf" / "config.json").is_file()
