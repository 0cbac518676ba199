"""Text classification data: your own CSV/JSONL files (``textfile``), GLUE (``glue``) and an offline topic task
built from Debian's fortune files (``fortunes``).

Why it looks like this: every text is tokenised once, when the data is built, and kept as one flat array of
token ids (plus offsets), so a batch is a cheap gather, padded only to its own longest sample (*dynamic
padding*). Training batches are *length-bucketed*: the epoch's shuffled order, drawn from (seed, epoch), is cut
into runs of ``bucket`` global batches, each run is sorted by length and cut into batches, and the batches are
shuffled (from the same seed and epoch). Batches then hold texts of similar lengths (little padding, so much
less compute for short texts), the epoch still visits every sample once, and any epoch replays exactly on
resume. Evaluation reads each rank's contiguous shard sorted by length.

A batch is ``({"input_ids", "attention_mask"[, "token_type_ids"]}, labels)`` on the device: the model input
the Hugging Face classifiers (``hf.`` / ``hf-config.`` models) and their block views take.

The tokenizer (``data.tokenizer``): a tokenizer folder or hub id (``AutoTokenizer.from_pretrained``, e.g. the
model's own: ``bert-base-uncased``), a ``tokenizer.json`` file, or ``wordpiece`` / ``bpe``: a BERT-style
tokenizer of ``vocab_size`` tokens trained here on the training text (cached under ``$BLOCKKD_DATA/tokenizers``),
for models trained from scratch. A tokenizer with more tokens than the model's embeddings is refused when
the model is built.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import BlockKDError
from ..registry import closest
from ..schema import OptionError, REQUIRED, STRING, Check, integer, number, option, optional
from ..utils import data_home
from .common import (SHUFFLE, DataBundle, check_not_empty, eval_shard, generator, per_rank_batch,
                     per_rank_eval_batch, split_indices)

NLP_INSTALL = "pip install 'blockkd[nlp]'"
TRAINED = ("wordpiece", "bpe")  # tokenizers trained here on the training text
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# GLUE: task -> (text column, pair column, classes, extra metrics, test split). Test labels are hidden, so the
# validation split is the test split (MNLI: the matched one), as in every KD paper's GLUE dev results.
GLUE = {
    "cola": ("sentence", None, 2, ("matthews",), "validation"),
    "sst2": ("sentence", None, 2, (), "validation"),
    "mrpc": ("sentence1", "sentence2", 2, ("f1",), "validation"),
    "qqp": ("question1", "question2", 2, ("f1",), "validation"),
    "mnli": ("premise", "hypothesis", 3, (), "validation_matched"),
    "qnli": ("question", "sentence", 2, (), "validation"),
    "rte": ("sentence1", "sentence2", 2, (), "validation"),
    "wnli": ("sentence1", "sentence2", 2, (), "validation"),
}
REGRESSION = {"stsb": "a similarity score from 0 to 5"}

FORTUNES_ROOT = "/usr/share/games/fortunes"
FORTUNE_CATEGORIES = ["computers", "food", "law", "literature", "science", "sports"]


# ----------------------------------------------------------------------------------------- options
def _tokenizer(default: Any) -> Any:
    return option(default, STRING, "tokenizer: a folder or hub id (AutoTokenizer, e.g. the model's own: "
                  "bert-base-uncased), a tokenizer.json, or wordpiece / bpe: trained here on the training text")


def _max_length(default: int) -> Any:
    return option(default, integer(8), "longest tokenised text (longer ones are truncated)")


VOCAB_SIZE = option(8000, integer(100), "tokens of a tokenizer trained here (tokenizer: wordpiece or bpe)")
BUCKET = option(50, integer(0), "length bucketing: sort each run of this many shuffled training batches by "
                "length (0: off)")

GLUE_TASK = Check("a GLUE task: " + ", ".join([*GLUE, *REGRESSION]), lambda v: v in GLUE or v in REGRESSION,
                  choices=(*GLUE, *REGRESSION))
STRINGS = Check("a non-empty list of names", lambda v: isinstance(v, (list, tuple)) and bool(v)
                and all(isinstance(x, str) and x for x in v), list)


@dataclasses.dataclass(frozen=True)
class TextFileOptions:
    train: str = option(REQUIRED, STRING, "training file: .csv, .tsv or .jsonl (one JSON object per line)")
    tokenizer: str = _tokenizer(REQUIRED)
    test: str | None = option(None, optional(STRING), "test file, same format (null: hold out val_split samples)")
    text_column: str = option("text", STRING, "column of the text")
    text_pair_column: str | None = option(None, optional(STRING), "column of the second text of a pair (null: none)")
    label_column: str = option("label", STRING, "column of the label (any strings or integers)")
    max_length: int = _max_length(128)
    vocab_size: int = VOCAB_SIZE
    bucket: int = BUCKET


@dataclasses.dataclass(frozen=True)
class GlueOptions:
    task: str = option(REQUIRED, GLUE_TASK, "the GLUE task (its validation split is the test split; MNLI: matched)")
    tokenizer: str = _tokenizer(REQUIRED)
    root: str = option("nyu-mll/glue", STRING, "where `datasets.load_dataset(root, task)` finds GLUE: the hub "
                       "id, or a local copy (huggingface-cli download nyu-mll/glue --repo-type dataset)")
    max_length: int = _max_length(128)
    vocab_size: int = VOCAB_SIZE
    bucket: int = BUCKET

    def check(self) -> None:
        if self.task in REGRESSION:
            raise OptionError("task", f"{self.task} is a regression task ({REGRESSION[self.task]}); the distillers "
                                      f"here distil classifiers' logits, so it is not supported")


@dataclasses.dataclass(frozen=True)
class FortunesOptions:
    root: str = option(FORTUNES_ROOT, STRING, "folder of the fortune files (Debian: apt-get install fortunes)")
    categories: list = option(list(FORTUNE_CATEGORIES), STRINGS, "the classes: fortune files of root")
    max_per_class: int = option(200, integer(2), "at most this many fortunes of each category")
    test_fraction: float = option(0.2, number(0, strict=True, hi=0.9), "share of each category held out as test")
    tokenizer: str = _tokenizer("wordpiece")
    max_length: int = _max_length(64)
    vocab_size: int = option(4000, integer(100), "tokens of a tokenizer trained here (tokenizer: wordpiece or bpe)")
    bucket: int = BUCKET


# ----------------------------------------------------------------------------------------- raw text
@dataclasses.dataclass
class Split:
    """Texts (and second texts of pairs), and labels as class indices."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray

    def take(self, idx: torch.Tensor | None) -> "Split":
        if idx is None:
            return self
        i = idx.tolist()
        return Split([self.texts[k] for k in i], None if self.pairs is None else [self.pairs[k] for k in i],
                     self.labels[i])


