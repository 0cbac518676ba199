"""On-policy distillation (GKD's λ, ``method.options.on_policy``): the student's sampled continuations replace
a share of each batch, labelled on the generated tokens only, scored by the teacher; a run resumes exactly."""
from __future__ import annotations

import torch

from blockkd import methods
from blockkd.blocks import text_input
from blockkd.engine import train
from helpers import assert_resumes_exactly, tiny_llama

VOCAB, LENGTH = 300, 32
LM_DATA = {"name": "lm_fortunes", "categories": ["pets", "paradoxum"], "vocab_size": VOCAB, "seq_len": LENGTH,
           "batch_size": 4, "eval_batch_size": 16, "train_subset": 8}


def llama(layers: int, width: int, seed: int = 0):
    """The tiny Llama with token 7 as its end of sequence, initialised from ``seed``."""
    return tiny_llama(layers, width, VOCAB, eos_token_id=7, seed=seed)


def test_on_policy_rows_are_the_students_continuations_of_their_prompts():
    student, teacher = llama(1, 16), llama(2, 32, seed=1)
    d = methods.create("lm-kd", student, teacher, text_input(LENGTH), on_policy=0.5, max_new_tokens=12,
                       prompt_tokens=4, stop_tokens=[5, 6], gen_temperature=1.5).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, VOCAB, (4, LENGTH), generator=g)
    y = torch.roll(ids, -1, 1)
    y[:, -1] = -100
    y[0, :9] = -100  # a prompt of 10 tokens
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(3)
    x2, y2 = d.on_policy_batch(x, y, 2)
    torch.manual_seed(3)
    again = d.on_policy_batch(x, y, 2)
    assert torch.equal(x2["input_ids"], again[0]["input_ids"]) and torch.equal(y2, again[1])  # torch's RNG
    assert d.training and student.training  # generation in eval mode, the mode restored
    assert torch.equal(x2["input_ids"][2:], ids[2:]) and torch.equal(y2[2:], y[2:])  # the other rows kept
    for b, p in ((0, 10), (1, 4)):
        row, lab, m = x2["input_ids"][b], y2[b], x2["attention_mask"][b]
        k = int(m.sum())
        assert torch.equal(row[:p], ids[b, :p]) and (lab[:p - 1] == -100).all()  # the prompt, unlabelled
        gen = lab[p - 1:][lab[p - 1:] != -100]
        assert 1 <= len(gen) <= 12 and torch.equal(gen[:-1], row[p:p + len(gen) - 1])  # labels = next tokens
        assert not any(t in (5, 6) for t in gen[:-1].tolist())  # nothing after a stop token
        assert (m[:k] == 1).all() and (m[k:] == 0).all() and (lab[k:] == -100).all()
    _, losses = d(x, y, epoch=0.0)
    sum(losses.values()).backward()
    assert losses["loss_kd"] > 0 and torch.isfinite(losses["loss_ce"])


def test_on_policy_run_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOCKKD_DATA", str(tmp_path / "data"))
    names = {}
    for role, (layers, width) in {"teacher": (2, 32), "student": (1, 16)}.items():
        llama(layers, width).config.to_json_file(str(tmp_path / f"{role}.json"))
        names[role] = f"hf-config.{tmp_path / f'{role}.json'}"

    def cfg(name: str, epochs: int) -> dict:
        return {"model": {"name": names["student"]}, "teacher": {"name": names["teacher"], "allow_random": True},
                "method": {"name": "lm-kd", "options": {"loss": "jsd", "on_policy": 0.5, "max_new_tokens": 8}},
                "data": LM_DATA, "optim": {"name": "adamw", "lr": 1e-3}, "schedule": {"name": "constant"},
                "train": {"epochs": epochs, "device": "cpu", "seed": 3},
                "output": {"dir": str(tmp_path), "name": name, "progress": False, "tensorboard": False,
                           "plot": False}}

    weights = assert_resumes_exactly(cfg, tmp_path)
    other = cfg("other", 2)
    other["train"]["seed"] = 4
    train(other)
    assert (tmp_path / "other" / "last" / "weights.safetensors").read_bytes() != weights
