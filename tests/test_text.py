"""Text classification end to end: the fortunes topic task (Debian's fortune files, `make data`) with tiny BERTs
built from configs (hf-config.) and a WordPiece tokenizer trained on the spot; CSV/JSONL files; GLUE through a
stand-in `datasets` module (no network); dynamic padding, length buckets, task metrics, one-line errors."""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import transformers  # the test extra installs it (and tokenizers)

from blockkd import config, data, models  # noqa: E402
from blockkd.data import text  # noqa: E402
from blockkd.data import tokenizer as text_tokenizer  # noqa: E402
from blockkd.engine import metrics  # noqa: E402
from blockkd.engine import evaluate_checkpoint, load_checkpoint, train  # noqa: E402
from blockkd.engine.checkpoint import saved_tokenizer  # noqa: E402
from blockkd.engine.build import build_model  # noqa: E402
from blockkd.errors import BlockKDError  # noqa: E402
from helpers import rows, untimed, with_changes  # noqa: E402

FORTUNES = Path(text.FORTUNES_ROOT)
assert (FORTUNES / "computers").is_file(), "Debian's fortune files are missing: `make data` (apt-get install fortunes)"

CATEGORIES = ["computers", "food", "sports"]
VOCAB, LENGTH = 400, 32
DATA = {"name": "fortunes", "categories": CATEGORIES, "max_per_class": 60, "max_length": LENGTH,
        "vocab_size": VOCAB, "batch_size": 8, "eval_batch_size": 64}
EPOCHS = 12  # the teacher's: ~2 s; tiny BERTs trained from scratch need ~100 steps to leave chance level


pytestmark = pytest.mark.usefixtures("fresh_data_home")  # tokenizers trained here are cached in a fresh folder


@pytest.fixture(scope="module")
def bert_configs(tmp_path_factory) -> dict[str, str]:
    """hf-config model names: a 4-layer teacher of width 32 and a 2-layer student of width 16."""
    folder = tmp_path_factory.mktemp("models")
    names = {}
    for role, (layers, hidden) in {"teacher": (4, 32), "student": (2, 16), "small_vocab": (2, 16)}.items():
        cfg = transformers.BertConfig(vocab_size=VOCAB if role != "small_vocab" else 100, hidden_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
                                      max_position_embeddings=LENGTH)
        path = folder / f"{role}.json"
        cfg.to_json_file(str(path))
        names[role] = f"hf-config.{path}"
    return names


def recipe(out: Path, name: str, model: str, **dotted) -> config.Config:
    cfg: dict = {
        "model": {"name": model},
        "data": dict(DATA),
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "linear", "warmup_epochs": 1},
        "train": {"epochs": EPOCHS, "device": "cpu", "deterministic": True, "amp": "off"},
        "output": {"dir": str(out), "name": name, "progress": False, "tensorboard": False, "plot": False},
    }
    return config.validate(with_changes(cfg, **dotted))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, bert_configs) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("teacher")
    summary = train(recipe(out, "t", bert_configs["teacher"]))
    return out / "t", summary


