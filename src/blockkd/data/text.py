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

This module holds the datasets' options, the model check and the build; the jobs live beside it: reading
(``text_readers``), tokenizers (``tokenizer``), encoding and batching (``text_loader``); the GLUE metrics sit
beside evaluation (``engine.metrics``). The names they define are importable from here too.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch

from ..inputs import text_input
from ..errors import BlockKDError
from ..schema import OptionError, REQUIRED, STRING, Check, integer, number, option, optional
from .common import DataBundle, check_not_empty, per_rank_batch, per_rank_eval_batch, split_indices
from .text_loader import Encoded, TextLoader
from .text_readers import (FORTUNE_CATEGORIES, FORTUNES_ROOT, GLUE, REGRESSION, RawText, Split, load_fortunes,
                           load_glue, load_textfile, read_fortunes)
from .tokenizer import NLP_INSTALL, TRAINED, load_tokenizer, trained_tokenizer

__all__ = ["TextFileOptions", "GlueOptions", "FortunesOptions", "build_textfile", "build_glue", "build_fortunes",
           "check_model", "RawText", "Split", "Encoded", "TextLoader", "load_textfile", "load_glue", "load_fortunes",
           "read_fortunes", "load_tokenizer", "trained_tokenizer", "GLUE", "REGRESSION", "FORTUNES_ROOT",
           "FORTUNE_CATEGORIES", "NLP_INSTALL", "TRAINED"]


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
                       "id, or a local copy (hf download nyu-mll/glue --repo-type dataset)")
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
    max_per_class: int | None = option(200, optional(integer(2)),
                                       "at most this many fortunes of each category (null: all of them)")
    test_fraction: float = option(0.2, number(0, strict=True, hi=0.9), "share of each category held out as test")
    tokenizer: str = _tokenizer("wordpiece")
    max_length: int = _max_length(64)
    vocab_size: int = option(4000, integer(100), "tokens of a tokenizer trained here (tokenizer: wordpiece or bpe)")
    bucket: int = BUCKET


# ----------------------------------------------------------------------------------------- raw text
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
    names = tuple(raw.metric_names)
    return DataBundle(
        train=train_loader, test=test_loader, num_classes=len(raw.classes),
        input_shape=text_input(length, token_type_ids=types), name=raw.name or cfg["name"], train_size=len(enc_train),
        test_size=len(enc_test), classes=list(raw.classes), metric_names=names,
        check_model=functools.partial(check_model, data=raw.name or cfg["name"], vocab=len(tok), length=length,
                                      types=types),
        tokenizer=tok)


build_textfile = functools.partial(_build, load_textfile)
build_glue = functools.partial(_build, load_glue)
build_fortunes = functools.partial(_build, load_fortunes)