@dataclasses.dataclass
class RawText:
    train: Split
    test: Split | None  # None: held out from train by val_split
    classes: list[str]
    metric_names: tuple[str, ...] = ()
    name: str | None = None  # shown in logs and summaries (glue: glue-<task>); None: data.name


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a CSV/TSV/JSONL file and its column names."""
    if not path.is_file():
        raise BlockKDError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
        if suffix in (".jsonl", ".json"):
            rows, columns = [], {}
            with path.open(encoding="utf-8") as f:
                for number_, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BlockKDError(f"{path}, line {number_}: not a JSON object ({e.msg}); JSONL files hold "
                                           f"one object per line") from None
                    if not isinstance(row, dict):
                        raise BlockKDError(f"{path}, line {number_}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
                    columns.update(dict.fromkeys(row))
            return rows, list(columns)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BlockKDError(f"cannot read {path}: {e}") from None
    raise BlockKDError(f"text file {path} must end in .csv, .tsv or .jsonl")


def _column(rows: list[dict], columns: list[str], key: str, name: str, path: Path) -> list:
    if name not in columns:
        hint = closest(name, columns)
        tip = f"; did you mean {hint!r}?" if hint else ""
        raise BlockKDError(f"data.{key}={name!r} is not a column of {path} (its columns: {', '.join(columns)}){tip}")
    values = [row.get(name) for row in rows]
    missing = next((i for i, v in enumerate(values) if v is None), None)
    if missing is not None:
        raise BlockKDError(f"{path}: record {missing + 1} has no {name!r} ({key})")
    return values


def _label_classes(labels: list) -> list[str]:
    """Class names in index order: integer labels sorted numerically (0..K-1 stay themselves), else sorted."""
    names = sorted({str(v) for v in labels})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    return names


def _to_indices(labels: list, classes: list[str], path: Path, key: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = next((str(v) for v in labels if str(v) not in index), None)
    if unknown is not None:
        raise BlockKDError(f"{path}: label {unknown!r} ({key}) does not occur in the training file "
                           f"(its labels: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    return np.array([index[str(v)] for v in labels], dtype=np.int64)


def load_textfile(cfg: dict) -> RawText:
    def read(path: Path) -> tuple[list[str], list[str] | None, list]:
        rows, columns = _read_rows(path)
        if not rows:
            raise BlockKDError(f"text file {path} holds no records")
        texts = [str(v) for v in _column(rows, columns, "text_column", cfg["text_column"], path)]
        pairs = None
        if cfg["text_pair_column"]:
            pairs = [str(v) for v in _column(rows, columns, "text_pair_column", cfg["text_pair_column"], path)]
        return texts, pairs, _column(rows, columns, "label_column", cfg["label_column"], path)

    train_path = Path(cfg["train"]).expanduser()
    texts, pairs, labels = read(train_path)
    classes = _label_classes(labels)
    train = Split(texts, pairs, _to_indices(labels, classes, train_path, "label_column"))
    test = None
    if cfg["test"]:
        test_path = Path(cfg["test"]).expanduser()
        t_texts, t_pairs, t_labels = read(test_path)
        test = Split(t_texts, t_pairs, _to_indices(t_labels, classes, test_path, "label_column"))
    elif not cfg["val_split"]:
        raise BlockKDError("data.test is not set: name a test file, or hold out training samples with data.val_split=N")
    return RawText(train, test, classes)


def load_glue(cfg: dict) -> RawText:
    task = cfg["task"]
    text_col, pair_col, num_classes, metric_names, test_split = GLUE[task]
    try:
        import datasets
    except ImportError:
        raise BlockKDError(f"GLUE needs the datasets package: {NLP_INSTALL} (or pip install datasets)") from None
    try:
        ds = datasets.load_dataset(cfg["root"], task)
    except Exception as e:  # no connection, no cache, a bad local copy: one line, with what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BlockKDError(f"cannot load GLUE {task} from {cfg['root']!r} ({type(e).__name__}: {first}); offline, "
                           f"run `huggingface-cli download nyu-mll/glue --repo-type dataset --local-dir data/glue` "
                           f"on a connected machine and set data.root=data/glue") from None

    def split(name: str) -> Split:
        part = ds[name]
        labels = np.asarray(list(part["label"]), dtype=np.int64)  # datasets 4: a Column, not a list
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise BlockKDError(f"GLUE {task} {name}: labels outside 0..{num_classes - 1} (hidden test labels?)")
        return Split([str(t) for t in part[text_col]],
                     None if pair_col is None else [str(t) for t in part[pair_col]], labels)

    names = getattr(ds["train"].features.get("label"), "names", None) or [str(i) for i in range(num_classes)]
    return RawText(split("train"), split(test_split), list(names), metric_names, f"glue-{task}")


def read_fortunes(path: Path) -> list[str]:
    """The entries of one fortune file (separated by lines holding ``%``), overstriking removed."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)  # "x\bx" bold / "_\bx" underline of old terminals
    return [e.strip() for e in re.split(r"^%\s*$", text, flags=re.M) if e.strip()]


