"""Language-model data for decoder-only causal LMs: plain text packed into fixed-length sequences (``lm_text``,
``lm_fortunes``), prompt/response pairs with the loss on the response only (``lm_jsonl``), and any of these
through the ``datasets`` library by name (``lm_hf``).

A batch is ``({"input_ids", "attention_mask"}, labels)``, all ``(B, L)``; labels are already *shifted*:
``labels[b, t]`` is the token position ``t`` must predict (``input_ids[b, t + 1]``), ``-100`` where nothing
counts (padding, the prompt, a sequence's last position). The methods of :mod:`blockkd.methods.lm` read them so.

Why packing: plain text is concatenated, each document followed by the tokenizer's end-of-text token, and cut
into windows of ``seq_len + 1`` tokens (GPT-2's and nanoGPT's recipe): no padding, every position counts, and an
epoch is a fixed set of sequences that shuffles exactly from (seed, epoch). Prompt/response pairs are not
packed: each is ``prompt + response + end-of-text``, truncated to ``seq_len`` tokens, right-padded per batch.

The tokenizer (``tokenizer``) is the teacher's and the student's: a folder or hub id (``AutoTokenizer``), a
``tokenizer.json``, or ``bytebpe``: a byte-level BPE of ``vocab_size`` tokens trained here on the training text
(cached under ``$BLOCKKD_DATA/tokenizers``), with ``<|endoftext|>`` as end-of-text and padding token. It is saved
beside the exported student (``hf/``), which ``transformers.pipeline("text-generation")`` then loads.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import BlockKDError
from ..inputs import text_input
from ..schema import REQUIRED, STRING, Check, integer, number, option, optional
from ..utils import data_home
from .common import (SHUFFLE, DataBundle, check_not_empty, eval_shard, generator, per_rank_batch,
                     per_rank_eval_batch, split_indices)
from .text import check_model
from .text_readers import _read_rows, fortune_files, read_fortunes
from .tokenizer import save_to_cache

IGNORE = -100
EOT = "<|endoftext|>"
BYTEBPE = "bytebpe"  # data.tokenizer: a byte-level BPE trained here
FORTUNES_ROOT = "/usr/share/games/fortunes"

NAMES = Check("a non-empty list of names", lambda v: isinstance(v, (list, tuple)) and bool(v)
              and all(isinstance(x, str) and x for x in v), list)
TOKENIZER = option(REQUIRED, STRING, "the teacher's (and student's) tokenizer: a folder or hub id, a "
                   "tokenizer.json, or bytebpe (a byte-level BPE trained here on the training text)")
SEQ_LEN = option(256, integer(8), "tokens per training sequence (packed text) / longest pair (prompt/response)")
VOCAB = option(2048, integer(260), "tokens of a tokenizer trained here (tokenizer: bytebpe)")
TEST_FRACTION = option(0.1, number(0, strict=True, hi=0.9), "share of the documents held out as the test split "
                       "(when no test file is named)")


@dataclasses.dataclass(frozen=True)
class LMTextOptions:
    train: str = option(REQUIRED, STRING, "training text: a .txt file (documents separated by blank lines) or a "
                        ".jsonl file with a text column")
    tokenizer: str = TOKENIZER
    test: str | None = option(None, optional(STRING), "test file, same format (null: hold out test_fraction)")
    text_column: str = option("text", STRING, ".jsonl files: the column of the text")
    seq_len: int = SEQ_LEN
    vocab_size: int = VOCAB
    test_fraction: float = TEST_FRACTION


@dataclasses.dataclass(frozen=True)
class LMJsonlOptions:
    train: str = option(REQUIRED, STRING, "training pairs: .jsonl, one {prompt, response} object per line")
    tokenizer: str = TOKENIZER
    test: str | None = option(None, optional(STRING), "test pairs, same format (null: hold out test_fraction)")
    prompt_column: str = option("prompt", STRING, "the column of the prompt (no loss on it)")
    response_column: str = option("response", STRING, "the column of the response (the loss is on it)")
    seq_len: int = SEQ_LEN
    vocab_size: int = VOCAB
    test_fraction: float = TEST_FRACTION


@dataclasses.dataclass(frozen=True)
class LMHubOptions:
    dataset: str = option(REQUIRED, STRING, "datasets.load_dataset name (hub id or local folder)")
    tokenizer: str = TOKENIZER
    config: str | None = option(None, optional(STRING), "the dataset's configuration (subset) name")
    train_split: str = option("train", STRING, "split to train on")
    test_split: str | None = option(None, optional(STRING), "split to test on (null: hold out test_fraction)")
    text_column: str | None = option("text", optional(STRING), "plain text column (packed); null: prompt/response")
    prompt_column: str = option("prompt", STRING, "with text_column null: the prompt column (no loss on it)")
    response_column: str = option("response", STRING, "with text_column null: the response column")
    max_samples: int | None = option(None, optional(integer(1)), "use the first k records of each split")
    seq_len: int = SEQ_LEN
    vocab_size: int = VOCAB
    test_fraction: float = TEST_FRACTION


@dataclasses.dataclass(frozen=True)
class LMFortunesOptions:
    root: str = option(FORTUNES_ROOT, STRING, "folder of the fortune files (Debian: apt-get install fortunes)")
    categories: list | None = option(None, optional(NAMES), "fortune files to read (null: all)")
    tokenizer: str = option("bytebpe", STRING, "tokenizer (see lm_text); bytebpe: trained here")
    seq_len: int = option(128, integer(8), "tokens per packed sequence")
    vocab_size: int = VOCAB
    test_fraction: float = TEST_FRACTION


# ----------------------------------------------------------------------------------------- tokenizer
def _transformers():
    try:
        import transformers
    except ImportError:
        raise BlockKDError("language-model data needs the transformers package: pip install 'blockkd[nlp]'") from None
    return transformers


def train_bytebpe(texts: Sequence[str], vocab_size: int):
    """A GPT-2-style byte-level BPE of ``vocab_size`` tokens trained on ``texts``, cached by its inputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    h = hashlib.sha256(f"bytebpe:{vocab_size}".encode())
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    path = data_home() / "tokenizers" / f"lm-bytebpe-{vocab_size}-{h.hexdigest()[:16]}.json"
    tok = None
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception:  # a damaged cache file: train again
            tok = None
    if tok is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)  # its bar: blank lines in logs
        tok.train_from_iterator(texts, trainer)
        save_to_cache(tok, path)
    return _fast(tok)