# ------------------------------------------------------------------------------------------- end to end
def test_teacher_run_and_its_hf_folder(teacher_run, bert_configs):
    run, summary = teacher_run
    history = rows(run)
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1)) and summary["data"] == "fortunes"
    # (whether a tiny BERT trained from scratch leaves chance level within 12 epochs depends on the CPU's
    # numerics: the suite asserts only what holds on any machine)
    assert summary["best"]["test_top1"] == max(r["test_top1"] for r in history)
    assert summary["best"]["epoch"] == next(r["epoch"] for r in history
                                            if r["test_top1"] == summary["best"]["test_top1"])
    # hf/: what transformers loads, equal to our checkpoint's model, with the tokenizer the data used
    hf = run / "hf"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    assert model.config.num_labels == len(CATEGORIES) and not (run / "hf.tmp").exists()
    ours = models.create(bert_configs["teacher"], num_classes=len(CATEGORIES), in_channels=None).eval()
    ours.load_state_dict(load_checkpoint(run / "last", with_state=False).student_weights())
    x = tok(["A computer is a fast idiot.", "Eat your vegetables"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, ours(**x).logits, atol=1e-5)
    # the saved tokenizer (its folder, or its tokenizer.json) gives the ids of the one trained here
    b = data.build({**DATA, "tokenizer": "wordpiece"}, device="cpu")
    xb, _ = next(iter(b.test))
    for spec in (hf, hf / "tokenizer.json"):
        xa, _ = next(iter(data.build({**DATA, "tokenizer": str(spec)}, device="cpu").test))
        assert set(xa) == set(xb) and all(torch.equal(xa[k], xb[k]) for k in xb)


@pytest.mark.parametrize("method", ["kd", "blockkd"])
def test_students_distil_from_the_teacher_run(teacher_run, bert_configs, tmp_path, method):
    run, teacher = teacher_run
    cfg = recipe(tmp_path, method, bert_configs["student"], teacher__name=bert_configs["teacher"],
                 teacher__checkpoint=str(run), method__name=method, train__epochs=1)
    summary = train(cfg)
    assert summary["teacher_test_top1"] == pytest.approx(teacher["best"]["test_top1"])  # a run folder: its best/
    last = rows(tmp_path / method)[-1]
    assert last["test_top1"] is not None and np.isfinite(last["train_loss"])
    if method == "blockkd":  # two stepping-stones (4 teacher layers grouped 2+2 against the student's 2)
        assert {"test_top1_stone1", "test_top1_stone2", "test_top1_ensemble"} <= set(last)
    # blockkd eval of the student's run folder gives the run's last test accuracy
    result = evaluate_checkpoint(tmp_path / method, device="cpu")
    assert result["top1"] == pytest.approx(last["test_top1"]) and result["data"] == "fortunes"
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / method / "hf"))
    assert loaded.config.num_hidden_layers == 2


def test_blockkd_on_text_trains_under_bf16_autocast(teacher_run, bert_configs, tmp_path):
    """Mixed precision on the text path (CPU autocast here; CUDA's is the same call): finite losses, and the
    run says which precision it used."""
    run, _ = teacher_run
    cfg = recipe(tmp_path, "bf16", bert_configs["student"], teacher__name=bert_configs["teacher"],
                 teacher__checkpoint=str(run), method__name="blockkd", train__amp="bf16", train__max_steps=4)
    summary = train(cfg)
    assert "amp bf16" in summary["runtime"] and summary["steps"] == 4
    assert all(np.isfinite(v) for k, v in rows(tmp_path / "bf16")[-1].items() if k.startswith("train_loss"))


def test_teacher_by_hf_name_needs_no_checkpoint(teacher_run, bert_configs, tmp_path):
    """hf.<folder>: from_pretrained of the teacher run's hf/ folder (its last epoch), no teacher.checkpoint."""
    run, teacher = teacher_run
    cfg = recipe(tmp_path, "kd", bert_configs["student"], teacher__name=f"hf.{run / 'hf'}", method__name="kd",
                 train__max_steps=2)
    assert train(cfg)["teacher_test_top1"] == pytest.approx(teacher["last"]["test_top1"])
    with pytest.raises(BlockKDError, match=r"cannot load the Hugging Face model .*no/such/folder") as e:
        models.create("hf.no/such/folder", num_classes=2, in_channels=None)
    one_line(e)