def load_fortunes(cfg: dict) -> RawText:
    """Each category file is a class. Entries are ordered by the hash of their text (independent of the file's
    order and of the seed), entries found in several categories dropped, the first ``max_per_class`` kept, and
    the first ``test_fraction`` of those are the test split: the same split on every machine."""
    root = Path(cfg["root"]).expanduser()
    categories = list(cfg["categories"])
    if len(set(categories)) != len(categories):
        raise BlockKDError(f"data.categories lists a category twice: {categories}")
    available = sorted(p.name for p in root.glob("*") if p.is_file() and "." not in p.name) if root.is_dir() else []
    entries = {}
    for name in categories:
        if name not in available:
            if not available:
                raise BlockKDError(f"no fortune files in {root}: install Debian's fortunes package "
                                   f"(apt-get install fortunes) or set data.root")
            hint = closest(name, available)
            tip = f"did you mean {hint!r}?" if hint else f"choose from: {', '.join(available)}"
            raise BlockKDError(f"fortune category {name!r} (data.categories) is not a file of {root}; {tip}")
        entries[name] = read_fortunes(root / name)
    seen: dict[str, int] = {}
    for items in entries.values():
        for t in set(items):
            seen[t] = seen.get(t, 0) + 1
    key = lambda t: hashlib.sha1(t.encode()).hexdigest()  # noqa: E731
    train, test = Split([], None, np.zeros(0, np.int64)), Split([], None, np.zeros(0, np.int64))
    train_labels, test_labels = [], []
    for label, name in enumerate(categories):
        items = sorted({t for t in entries[name] if seen[t] == 1}, key=key)[: cfg["max_per_class"]]
        n_test = max(1, round(cfg["test_fraction"] * len(items)))
        if len(items) - n_test < 1:
            raise BlockKDError(f"fortune category {name!r} has only {len(items)} usable entries")
        test.texts += items[:n_test]
        train.texts += items[n_test:]
        test_labels += [label] * n_test
        train_labels += [label] * (len(items) - n_test)
    train.labels, test.labels = np.array(train_labels, np.int64), np.array(test_labels, np.int64)
    return RawText(train, test, categories)