def _fast(tok):
    """A ``tokenizers.Tokenizer`` as a transformers tokenizer; GPT-2's end-of-text token, where it has one, is
    its eos, bos, padding and unknown token (what ``bytebpe`` trains; a ``tokenizer.json`` file names no roles)."""
    roles = ("eos_token", "bos_token", "pad_token", "unk_token") if tok.token_to_id(EOT) is not None else ()
    return _transformers().PreTrainedTokenizerFast(tokenizer_object=tok, **dict.fromkeys(roles, EOT),
                                                   model_input_names=["input_ids", "attention_mask"])


def load_lm_tokenizer(spec: str, *, vocab_size: int, texts: Sequence[str]):
    """The tokenizer ``spec`` names, with an end-of-text token (and a padding token: end-of-text if none)."""
    t = _transformers()
    if spec == BYTEBPE:
        tok = train_bytebpe(texts, vocab_size)
    else:
        path = Path(spec).expanduser()
        try:
            if path.is_file():
                from tokenizers import Tokenizer

                tok = _fast(Tokenizer.from_file(str(path)))
            else:
                tok = t.AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # OSError offline / missing files, ValueError for a bad folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BlockKDError(f"cannot load the tokenizer data.tokenizer={spec!r} ({type(e).__name__}: {first}); "
                               f"offline, download it on a connected machine (hf download {spec}) and "
                               f"set data.tokenizer to that folder") from None
    if tok.eos_token_id is None:
        raise BlockKDError(f"the tokenizer {spec!r} has no end-of-text (eos) token, which separates documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------------------- sequences
@dataclasses.dataclass
class Sequences:
    """Fixed-length token sequences: input ids, attention mask and shifted labels, ``(N, L)`` int64 each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def take(self, idx: torch.Tensor | None) -> "Sequences":
        return self if idx is None else Sequences(self.input_ids[idx], self.attention_mask[idx], self.labels[idx])


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> Sequences:
    """``texts`` tokenised, each followed by end-of-text, concatenated and cut into windows of ``seq_len + 1``
    tokens (the rest dropped): inputs the first ``seq_len``, labels the last ``seq_len`` of each window."""
    eot = int(tokenizer.eos_token_id)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    flat = np.fromiter((t for doc in ids for t in (*doc, eot)), dtype=np.int64)
    n = (len(flat) - 1) // seq_len
    if n < 1:
        raise BlockKDError(f"the text holds {len(flat)} tokens, fewer than one sequence of data.seq_len={seq_len} + 1")
    x = torch.from_numpy(flat[:n * seq_len].reshape(n, seq_len).copy())
    y = torch.from_numpy(flat[1:n * seq_len + 1].reshape(n, seq_len).copy())
    return Sequences(x, torch.ones_like(x), y)


def pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], seq_len: int) -> Sequences:
    """``prompt + response + end-of-text`` per pair, truncated to ``seq_len`` tokens and right-padded; the labels
    count the response (and its end-of-text) only."""
    eot, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    x = torch.full((len(p_ids), seq_len), pad, dtype=torch.long)
    y = torch.full((len(p_ids), seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(p_ids), seq_len), dtype=torch.long)
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        seq = (list(p) + list(r) + [eot])[:seq_len + 1]
        k, inputs = len(seq) - 1, seq[:seq_len]
        x[i, :len(inputs)] = torch.tensor(inputs)
        mask[i, :len(inputs)] = 1
        targets = torch.tensor(seq[1:])
        counts = torch.arange(1, len(seq)) >= len(p)  # the target is a response token (or the final eot)
        y[i, :k] = torch.where(counts, targets, IGNORE)
    if not (y != IGNORE).any():
        raise BlockKDError(f"no response token fits in data.seq_len={seq_len}: every prompt is longer")
    return Sequences(x, mask, y)


def holdout(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) document indices: every document's place decided by a fixed permutation (seed-independent)."""
    perm = torch.randperm(n, generator=generator(0, 2, 33)).numpy()
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise BlockKDError(f"{n} documents are too few to hold out a test split")
    return perm[k:], perm[:k]


# ----------------------------------------------------------------------------------------- loader
class LMLoader:
    """Batches ``(x, labels)`` on ``device`` from :class:`Sequences`: training shuffles from (seed, epoch), rank r
    taking its slice of each global batch; evaluation reads rank r's contiguous shard."""

    causal_lm = True  # evaluation reads perplexity and token accuracy (blockkd.engine.lm_eval)

    def __init__(self, data: Sequences, *, batch_size: int, train: bool, device: torch.device, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.batch_size, self.train, self.device = data, batch_size, train, device
        self.drop_last, self.seed, self.rank, self.world_size = drop_last, seed, rank, world_size
        self.epoch, self.with_index = 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[torch.Tensor]:
        if not self.train:
            idx = eval_shard(len(self.data), self.rank, self.world_size)
            if self.world_size == 1:
                return list(idx.split(self.batch_size))
            # as many batches on every rank (a sharded model gathers its layers collectively, batch by batch)
            per_rank = -(-len(self.data) // self.world_size)
            return list(idx.tensor_split(-(-per_rank // self.batch_size)))
        step = self.batch_size * self.world_size
        order = torch.randperm(len(self.data), generator=generator(self.seed, self.epoch, SHUFFLE))
        full, rest = divmod(len(order), step)
        batches = [order[i * step:(i + 1) * step] for i in range(full)]
        if rest >= self.world_size and not self.drop_last:
            batches.append(order[full * step:])
        return [b.tensor_split(self.world_size)[self.rank] for b in batches]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[tuple]:
        d = self.data
        for idx in self.plan():
            x = {"input_ids": d.input_ids[idx].to(self.device, non_blocking=True),
                 "attention_mask": d.attention_mask[idx].to(self.device, non_blocking=True)}
            y = d.labels[idx].to(self.device, non_blocking=True)
            yield (x, y, idx.to(self.device)) if self.train and self.with_index else (x, y)


# ----------------------------------------------------------------------------------------- sources
def _read_texts(path: Path, column: str) -> list[str]:
    """Documents of a .txt file (separated by blank lines) or the ``column`` of a .jsonl file."""
    if not path.is_file():
        raise BlockKDError(f"text file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows, columns = _read_rows(path)
        if column not in columns:
            raise BlockKDError(f"data.text_column={column!r} is not a column of {path} (its columns: {columns})")
        return [str(r[column]) for r in rows if r.get(column) is not None]
    text = path.read_text(encoding="utf-8", errors="replace")
    return [d.strip() for d in text.split("\n\n") if d.strip()]


def _read_pairs(path: Path, prompt: str, response: str) -> tuple[list[str], list[str]]:
    rows, columns = _read_rows(path)
    for key, name in (("prompt_column", prompt), ("response_column", response)):
        if name not in columns:
            raise BlockKDError(f"data.{key}={name!r} is not a column of {path} (its columns: {', '.join(columns)})")
    rows = [r for r in rows if r.get(prompt) is not None and r.get(response) is not None]
    if not rows:
        raise BlockKDError(f"{path} holds no {prompt}/{response} pairs")
    return [r[prompt] for r in rows], [r[response] for r in rows]  # strings or conversations: see render


def _split_docs(train: list, test: list | None, fraction: float) -> tuple[list, list]:
    if test is not None:
        return train, test
    tr, te = holdout(len(train), fraction)
    return [train[i] for i in tr], [train[i] for i in te]


def load_fortune_docs(cfg: dict) -> list[str]:
    root = Path(cfg["root"]).expanduser()
    files = fortune_files(root)
    if not files:
        raise BlockKDError(f"no fortune files in {root}: install Debian's fortunes package (apt-get install "
                           f"fortunes; `make data`) or set data.root")
    names = cfg["categories"] or files
    missing = [n for n in names if n not in files]
    if missing:
        raise BlockKDError(f"fortune file {missing[0]!r} (data.categories) is not in {root}; choose from: "
                           f"{', '.join(files)}")
    docs = sorted({d for n in names for d in read_fortunes(root / n)}, key=lambda d: hashlib.sha256(d.encode())
                  .hexdigest())
    return docs


def _hub(cfg: dict) -> tuple[dict[str, list], dict[str, list] | None]:
    try:
        import datasets
    except ImportError:
        raise BlockKDError("data.name=lm_hf needs the datasets package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(cfg["dataset"], cfg["config"])
    except Exception as e:  # no connection, no cache, a bad name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BlockKDError(f"cannot load the dataset {cfg['dataset']!r} ({type(e).__name__}: {first}); offline, "
                           f"download it on a connected machine and set data.dataset to that folder") from None
    cols = [cfg["text_column"]] if cfg["text_column"] else [cfg["prompt_column"], cfg["response_column"]]

    def columns(split: str) -> dict[str, list]:
        if split not in ds:
            raise BlockKDError(f"dataset {cfg['dataset']!r} has no split {split!r} (its splits: {', '.join(ds)})")
        part = ds[split]
        if cfg["max_samples"]:
            part = part.select(range(min(cfg["max_samples"], len(part))))
        for c in cols:
            if c not in part.column_names:
                raise BlockKDError(f"column {c!r} is not in {cfg['dataset']} {split} (its columns: "
                                   f"{', '.join(part.column_names)})")
        return {c: list(part[c]) for c in cols}  # strings, or conversations (rendered once the tokenizer is known)

    return columns(cfg["train_split"]), (columns(cfg["test_split"]) if cfg["test_split"] else None)


def _raw(cfg: dict) -> tuple[str, Any, Any, list[str]]:
    """(kind "text" or "pairs", train, test, texts for a tokenizer trained here)."""
    name = cfg["name"]
    if name == "lm_fortunes":
        docs = load_fortune_docs(cfg)
        train, test = _split_docs(docs, None, cfg["test_fraction"])
        return "text", train, test, train
    if name == "lm_text":
        train = _read_texts(Path(cfg["train"]).expanduser(), cfg["text_column"])
        test = _read_texts(Path(cfg["test"]).expanduser(), cfg["text_column"]) if cfg["test"] else None
        train, test = _split_docs(train, test, cfg["test_fraction"])
        return "text", train, test, train
    if name == "lm_jsonl":
        p, r = _read_pairs(Path(cfg["train"]).expanduser(), cfg["prompt_column"], cfg["response_column"])
        test = _read_pairs(Path(cfg["test"]).expanduser(), cfg["prompt_column"], cfg["response_column"]) \
            if cfg["test"] else None
        train, test = _split_docs(list(zip(p, r)), None if test is None else list(zip(*test)), cfg["test_fraction"])
        return "pairs", train, test, [render(a, None, prompt=True) + render(b, None, prompt=False) for a, b in train]
    tr, te = _hub(cfg)
    if cfg["text_column"]:
        c = cfg["text_column"]
        train, test = _split_docs(tr[c], te[c] if te else None, cfg["test_fraction"])
        train, test = [render(t, None, prompt=False) for t in train], [render(t, None, prompt=False) for t in test]
        return "text", train, test, train
    pc, rc = cfg["prompt_column"], cfg["response_column"]
    train, test = _split_docs(list(zip(tr[pc], tr[rc])), list(zip(te[pc], te[rc])) if te else None,
                              cfg["test_fraction"])
    return "pairs", train, test, [render(a, None, prompt=True) + render(b, None, prompt=False) for a, b in train]


def render(value: Any, tokenizer, *, prompt: bool) -> str:
    """A column value as text: a string as it is; a conversation (a list of ``{"role", "content"}``, TRL's
    conversational format) through the tokenizer's chat template where it has one (a prompt with the assistant's
    turn opened), else its contents joined (a completion's turns: their contents)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        if prompt and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(list(value), tokenize=False, add_generation_prompt=True)
        return "".join(str(m["content"]) for m in value)
    return str(value)


def check_lm_model(model: torch.nn.Module, *, role: str, name: str, data: str, vocab: int, length: int) -> None:
    """Refuse a model the data cannot feed: a tokenizer larger than its embeddings, sequences past its positions."""
    if not hasattr(model, "generate"):
        raise BlockKDError(f"{role}.name={name} is not a causal language model, which {data} (next-token data) needs")
    check_model(model, role=role, name=name, data=data, vocab=vocab, length=length, types=False)


def build(cfg: dict, *, device: torch.device, rank: int, world_size: int, seed: int) -> DataBundle:
    kind, train, test, texts = _raw(cfg)
    tok = load_lm_tokenizer(cfg["tokenizer"], vocab_size=cfg["vocab_size"], texts=texts)
    length = int(cfg["seq_len"])
    encode = (lambda docs: pack(tok, docs, length)) if kind == "text" else \
        (lambda ps: pairs(tok, [render(p, tok, prompt=True) for p, _ in ps],
                          [render(r, tok, prompt=False) for _, r in ps], length))
    seq_train, seq_test = encode(train), encode(test)
    train_idx, val_idx = split_indices(len(seq_train), cfg["val_split"], cfg["train_subset"])
    if val_idx is not None:
        seq_test = seq_train.take(val_idx)
    seq_train = seq_train.take(train_idx)
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size)
    train_loader = LMLoader(seq_train, batch_size=per_rank_batch(cfg["batch_size"], world_size), train=True,
                            drop_last=cfg["drop_last"], **common)
    check_not_empty(train_loader, f"the {cfg['name']} training set", len(seq_train), cfg["batch_size"])
    test_loader = LMLoader(seq_test, batch_size=per_rank_eval_batch(cfg["eval_batch_size"], world_size), train=False,
                           **common)
    return DataBundle(
        train=train_loader, test=test_loader, num_classes=len(tok), input_shape=text_input(length), name=cfg["name"],
        train_size=len(seq_train), test_size=len(seq_test), metric_names=("perplexity",), tokenizer=tok,
        check_model=functools.partial(check_lm_model, data=cfg["name"], vocab=len(tok), length=length),
        task="causal_lm")


__all__ = ["LMTextOptions", "LMJsonlOptions", "LMHubOptions", "LMFortunesOptions", "LMLoader", "Sequences", "pack",
           "pairs", "build", "load_lm_tokenizer", "train_bytebpe"]
