"""The offline teacher-logit cache (``blockkd cache-logits``, ``teacher.cache``): built, killed mid-way, resumed
(finished shards kept), exact against the live teacher, trained from, and refused for other data, another
tokenizer, an unfinished cache and Block-KD."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from blockkd import data, methods
from blockkd.cli import main
from blockkd.data.lm_cache import open_cache
from blockkd.engine import train
from blockkd.errors import BlockKDError
from blockkd.methods.lm import LMKD
from helpers import tiny_llama

VOCAB, LENGTH = 300, 32
LM_DATA = {"name": "lm_fortunes", "categories": ["pets", "paradoxum"], "vocab_size": VOCAB, "seq_len": LENGTH,
           "batch_size": 4, "eval_batch_size": 16, "train_subset": 20}
from blockkd.blocks import text_input  # noqa: E402
SPEC = text_input(LENGTH)
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """BLOCKKD_DATA in a temporary folder, tiny teacher/student configs, a teacher trained two steps, and a
    recipe function (lm-kd from the teacher, its cache in ``folder/cache``)."""
    folder = tmp_path_factory.mktemp("lmcache")
    old = os.environ.get("BLOCKKD_DATA")
    os.environ["BLOCKKD_DATA"] = str(folder / "data")
    names = {}
    for role, (layers, width) in {"teacher": (2, 32), "student": (1, 16)}.items():
        tiny_llama(layers, width).config.to_json_file(str(folder / f"{role}.json"))
        names[role] = f"hf-config.{folder / f'{role}.json'}"
    out = {"dir": str(folder), "progress": False, "tensorboard": False, "plot": False}
    train({"model": {"name": names["teacher"]}, "method": {"name": "lm-ce"}, "data": LM_DATA,
           "train": {"epochs": 1, "max_steps": 2, "device": "cpu"}, "optim": {"name": "adamw", "lr": 1e-3},
           "output": {**out, "name": "teacher"}})

    def recipe(name: str, **changes) -> dict:
        cfg = {"model": {"name": names["student"]}, "method": {"name": "lm-kd"},
               "teacher": {"name": names["teacher"], "checkpoint": str(folder / "teacher"),
                           "cache": str(folder / "cache")},
               "data": dict(LM_DATA), "optim": {"name": "adamw", "lr": 1e-3}, "schedule": {"name": "constant"},
               "train": {"epochs": 1, "max_steps": 3, "device": "cpu", "seed": 1}, "output": {**out, "name": name}}
        for key, value in changes.items():
            section, leaf = key.split("__")
            cfg[section][leaf] = value
        return copy.deepcopy(cfg)

    (folder / "r.yaml").write_text(yaml.safe_dump(recipe("r")))
    yield folder, names, recipe
    if old is None:
        os.environ.pop("BLOCKKD_DATA", None)
    else:
        os.environ["BLOCKKD_DATA"] = old


@pytest.fixture(scope="module")
def cache(setup):
    """The cache built by a process killed writing its second shard, then completed in this process."""
    folder, _, _ = setup
    env = {**os.environ, "PYTHONPATH": SRC, "BLOCKKD_FAULT": "cache_shard:shard=1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-m", "blockkd", "cache-logits", "r.yaml", "--top-k", "8",
                             "--shard-size", "8"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    shards = sorted(p.name for p in (folder / "cache").iterdir())
    first = (folder / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    return folder, killed, shards, first


def test_killed_cache_resumes_keeping_finished_shards(setup, cache, capsys):
    folder, recipe = setup[0], setup[2]
    _, killed, shards, first = cache
    assert killed.returncode == -9, killed.stderr  # SIGKILL at the fault point
    assert shards == [".shard-00001.safetensors.tmp", "cache.json", "shard-00000.safetensors"]
    with pytest.raises(BlockKDError, match=r"^teacher.cache=.* is unfinished or damaged \(shard 1 of 3 missing"):
        train(recipe("unfinished"))
    assert main(["cache-logits", str(folder / "r.yaml"), "--top-k", "8", "--shard-size", "8"]) == 0
    assert "1 shard(s) already in" in capsys.readouterr().out
    assert (folder / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not rewritten
    # other settings on the same folder are refused in one line
    assert main(["cache-logits", str(folder / "r.yaml"), "--top-k", "4", "--shard-size", "8"]) == 2
    assert "holds a logit cache built differently (k)" in capsys.readouterr().err


def test_cache_holds_the_teachers_top_k_and_a_full_cache_gives_the_live_losses(setup, cache, tmp_path):
    folder, names, recipe = setup
    bundle = data.build(LM_DATA, device="cpu")
    c = open_cache(folder / "cache", tokenizer=bundle.tokenizer, seqs=bundle.train.data)
    teacher = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        names["teacher"][len("hf-config."):]))
    from blockkd.engine.build import load_model_weights

    load_model_weights(teacher, folder / "teacher", role="teacher", name=names["teacher"], data=bundle)
    seqs = bundle.train.data
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=seqs.input_ids[17:19]).logits, -1).topk(8, -1)
    lp, ids = c.topk(torch.tensor([17, 18]), torch.device("cpu"))  # across shards 2 and 3
    assert lp.shape == (2, LENGTH, 8)
    torch.testing.assert_close(lp, ref.values, atol=1e-5, rtol=1e-5)
    near = (lp.unsqueeze(-1) - lp.unsqueeze(-2)).abs().lt(1e-5).sum(-1) > 1  # near-ties: topk orders them freely
    assert ((ids == ref.indices) | near | (lp - lp[..., -1:]).abs().lt(1e-5)).all()

    # k = the whole vocabulary: the renormalised top-k is the teacher's distribution, every loss as live
    assert main(["cache-logits", str(folder / "r.yaml"), "--top-k", str(VOCAB), "--out", str(tmp_path)]) == 0
    full = open_cache(tmp_path, tokenizer=bundle.tokenizer, seqs=seqs)
    student = tiny_llama(1, 16)
    x, y, index = bundle.train.data.input_ids[:4], bundle.train.data.labels[:4], torch.arange(4)
    x = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    for loss in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        live = methods.create("lm-kd", student, teacher, SPEC, loss=loss, temperature=2.0).train()
        cached = LMKD.from_cache(student, full, SPEC, loss=loss, temperature=2.0).train()
        a, b = live(x, y)[1], cached(x, y, index=index)[1]
        torch.testing.assert_close(b["loss_kd"], a["loss_kd"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b["loss_ce"], a["loss_ce"])
    # k = 8: an approximation, not the live value
    with pytest.raises(BlockKDError, match=r"^method.options.on_policy > 0 needs the live teacher"):
        LMKD.from_cache(student, c, SPEC, on_policy=0.5)
    top8 = LMKD.from_cache(student, c, SPEC).train()
    live = methods.create("lm-kd", student, teacher, SPEC).train()
    assert not torch.allclose(top8(x, y, index=index)[1]["loss_kd"], live(x, y)[1]["loss_kd"])


def test_training_from_the_cache_and_refusals(setup, cache):
    folder, _, recipe = setup
    summary = train(recipe("cached"))  # no teacher.checkpoint read: the cache stands for the teacher
    assert summary["steps"] == 3
    rows = [yaml.safe_load(r) for r in (folder / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss_kd"] > 0
    no_ckpt = recipe("no-ckpt")
    no_ckpt["teacher"]["checkpoint"] = None
    assert train(no_ckpt)["steps"] == 3
    with pytest.raises(BlockKDError, match=r"^teacher.cache=.* was built for other training data \(20 sequences"):
        train(recipe("other-data", data__train_subset=12))
    with pytest.raises(BlockKDError, match=r"^teacher.cache=.* was built with another tokenizer"):
        train(recipe("other-tok", data__vocab_size=290))
    with pytest.raises(BlockKDError, match=r"^method lm-blockkd needs the live teacher \(its stepping-stones"):
        train(recipe("bkd", method__name="lm-blockkd"))
    with pytest.raises(BlockKDError, match=r"^teacher.cache=.* holds no logit cache"):
        train(recipe("none", teacher__cache=str(folder / "nowhere")))


def test_the_cached_fortunes_recipe_through_the_cli(setup, tmp_path, capsys):
    """configs/lm_fortunes/forward_kl-cached.yaml: cache-logits, then one training step from the cache."""
    folder, names, _ = setup
    recipe = str(Path(__file__).resolve().parents[1] / "configs/lm_fortunes/forward_kl-cached.yaml")
    over = [f"model.name={names['student']}", f"teacher.name={names['teacher']}",
            f"teacher.checkpoint={folder / 'teacher'}", f"teacher.cache={tmp_path / 'k32'}",
            "data.categories=[pets, paradoxum]", f"data.vocab_size={VOCAB}", f"data.seq_len={LENGTH}",
            "data.batch_size=4", "data.eval_batch_size=16", "data.train_subset=20", "train.max_steps=1",
            "train.device=cpu", f"output.dir={tmp_path}", "output.progress=false", "output.tensorboard=false",
            "output.plot=false"]
    assert main(["cache-logits", recipe, *over, "--top-k", "32"]) == 0
    assert "top-32 of 300 tokens, 20 sequences of 32 in 1 shard(s)" in capsys.readouterr().out
    assert main(["train", recipe, *over]) == 0
    summary = json.loads((tmp_path / "lm-fortunes-forward_kl-cached" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["teacher"] is None  # no teacher model was built


def test_a_damaged_shard_is_refused_then_rewritten(setup, cache, tmp_path, capsys):
    folder, _, recipe = setup
    out = tmp_path / "c"
    args = ["cache-logits", str(folder / "r.yaml"), "--top-k", "4", "--shard-size", "8", "--out", str(out)]
    assert main(args) == 0
    shard = out / "shard-00001.safetensors"
    good, before = shard.read_bytes(), load_file(shard)
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit of one float
    with pytest.raises(BlockKDError, match=r"unfinished or damaged \(shard 1 of 3 missing or failing its checksum"):
        train(recipe("damaged", teacher__cache=str(out)))
    capsys.readouterr()
    assert main(args) == 0
    assert "2 shard(s) already in" in capsys.readouterr().out
    after = load_file(shard)  # the same values again (the header's key order may differ)
    lp = before["logprobs"]
    assert torch.equal(lp, after["logprobs"])
    # ids agree except among tied log-probabilities (topk orders equal values arbitrarily)
    tied = (lp.unsqueeze(-1) == lp.unsqueeze(-2)).sum(-1) > 1
    tied |= lp == lp[..., -1:]  # a tie at the k-th value may be with a token left out
    assert ((before["ids"] == after["ids"]) | tied).all()