# ----------------------------------------------------------------------------------------- tokenizer
def _transformers():
    try:
        import transformers
    except ImportError:
        raise BlockKDError(f"text data needs the transformers package: {NLP_INSTALL}") from None
    return transformers


def _train_tokenizer(kind: str, vocab_size: int, texts: Sequence[str]):
    """A BERT-style (lower-cased, [CLS] a [SEP] b [SEP]) WordPiece or BPE tokenizer trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                           show_progress=False)  # its bar: blank lines in logs
        tok.decoder = decoders.WordPiece()
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _fast(tokenizer_object):
    """``tokenizer_object`` (a ``tokenizers.Tokenizer``) as a transformers tokenizer, its special tokens found
    by their usual names (BERT's ``[PAD]``..., RoBERTa's ``<pad>``...; none is added); BERT-style vocabularies
    (with ``[CLS]``) also give ``token_type_ids``."""
    names = {"pad_token": ("[PAD]", "<pad>"), "unk_token": ("[UNK]", "<unk>"), "cls_token": ("[CLS]", "<s>"),
             "sep_token": ("[SEP]", "</s>"), "mask_token": ("[MASK]", "<mask>")}
    special = {k: next((t for t in v if tokenizer_object.token_to_id(t) is not None), None) for k, v in names.items()}
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if special["cls_token"] == "[CLS]" else \
        ["input_ids", "attention_mask"]
    return _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, model_input_names=inputs, **{k: v for k, v in special.items() if v})


def trained_tokenizer(kind: str, vocab_size: int, texts: Sequence[str], name: str):
    """``kind`` (wordpiece/bpe) trained on ``texts``, cached by its inputs under ``$BLOCKKD_DATA/tokenizers``."""
    from tokenizers import Tokenizer

    h = hashlib.sha256(f"{kind}:{vocab_size}".encode())
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    path = data_home() / "tokenizers" / f"{name}-{kind}-{vocab_size}-{h.hexdigest()[:16]}.json"
    if path.is_file():
        try:
            return _fast(Tokenizer.from_file(str(path)))
        except Exception:  # a damaged cache file: train again
            pass
    tok = _train_tokenizer(kind, vocab_size, texts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the training next time
    return _fast(tok)


def load_tokenizer(spec: str, *, vocab_size: int, texts: Sequence[str], name: str):
    """The tokenizer ``data.tokenizer`` names (see the module docstring), with a padding token."""
    _transformers()
    if spec in TRAINED:
        tok = trained_tokenizer(spec, vocab_size, texts, name)
    else:
        path = Path(spec).expanduser()
        try:
            if path.is_file():
                from tokenizers import Tokenizer

                tok = _fast(Tokenizer.from_file(str(path)))
            else:
                tok = _transformers().AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # OSError offline / missing files, ValueError for a bad folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            local = "" if path.exists() else (f"; offline, download it on a connected machine (huggingface-cli "
                                              f"download {spec} --local-dir tokenizers/{spec.split('/')[-1]}) and "
                                              f"set data.tokenizer to that folder")
            raise BlockKDError(f"cannot load the tokenizer data.tokenizer={spec!r} ({type(e).__name__}: {first})"
                               f"{local}") from None
    if tok.pad_token_id is None:
        raise BlockKDError(f"the tokenizer {spec!r} has no padding token, which batches of texts need")
    return tok


# ----------------------------------------------------------------------------------------- encoded data
class Encoded:
    """Tokenised texts as one flat array of ids (and token types) with per-text offsets, plus labels."""

    def __init__(self, tokenizer, split: Split, max_length: int, types: bool):
        enc = tokenizer(split.texts, split.pairs, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=types)
        ids = enc["input_ids"]
        self.lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.ids = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(self.lengths.sum()))
        self.types = None
        if types:
            self.types = np.fromiter((t for x in enc["token_type_ids"] for t in x), dtype=np.int64,
                                     count=len(self.ids))
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """The texts ``idx`` padded to the longest of them: input_ids, attention_mask (and token_type_ids)."""
        lengths = self.lengths[idx]
        longest = int(lengths.max()) if len(idx) else 0
        pos = np.arange(longest)
        mask = pos[None, :] < lengths[:, None]
        src = np.where(mask, self.offsets[idx][:, None] + pos[None, :], 0)
        out = {"input_ids": torch.from_numpy(np.where(mask, self.ids[src] if len(self.ids) else 0, pad_id)),
               "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if self.types is not None:
            out["token_type_ids"] = torch.from_numpy(np.where(mask, self.types[src], 0))
        return out


class TextLoader:
    """Batches ``(model input, labels)`` on ``device`` from :class:`Encoded` texts (see the module docstring).

    Training: the global batches of the bucketed order (from (seed, epoch)), rank r taking its r-th slice of
    each; a last partial batch is kept (``drop_last=False``) only if every rank gets a sample of it.
    Evaluation: rank r's contiguous shard, sorted by length, nothing dropped. ``with_index``: training batches
    are ``(x, y, index)`` (methods with per-sample state, CRD).
    """

    def __init__(self, data: Encoded, *, batch_size: int, train: bool, device: torch.device, pad_id: int,
                 bucket: int = 0, drop_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.train, self.device, self.pad_id = data, batch_size, train, device, pad_id
        self.bucket, self.drop_last, self.seed, self.rank, self.world_size = bucket, drop_last, seed, rank, world_size
        self.epoch, self.with_index = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _counts(self) -> tuple[int, int]:
        """(full global batches, samples in a kept last partial batch: 0 if dropped)."""
        full, rest = divmod(len(self.data), self.batch_size * self.world_size)
        return full, 0 if self.drop_last or rest < self.world_size else rest

    def __len__(self) -> int:
        if not self.train:
            return -(-len(eval_shard(len(self.data), self.rank, self.world_size)) // self.batch_size)
        full, rest = self._counts()
        return full + int(rest > 0)

    def plan(self) -> list[np.ndarray]:
        """This rank's batches of the epoch, as sample indices."""
        lengths = self.data.lengths
        if not self.train:
            idx = eval_shard(len(self.data), self.rank, self.world_size).numpy()
            idx = idx[np.argsort(lengths[idx], kind="stable")]
            return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        step = self.batch_size * self.world_size
        full, rest = self._counts()
        order = torch.randperm(len(self.data), generator=generator(self.seed, self.epoch, SHUFFLE)).numpy()
        kept, tail = order[:full * step], order[full * step:full * step + rest]  # the samples dropped: random ones
        if self.bucket:  # sort runs of `bucket` global batches by length, then shuffle the batches
            run = step * self.bucket
            kept = np.concatenate([part[np.argsort(lengths[part], kind="stable")]
                                   for part in np.split(kept, range(run, len(kept), run))] or [kept])
        batches = [kept[i * step:(i + 1) * step] for i in range(full)]
        if self.bucket:
            shuffle = torch.randperm(full, generator=generator(self.seed, self.epoch, SHUFFLE, 1)).tolist()
            batches = [batches[i] for i in shuffle]
            tail = tail[np.argsort(lengths[tail], kind="stable")]
        if rest:
            batches.append(tail)
        return [np.array_split(b, self.world_size)[self.rank] for b in batches]

    def __iter__(self) -> Iterator[tuple]:
        labels = self.data.labels
        for idx in self.plan():
            x = {k: v.to(self.device, non_blocking=True) for k, v in self.data.batch(idx, self.pad_id).items()}
            i = torch.from_numpy(idx)
            y = labels[i].to(self.device, non_blocking=True)
            yield (x, y, i.to(self.device)) if self.train and self.with_index else (x, y)