def elsewhere(monkeypatch, tmp_path) -> None:
    """Another machine: an empty tokenizer cache, and a tokenizer trained there would not be the one trained
    here (two trainings on the same texts need not give the same ids), so training one fails the test."""
    monkeypatch.setenv("BLOCKKD_DATA", str(tmp_path / "elsewhere"))

    def trained_again(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again instead of read from the checkpoint")

    monkeypatch.setattr(text_tokenizer, "_train_tokenizer", trained_again)


def test_resume_is_exact(teacher_run, bert_configs, tmp_path, monkeypatch):
    """The teacher's run, stopped after half its epochs (the lr schedule still that of the whole run) and
    resumed on another machine, gives the same metrics and weights: data order, dropout RNG, optimizer and
    schedule restored, and the tokenizer the run trained read back from its checkpoint."""
    run, _ = teacher_run
    steps = rows(run)[0]["step"]
    train(recipe(tmp_path, "r", bert_configs["teacher"], train__max_steps=steps * EPOCHS // 2))
    assert len(rows(tmp_path / "r")) == EPOCHS // 2
    elsewhere(monkeypatch, tmp_path)
    train(recipe(tmp_path, "r", bert_configs["teacher"]), resume=True)
    assert untimed(rows(tmp_path / "r")) == untimed(rows(run))
    assert (tmp_path / "r" / "last" / "weights.safetensors").read_bytes() == \
           (run / "last" / "weights.safetensors").read_bytes()


def test_the_trained_tokenizer_travels_with_the_checkpoint(teacher_run, bert_configs, tmp_path, monkeypatch):
    """Each checkpoint holds the tokenizer its run trained (checksummed in meta.json); elsewhere, evaluating
    the run and distilling from it read that one, never a new training: the teacher's accuracy is its own."""
    run, teacher = teacher_run
    here = data.build({**DATA, "tokenizer": "wordpiece"}, device="cpu").tokenizer
    for name in ("last", "best"):
        saved = run / name / "tokenizer.json"
        assert saved.read_text() == here.backend_tokenizer.to_str()
        assert json.loads((run / name / "meta.json").read_text())["sha256"]["tokenizer.json"]
    assert saved_tokenizer(run) == run / "last" / "tokenizer.json" and saved_tokenizer(run / "best") == saved
    elsewhere(monkeypatch, tmp_path)
    assert evaluate_checkpoint(run, device="cpu")["top1"] == pytest.approx(teacher["best"]["test_top1"])
    cfg = recipe(tmp_path, "kd", bert_configs["student"], teacher__name=bert_configs["teacher"],
                 teacher__checkpoint=str(run), method__name="kd", train__max_steps=1)
    assert train(cfg)["teacher_test_top1"] == pytest.approx(teacher["best"]["test_top1"])
    assert (tmp_path / "kd" / "last" / "tokenizer.json").read_text() == here.backend_tokenizer.to_str()
    # a damaged copy is named, not silently replaced by a new training
    copy = tmp_path / "copy"
    shutil.copytree(run / "best", copy)
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BlockKDError, match=r"no readable tokenizer.json in .*copy: .*sha256 mismatch") as e:
        saved_tokenizer(copy)
    one_line(e)


# ------------------------------------------------------------------------------------------- batches
def test_dynamic_padding_and_bucketing():
    bundle = data.build({**DATA, "tokenizer": "wordpiece", "drop_last": False}, device="cpu", seed=3)
    assert bundle.in_channels is None and set(bundle.input_shape) == {"input_ids", "attention_mask", "token_type_ids"}
    loader = bundle.train

    def epoch(e: int, ld=loader):
        ld.set_epoch(e)
        ld.with_index = True
        return [(x, y, i) for x, y, i in ld]

    batches = epoch(0)
    assert len(batches) == len(loader)
    seen = torch.cat([i for _, _, i in batches]).sort().values
    assert torch.equal(seen, torch.arange(bundle.train_size))  # every sample once
    for x, y, i in batches:
        mask = x["attention_mask"]
        assert mask[:, -1].any() and mask[:, 0].all()  # padded exactly to the batch's longest text
        assert torch.equal(mask, (torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True)).long())  # right padding
        assert x["input_ids"].shape == mask.shape == x["token_type_ids"].shape
        assert bool((x["input_ids"][mask == 0] == bundle.tokenizer.pad_token_id).all())
        assert torch.equal(y, loader.data.labels[i])
    again = epoch(0)  # deterministic from (seed, epoch): resume replays an epoch exactly
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[0]["input_ids"], b[0]["input_ids"])
               for a, b in zip(batches, again))
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(batches, epoch(1)))

    def padding(ld) -> int:
        return sum(int((x["attention_mask"] == 0).sum()) for x, *_ in epoch(0, ld))

    plain = data.build({**DATA, "tokenizer": "wordpiece", "drop_last": False, "bucket": 0}, device="cpu", seed=3)
    assert padding(loader) < 0.5 * padding(plain.train)  # buckets of similar lengths pad far less
    # DDP: two ranks get disjoint halves of the same global batches
    ranks = [data.build({**DATA, "tokenizer": "wordpiece"}, device="cpu", seed=3, rank=r, world_size=2) for r in (0, 1)]
    plans = [b.train.plan() for b in ranks]
    assert len(plans[0]) == len(plans[1]) and all(len(a) == len(b) == 4 for a, b in zip(*plans))
    assert not set(np.concatenate(plans[0])) & set(np.concatenate(plans[1]))
    test = [np.concatenate(b.test.plan()) for b in ranks]
    assert sorted(np.concatenate(test).tolist()) == list(range(bundle.test_size))


