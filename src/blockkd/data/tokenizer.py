"""Tokenizers for text data: a folder or hub id (``AutoTokenizer``), a ``tokenizer.json`` file, or a BERT-style
WordPiece/BPE tokenizer trained here on the training text (cached under ``$BLOCKKD_DATA/tokenizers``).

Why a module of its own: training and caching a tokenizer is independent of how texts are read or batched,
and it is the one place that imports ``transformers``/``tokenizers`` (an optional dependency: ``blockkd[nlp]``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

from ..errors import BlockKDError
from ..models.external import hub_offline
from ..utils import data_home

NLP_INSTALL = "pip install 'blockkd[nlp]'"
TRAINED = ("wordpiece", "bpe")  # tokenizers trained here on the training text
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

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


def cache_path(kind: str, vocab_size: int, texts: Sequence[str], name: str) -> Path:
    """Where ``trained_tokenizer`` keeps the tokenizer of these inputs. The cache is what makes the ids
    repeatable: trained again, a tokenizer need not give the same ids (two WordPiece trainings on the same texts,
    in two processes, did not)."""
    h = hashlib.sha256(f"{kind}:{vocab_size}".encode())
    for t in texts:
        h.update(t.encode("utf-8", errors="replace") + b"\0")
    return data_home() / "tokenizers" / f"{name}-{kind}-{vocab_size}-{h.hexdigest()[:16]}.json"


def trained_tokenizer(kind: str, vocab_size: int, texts: Sequence[str], name: str):
    """``kind`` (wordpiece/bpe) trained on ``texts``, cached by its inputs under ``$BLOCKKD_DATA/tokenizers``."""
    from tokenizers import Tokenizer

    path = cache_path(kind, vocab_size, texts, name)
    if path.is_file():
        try:
            return _fast(Tokenizer.from_file(str(path)))
        except Exception:  # a damaged cache file: train again
            pass
    tok = _train_tokenizer(kind, vocab_size, texts)
    save_to_cache(tok, path)
    return _fast(tok)


def save_to_cache(tok, path: Path) -> None:
    """Write a trained ``tokenizers.Tokenizer`` to the cache file ``path`` atomically (a reader never sees half
    a file); a read-only cache only costs the training next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass


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
                tok = _transformers().AutoTokenizer.from_pretrained(
                    spec, local_files_only=not path.exists() and hub_offline())  # offline: no retry loop
        except Exception as e:  # OSError offline / missing files, ValueError for a bad folder
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            local = "" if path.exists() else (f"; no folder {path.absolute()} exists; if {spec!r} is a hub id, "
                                              f"offline, download it on a connected machine (hf "
                                              f"download {spec} --local-dir tokenizers/{spec.split('/')[-1]}) and "
                                              f"set data.tokenizer to that folder")
            raise BlockKDError(f"cannot load the tokenizer data.tokenizer={spec!r} ({type(e).__name__}: {first})"
                               f"{local}") from None
    if tok.pad_token_id is None:
        raise BlockKDError(f"the tokenizer {spec!r} has no padding token, which batches of texts need")
    return tok