# ----------------------------------------------------------------------------------------- metrics
def f1_score(pred: torch.Tensor, y: torch.Tensor) -> float:
    """F1 (%) of the positive class 1 (GLUE's MRPC and QQP)."""
    tp = int(((pred == 1) & (y == 1)).sum())
    fp, fn = int(((pred == 1) & (y != 1)).sum()), int(((pred != 1) & (y == 1)).sum())
    return 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Matthews correlation (x100; GLUE's CoLA), the multi-class form (sklearn's); 0 when undefined."""
    k = int(max(pred.max().item() if pred.numel() else 0, y.max().item() if y.numel() else 0)) + 1
    cm = torch.bincount(y.long() * k + pred.long(), minlength=k * k).view(k, k).double()
    t, p, c, s = cm.sum(1), cm.sum(0), cm.trace(), cm.sum()
    num = c * s - (t * p).sum()
    den = ((s * s - (p * p).sum()) * (s * s - (t * t).sum())).sqrt()
    return 100.0 * float(num / den) if den > 0 else 0.0


METRICS = {"f1": f1_score, "matthews": matthews}


def compute_metrics(names: Sequence[str], pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return {n: METRICS[n](pred, y) for n in names}


# ----------------------------------------------------------------------------------------- model check
def check_model(model: torch.nn.Module, *, role: str, name: str, data: str, vocab: int, length: int,
                types: bool) -> None:
    """Refuse a model the tokenised data cannot feed, with one line naming both."""
    where = f"{role}.name={name}"
    embed = getattr(model, "get_input_embeddings", None)
    emb = embed() if callable(embed) else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and vocab > rows:
        raise BlockKDError(f"the tokenizer of {data} has {vocab} tokens, more than the {rows} token embeddings of "
                           f"{where}: use the model's own tokenizer (data.tokenizer), or a model with a larger "
                           f"vocabulary")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise BlockKDError(f"data.max_length={length} is longer than the {positions} positions of {where}")
    if types:
        params = inspect.signature(model.forward).parameters
        if "token_type_ids" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise BlockKDError(f"the tokenizer of {data} gives token_type_ids, which {where} does not take: use "
                               f"the model's own tokenizer (data.tokenizer)")


# ----------------------------------------------------------------------------------------- build
def _build(load, cfg: dict, *, device: torch.device, rank: int, world_size: int, seed: int) -> DataBundle:
    raw = load(cfg)
    train_idx, val_idx = split_indices(len(raw.train.labels), cfg["val_split"], cfg["train_subset"])
    test = raw.train.take(val_idx) if val_idx is not None else raw.test
    train = raw.train.take(train_idx)
    texts = train.texts + (train.pairs or [])
    tok = load_tokenizer(cfg["tokenizer"], vocab_size=cfg["vocab_size"], texts=texts, name=cfg["name"])
    types = "token_type_ids" in (getattr(tok, "model_input_names", None) or [])
    length = int(cfg["max_length"])
    enc_train, enc_test = Encoded(tok, train, length, types), Encoded(tok, test, length, types)
    common = dict(device=device, pad_id=int(tok.pad_token_id), seed=seed, rank=rank, world_size=world_size)
    train_loader = TextLoader(enc_train, batch_size=per_rank_batch(cfg["batch_size"], world_size), train=True,
                              bucket=cfg["bucket"], drop_last=cfg["drop_last"], **common)
    check_not_empty(train_loader, f"the {cfg['name']} training set", len(enc_train), cfg["batch_size"])
    test_loader = TextLoader(enc_test, batch_size=per_rank_eval_batch(cfg["eval_batch_size"], world_size),
                             train=False, **common)
    from ..blocks.core import text_input

    names = tuple(raw.metric_names)
    return DataBundle(
        train=train_loader, test=test_loader, num_classes=len(raw.classes),
        input_shape=text_input(length, token_type_ids=types), name=raw.name or cfg["name"], train_size=len(enc_train),
        test_size=len(enc_test), classes=list(raw.classes), metric_names=names,
        metrics=functools.partial(compute_metrics, names) if names else None,
        check_model=functools.partial(check_model, data=raw.name or cfg["name"], vocab=len(tok), length=length, types=types),
        tokenizer=tok)


build_textfile = functools.partial(_build, load_textfile)
build_glue = functools.partial(_build, load_glue)
build_fortunes = functools.partial(_build, load_fortunes)