def test_csv_and_jsonl_files(tmp_path):
    texts = text.read_fortunes(FORTUNES / "food")[:30] + text.read_fortunes(FORTUNES / "sports")[:30]
    labels = ["food"] * 30 + ["sports"] * 30
    import csv

    with (tmp_path / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(zip(labels[::2], texts[::2]))
    with (tmp_path / "test.jsonl").open("w") as f:
        for t, y in zip(texts[1::2], labels[1::2]):
            f.write(json.dumps({"text": t, "label": y}) + "\n")
    cfg = {"name": "textfile", "train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.jsonl"),
           "tokenizer": "wordpiece", "vocab_size": 300, "batch_size": 8}
    bundle = data.build(cfg, device="cpu")
    assert bundle.classes == ["food", "sports"] and (bundle.train_size, bundle.test_size) == (30, 30)
    x, y = next(iter(bundle.test))
    assert set(x) == {"input_ids", "attention_mask", "token_type_ids"} and y.dtype == torch.long
    # pairs: a second text column, integer labels
    with (tmp_path / "pairs.jsonl").open("w") as f:
        for k in range(20):
            f.write(json.dumps({"a": texts[k], "b": texts[-k - 1], "y": k % 2}) + "\n")
    pairs = data.build({"name": "textfile", "train": str(tmp_path / "pairs.jsonl"),
                        "test": str(tmp_path / "pairs.jsonl"),
                        "text_column": "a", "text_pair_column": "b", "label_column": "y", "tokenizer": "wordpiece",
                        "vocab_size": 300, "batch_size": 4}, device="cpu")
    x, _ = next(iter(pairs.train))
    assert pairs.classes == ["0", "1"] and bool((x["token_type_ids"] == 1).any())
    held_out = data.build({**cfg, "test": None, "val_split": 10}, device="cpu")
    assert (held_out.train_size, held_out.test_size) == (20, 10)
    with pytest.raises(BlockKDError,
                       match=r"data.text_column='txt' is not a column of .*train.csv .*did you mean 'text'"):
        data.build({**cfg, "text_column": "txt"}, device="cpu")
    with pytest.raises(BlockKDError, match="data.test is not set"):
        data.build({**cfg, "test": None}, device="cpu")


def test_textfile_run_records_its_labels_and_its_hf_folder_deploys(tmp_path, bert_configs):
    """String labels are stored (meta.json, summary.json, hf/'s id2label), and hf/ works with a plain
    transformers pipeline: a text longer than the training length is cut to it (model_max_length), not a crash."""
    texts = text.read_fortunes(FORTUNES / "food")[:16] + text.read_fortunes(FORTUNES / "sports")[:16]
    with (tmp_path / "train.jsonl").open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "label": "food" if i < 16 else "sports"}) + "\n")
    cfg = recipe(tmp_path, "labels", bert_configs["student"], train__max_steps=2,
                 data={"name": "textfile", "train": str(tmp_path / "train.jsonl"), "val_split": 8,
                       "tokenizer": "wordpiece", "vocab_size": VOCAB, "max_length": LENGTH, "batch_size": 8})
    summary = train(cfg)
    run = tmp_path / "labels"
    assert summary["classes"] == ["food", "sports"]
    assert json.loads((run / "summary.json").read_text())["classes"] == ["food", "sports"]
    assert load_checkpoint(run / "last", with_state=False).meta["classes"] == ["food", "sports"]
    hf_config = json.loads((run / "hf" / "config.json").read_text())
    assert hf_config["id2label"] == {"0": "food", "1": "sports"} and hf_config["label2id"] == {"food": 0, "sports": 1}
    classify = transformers.pipeline("text-classification", model=str(run / "hf"), device="cpu")
    assert classify.tokenizer.model_max_length == LENGTH
    long = "cheese wine and bread " * 40  # ~160 tokens; the model has LENGTH=32 positions
    assert len(classify.tokenizer(long)["input_ids"]) > LENGTH
    (result,) = classify(long, truncation=True)
    assert result["label"] in ("food", "sports") and 0 < result["score"] <= 1
    # the pipeline's answer is the model's on the first LENGTH tokens
    x = classify.tokenizer(long, truncation=True, return_tensors="pt")
    with torch.no_grad():
        logits = classify.model(**x).logits[0]
    assert x["input_ids"].shape[1] == LENGTH and result["label"] == ["food", "sports"][int(logits.argmax())]


