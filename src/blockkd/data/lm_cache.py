"""Offline teacher logits: the teacher's top-k log-probabilities (and their token ids) at every position of every
training sequence, computed once (``blockkd cache-logits RECIPE``) and read by the token distillers instead of a
live teacher (``teacher.cache: DIR``).

Why top-k: the full distribution is V floats per token (Qwen2.5: 152k, 600 KB per token in float32); the k
largest log-probabilities hold most of its mass, and a teacher of 70B parameters then runs once, not every epoch.

Layout of ``DIR``: ``cache.json`` (the manifest: k, shard size, sequence count and length, the teacher's
vocabulary, the tokenizer's and the training data's fingerprints) and ``shard-NNNNN.safetensors`` files of
``shard_size`` sequences each, ``logprobs`` float32 and ``ids`` int32, both ``(n, L, k)``; each shard's metadata
holds the sha256 of its tensors. A shard is written to a temporary file and renamed into place, so a killed run
leaves whole shards only; running the command again checks the manifest, skips the shards already verified and
writes the rest. Training refuses, in one line, a cache whose fingerprints are not those of its data and tokenizer,
and an unfinished cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._hooks import fault_point
from ..errors import BlockKDError
from ..methods.lm import hidden

MANIFEST = "cache.json"
VERSION = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id) and its end-of-text and padding ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    spec = json.dumps([vocab, tokenizer.eos_token_id, tokenizer.pad_token_id], ensure_ascii=False)
    return hashlib.sha256(spec.encode()).hexdigest()


def data_fingerprint(seqs) -> str:
    """sha256 of the training sequences (input ids, attention mask, labels) in their order: the cache is indexed
    by sequence, so any other data, order, subset or sequence length gives another fingerprint."""
    h = hashlib.sha256()
    for t in (seqs.input_ids, seqs.attention_mask, seqs.labels):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _digest(logprobs: torch.Tensor, ids: torch.Tensor) -> str:
    h = hashlib.sha256(logprobs.contiguous().numpy().tobytes())
    h.update(ids.contiguous().numpy().tobytes())
    return h.hexdigest()


def _shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:05d}.safetensors"


def _read_shard(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shard's (logprobs, ids) if the file is whole and its checksum holds, else None."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            lp, ids = f.get_tensor("logprobs"), f.get_tensor("ids")
    except Exception:  # missing, truncated or not safetensors
        return None
    return (lp, ids) if meta.get("sha256") == _digest(lp, ids) else None


@dataclass
class LogitCache:
    """A finished cache, verified against the data it trains on: ``topk(index)`` gives the stored top-k. The
    shards stay memory-mapped (safetensors): a batch reads its own rows, whatever the cache's size."""

    folder: Path
    manifest: dict
    shards: list  # safe_open handles, one per shard

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def vocab(self) -> int:
        return int(self.manifest["vocab"])

    def topk(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probabilities, token ids) ``(B, L, k)`` of the training sequences ``index``."""
        size, lps, ids = int(self.manifest["shard_size"]), [], []
        for i in index.tolist():
            f, row = self.shards[i // size], i % size
            lps.append(f.get_slice("logprobs")[row:row + 1])
            ids.append(f.get_slice("ids")[row:row + 1])
        return torch.cat(lps).to(device), torch.cat(ids).to(device=device, dtype=torch.long)


def open_cache(folder: str | Path, *, tokenizer, seqs, key: str = "teacher.cache") -> LogitCache:
    """The cache in ``folder``, refused in one line unless built, whole, for these sequences and this tokenizer."""
    folder = Path(folder).expanduser()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise BlockKDError(f"{key}={folder} holds no logit cache ({MANIFEST} missing or unreadable); build it with "
                           f"blockkd cache-logits RECIPE") from None
    if manifest.get("version") != VERSION:
        raise BlockKDError(f"{key}={folder}: cache version {manifest.get('version')} is not {VERSION}; rebuild it")
    if manifest.get("tokenizer") != tokenizer_fingerprint(tokenizer):
        raise BlockKDError(f"{key}={folder} was built with another tokenizer than this run's data.tokenizer; "
                           f"rebuild it with blockkd cache-logits RECIPE")
    if manifest.get("data") != data_fingerprint(seqs):
        raise BlockKDError(f"{key}={folder} was built for other training data ({manifest.get('sequences')} "
                           f"sequences of {manifest.get('seq_len')} tokens, data {manifest.get('data_name')}); this "
                           f"run's data differs (data.*, train_subset, val_split, seq_len): rebuild it with "
                           f"blockkd cache-logits RECIPE")
    for i in range(manifest["shards"]):  # every shard verified once (read, hashed, dropped), then memory-mapped
        if _read_shard(_shard_path(folder, i)) is None:
            raise BlockKDError(f"{key}={folder} is unfinished or damaged (shard {i} of {manifest['shards']} missing "
                               f"or failing its checksum); run blockkd cache-logits RECIPE again to complete it")
    return LogitCache(folder, manifest, [safe_open(str(_shard_path(folder, i)), framework="pt")
                                         for i in range(manifest["shards"])])


@torch.no_grad()
def build_cache(folder: str | Path, *, teacher_view, seqs, tokenizer, k: int, shard_size: int, batch_size: int,
                device: torch.device, describe: dict, log=print) -> dict:
    """Run the teacher over ``seqs`` and write the top-``k`` log-probabilities into ``folder`` (see the module
    docstring); an existing cache of the same manifest is completed, one of another refused. Returns the
    manifest."""
    folder = Path(folder).expanduser()
    vocab = int(teacher_view.head[-1].out_features)
    if not 1 <= k <= vocab:
        raise BlockKDError(f"--top-k {k} must lie in 1..{vocab} (the teacher's vocabulary)")
    n, length = seqs.input_ids.shape
    manifest = {"version": VERSION, "k": k, "shard_size": shard_size, "shards": -(-n // shard_size),
                "sequences": n, "seq_len": length, "vocab": vocab, "tokenizer": tokenizer_fingerprint(tokenizer),
                "data": data_fingerprint(seqs), **describe}
    path = folder / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != manifest:
            diff = sorted(key for key in set(manifest) | set(old or {}) if (old or {}).get(key) != manifest.get(key))
            raise BlockKDError(f"{folder} holds a logit cache built differently ({', '.join(diff)}); use another "
                               f"folder or delete this one")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MANIFEST}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, path)
    teacher_view.eval()
    done = 0
    for s in range(manifest["shards"]):
        target = _shard_path(folder, s)
        if _read_shard(target) is not None:
            done += 1
            continue
        a, b = s * shard_size, min(n, (s + 1) * shard_size)
        lps, idss = [], []
        for c in range(a, b, batch_size):
            x = {"input_ids": seqs.input_ids[c:min(b, c + batch_size)].to(device),
                 "attention_mask": seqs.attention_mask[c:min(b, c + batch_size)].to(device)}
            logits = teacher_view.head(hidden(teacher_view, x)).float()
            top = torch.log_softmax(logits, -1).topk(k, dim=-1)
            lps.append(top.values.cpu())
            idss.append(top.indices.to(torch.int32).cpu())
        lp, ids = torch.cat(lps).contiguous(), torch.cat(idss).contiguous()
        tmp = target.with_name(f".{target.name}.tmp")
        save_file({"logprobs": lp, "ids": ids}, str(tmp), metadata={"sha256": _digest(lp, ids), "first": str(a)})
        fault_point("cache_shard", shard=s)  # a kill here leaves the temporary file only
        os.replace(tmp, target)
        log(f"shard {s + 1}/{manifest['shards']}: sequences {a}..{b - 1}")
    if done:
        log(f"{done} shard(s) already in {folder} verified and kept")
    return manifest


__all__ = ["LogitCache", "open_cache", "build_cache", "tokenizer_fingerprint", "data_fingerprint"]