def test_paths_resolve_against_their_recipe_and_runs_work_from_anywhere(tmp_path, bert_configs, monkeypatch):
    """A recipe's relative paths (hf-config., data files, teacher.checkpoint) are read from the recipe's folder,
    stored absolute, so `blockkd eval` works from any directory; one file named relatively or absolutely is one
    teacher."""
    import contextlib
    import shutil

    import yaml

    from blockkd.cli import main

    rec = tmp_path / "project" / "recipes"
    (rec / "models").mkdir(parents=True)
    for role in ("student", "teacher"):
        shutil.copy(bert_configs[role].removeprefix("hf-config."), rec / "models" / f"{role}.json")
    texts = text.read_fortunes(FORTUNES / "food")[:12] + text.read_fortunes(FORTUNES / "sports")[:12]
    with (rec / "train.jsonl").open("w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"text": t, "label": "food" if i < 12 else "sports"}) + "\n")
    common = {"data": {"name": "textfile", "train": "train.jsonl", "val_split": 8, "tokenizer": "wordpiece",
                       "vocab_size": VOCAB, "max_length": LENGTH, "batch_size": 8},
              "optim": {"name": "adamw", "lr": 3e-3}, "train": {"max_steps": 2, "device": "cpu", "epochs": 1},
              "output": {"dir": str(tmp_path / "runs"), "progress": False, "tensorboard": False, "plot": False}}
    (rec / "teacher.yaml").write_text(yaml.safe_dump({**common, "model": {"name": "hf-config.models/teacher.json"},
                                                      "output": {**common["output"], "name": "t"}}))
    (rec / "kd.yaml").write_text(yaml.safe_dump({
        **common, "model": {"name": "hf-config.models/student.json"}, "method": {"name": "kd"},
        "teacher": {"name": "hf-config.models/teacher.json", "checkpoint": str(tmp_path / "runs" / "t")},
        "output": {**common["output"], "name": "kd"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with contextlib.chdir(elsewhere):  # neither models/ nor train.jsonl is here: only beside the recipes
        cfg = config.load(rec / "teacher.yaml")
        assert cfg.model.name == f"hf-config.{rec / 'models' / 'teacher.json'}"
        assert cfg.data.flat()["train"] == str(rec / "train.jsonl")
        assert main(["train", str(rec / "teacher.yaml")]) == 0
        # the same teacher file named by its absolute path on the command line: the run's teacher, not another
        assert main(["train", str(rec / "kd.yaml"), f"teacher.name=hf-config.{rec / 'models' / 'teacher.json'}"]) == 0
        stored = yaml.safe_load((tmp_path / "runs" / "kd" / "config.yaml").read_text())
        assert stored["model"]["name"] == f"hf-config.{rec / 'models' / 'student.json'}"
        assert stored["data"]["train"] == str(rec / "train.jsonl")
    with contextlib.chdir(tmp_path / "project"):  # a command-line path is relative to the working directory
        over = config.load(rec / "kd.yaml", ["model.name=hf-config.recipes/models/teacher.json", "data.test=nowhere"])
        assert over.model.name == f"hf-config.{rec / 'models' / 'teacher.json'}"
        assert over.data.flat()["test"] == "nowhere"  # exists nowhere: kept as typed (the error will name it)
    monkeypatch.chdir(tmp_path)
    assert evaluate_checkpoint(tmp_path / "runs" / "kd", device="cpu")["data"] == "textfile"
    with pytest.raises(BlockKDError, match=r"invalid output\.name=\.\./escape .*expected a folder name inside "
                                           r"output\.dir \(not absolute, no '\.\.'\)"):
        config.load(rec / "kd.yaml", ["output.name=../escape"])


# ------------------------------------------------------------------------------------------- GLUE, metrics
def fake_datasets(monkeypatch, task_columns: tuple[str, str | None], n: int = 48, fail: Exception | None = None):
    """A stand-in ``datasets`` module: real fortune texts, labels 0/1 (no network)."""
    pool = text.read_fortunes(FORTUNES / "science")[: 2 * n]
    a, b = task_columns

    class Part:
        features = {"label": types.SimpleNamespace(names=["no", "yes"])}

        def __init__(self, k: int):
            self.cols = {a: pool[:k], "label": [i % 2 for i in range(k)]}
            if b:
                self.cols[b] = pool[k:2 * k]

        def __getitem__(self, col):
            return self.cols[col]

    def load_dataset(path, task):
        if fail is not None:
            raise fail
        return {"train": Part(n), "validation": Part(n // 2), "validation_matched": Part(n // 2)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_glue_task_metrics_in_the_metrics_rows(monkeypatch, tmp_path, bert_configs, capsys):
    fake_datasets(monkeypatch, ("sentence1", "sentence2"))
    cfg = recipe(tmp_path, "mrpc", bert_configs["student"], train__epochs=1,
                 data={"name": "glue", "task": "mrpc", "tokenizer": "wordpiece", "vocab_size": VOCAB,
                       "max_length": LENGTH, "batch_size": 16})
    summary = train(cfg)
    row = rows(tmp_path / "mrpc")[-1]
    assert 0 <= row["test_f1"] <= 100 and summary["last"]["test_f1"] == row["test_f1"]
    assert summary["data"] == "glue-mrpc"
    assert evaluate_checkpoint(tmp_path / "mrpc", device="cpu")["f1"] == pytest.approx(row["test_f1"])
    from blockkd.cli import main

    assert main(["eval", str(tmp_path / "mrpc"), "--device", "cpu"]) == 0
    assert f"f1 {row['test_f1']:.2f}" in capsys.readouterr().out
    fake_datasets(monkeypatch, ("sentence", None))
    cola = data.build({"name": "glue", "task": "cola", "tokenizer": "wordpiece", "vocab_size": VOCAB,
                       "batch_size": 16}, device="cpu")
    assert cola.metric_names == ("matthews",) and cola.num_classes == 2 and cola.classes == ["no", "yes"]


def test_metric_functions():
    y = torch.tensor([1, 1, 1, 0, 0, 0, 1, 0])
    p = torch.tensor([1, 1, 0, 0, 0, 1, 1, 0])
    assert metrics.f1_score(p, y) == pytest.approx(100 * 2 * 3 / (2 * 3 + 1 + 1))
    # tp=3 tn=3 fp=1 fn=1: (9 - 1) / sqrt(4 * 4 * 4 * 4)
    assert metrics.matthews(p, y) == pytest.approx(100 * 8 / 16)
    assert metrics.matthews(torch.zeros(4, dtype=torch.long), y[:4]) == 0.0  # constant predictions: undefined -> 0
    assert metrics.matthews(y, y) == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------- one-line errors
def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_one_line_errors(monkeypatch, bert_configs):
    glue = {"name": "glue", "tokenizer": "wordpiece"}
    with pytest.raises(BlockKDError, match="did you mean 'sst2'") as e:
        data.parse({**glue, "task": "sst"})
    one_line(e)
    with pytest.raises(BlockKDError, match="stsb is a regression task") as e:
        data.parse({**glue, "task": "stsb"})
    one_line(e)
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(BlockKDError, match=r"pip install 'blockkd\[nlp\]'") as e:
        data.build({**glue, "task": "rte"}, device="cpu")
    one_line(e)
    fake_datasets(monkeypatch, ("sentence1", "sentence2"), fail=ConnectionError("no network\nmore"))
    with pytest.raises(BlockKDError, match="cannot load GLUE rte .*hf download") as e:
        data.build({**glue, "task": "rte"}, device="cpu")
    one_line(e)
    with pytest.raises(BlockKDError, match="did you mean 'sports'") as e:
        data.build({**DATA, "categories": ["sport"]}, device="cpu")
    one_line(e)
    # a tokenizer folder not made yet (configs/fortunes before its pretraining) is named, not only a hub id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BlockKDError, match=r"no folder \S*runs/no-such-mlm exists") as e:
        data.build({**DATA, "tokenizer": "runs/no-such-mlm"}, device="cpu")
    one_line(e)
    # a tokenizer larger than the model's embeddings; an image model on text; text model on images
    bundle = data.build(DATA, device="cpu")
    with pytest.raises(BlockKDError, match=r"has \d+ tokens, more than the 100 token embeddings of model.name") as e:
        build_model(bert_configs["small_vocab"], bundle)
    one_line(e)
    with pytest.raises(BlockKDError, match="takes images, but the data is text"):
        build_model("resnet8", bundle)
    with pytest.raises(BlockKDError, match="cannot build|not a Hugging Face config"):
        models.create("hf-config.no/such/config.json", num_classes=2)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(BlockKDError, match=r"pip install 'blockkd\[nlp\]'") as e:
        models.create(bert_configs["student"], num_classes=3, in_channels=None)
    one_line(e)
    with pytest.raises(BlockKDError, match=r"pip install 'blockkd\[nlp\]'"):
        config.validate({"model": {"name": "hf.bert-base-uncased"}, "data": DATA})
    with pytest.raises(BlockKDError, match=r"pip install 'blockkd\[nlp\]'"):
        data.build(DATA, device="cpu")
