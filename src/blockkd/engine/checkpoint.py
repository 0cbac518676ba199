"""Checkpoints: folders holding ``weights.safetensors``, ``optim.safetensors`` and ``meta.json`` (and
``tokenizer.json`` for text data whose tokenizer was trained by the run: its ids are what the weights learned, and
a tokenizer trained again elsewhere need not give the same ones).

Why this shape: safetensors + JSON load without pickle (a checkpoint from elsewhere cannot run code),
the weights file is usable on its own, and ``meta.json`` is readable by people and other tools.
A checkpoint is written into a temporary folder beside its destination, fsynced, then renamed into
place; the previous one is kept as ``<name>.prev/`` until the new one is complete, so a kill at any
moment leaves at least one readable checkpoint. ``meta.json`` records the sha256 of both tensor files:
a truncated or corrupt file is caught on load and named. A write that fails (a full disk) removes its
temporary folder, puts the previous checkpoint back if it was already moved aside, and raises one line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import safetensors.torch
import torch

from ..errors import BlockKDError
from .._hooks import fault_point
from ..utils import fsync_dir, write_synced

FORMAT = "blockkd-checkpoint"
VERSION = 2  # 2: meta.json has its own checksum file
WEIGHTS, OPTIM, META = "weights.safetensors", "optim.safetensors", "meta.json"
META_SUM = "meta.json.sha256"  # sha256 of meta.json (which holds the sha256 of the tensor files)
TOKENIZER = "tokenizer.json"  # the run's trained tokenizer (text data), where it has one


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the trained tensors, the metadata, and the (rebuilt) nested training state."""

    path: Path
    weights: dict[str, torch.Tensor]
    meta: dict
    state: dict  # meta["state"] with its tensors put back (optimizer, scheduler, scaler ...)

    def student_weights(self) -> dict[str, torch.Tensor]:
        """The student's own state_dict (keys without the ``student.`` prefix)."""
        return {k[len("student."):]: v for k, v in self.weights.items() if k.startswith("student.")}


# ------------------------------------------------------------------------------- nested state <-> JSON
def pack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON with each tensor replaced by ``{"__tensor__": key}`` and stored in ``tensors``.

    Dicts with non-string keys (the optimizer's per-parameter state is keyed by int) become
    ``{"__items__": [[key, value], ...]}`` so the keys come back with their type.
    """
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach()  # copied to the CPU when written
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack_state(v, tensors) for k, v in obj.items()}
        return {"__items__": [[k, pack_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [pack_state(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unpack_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`pack_state`."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: unpack_state(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack_state(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------- files
def _tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(folder: str | Path, *, weights: dict[str, torch.Tensor], meta: dict,
                    state: dict | None = None, keep_prev: bool = True, tokenizer: bytes | None = None) -> Path:
    """Write a checkpoint folder atomically; ``state`` (nested, with tensors) goes to optim.safetensors.

    ``keep_prev``: leave the replaced checkpoint as ``<folder>.prev/`` (the fallback for ``--resume``).
    ``tokenizer``: a trained tokenizer's ``tokenizer.json``, kept (and checksummed) with the weights.
    """
    folder = Path(folder)
    state_tensors: dict[str, torch.Tensor] = {}
    state_json = pack_state(state or {}, state_tensors)
    files = {WEIGHTS: _tensors_bytes(weights), OPTIM: _tensors_bytes(state_tensors)}
    if tokenizer is not None:
        files[TOKENIZER] = tokenizer
    meta = {"format": FORMAT, "version": VERSION, **meta, "state": state_json,
            "sha256": {name: _sha256(data) for name, data in files.items()}}
    files[META] = json.dumps(meta, indent=1).encode("utf-8")
    files[META_SUM] = _sha256(files[META]).encode("ascii")
    with _writing(folder) as tmp:
        return _write_and_publish(tmp, folder, files, keep_prev, meta.get("epoch"))


def copy_checkpoint(src: str | Path, folder: str | Path, *, keep_prev: bool = False) -> Path:
    """Publish a copy of checkpoint ``src`` as ``folder`` (``best/`` from a fresh ``last/``), atomically.

    Real copies, not hard links: damage to one file must not reach the other checkpoint.
    """
    src, folder = Path(src), Path(folder)
    with _writing(folder) as tmp:
        files = {name: (src / name).read_bytes() for name in (WEIGHTS, OPTIM, META, META_SUM, TOKENIZER)
                 if name != TOKENIZER or (src / name).is_file()}
        return _write_and_publish(tmp, folder, files, keep_prev, json.loads(files[META]).get("epoch"))


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``folder``; an OSError (disk full, permissions) becomes one line,
    and the partial temporary folder is removed (the previous checkpoint is untouched or put back)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while writing
        tmp.mkdir(parents=True)
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BlockKDError(f"cannot write checkpoint {folder}: {e.strerror or e}; the previous checkpoint "
                           f"is kept") from None


def _write_and_publish(tmp: Path, folder: Path, files: dict[str, bytes], keep_prev: bool, epoch: Any) -> Path:
    """Write ``files`` into ``tmp``, then swap it in as ``folder`` (``epoch`` names the fault points)."""
    where = {"folder": folder.name, "epoch": epoch}
    for name, data in files.items():
        write_synced(tmp / name, data)
        fault_point("checkpoint_write", **where)
    return _publish(tmp, folder, keep_prev, where)


def _publish(tmp: Path, folder: Path, keep_prev: bool, where: dict) -> Path:
    """Swap the complete ``tmp`` folder in as ``folder``; the old one survives as ``<folder>.prev`` until then."""
    prev = folder.with_name(f"{folder.name}.prev")
    old = folder.with_name(f".{folder.name}.prev.old")  # the replaced prev, deleted once the swap is done
    fsync_dir(tmp)
    if old.exists():
        shutil.rmtree(old)
    done: list[tuple[Path, Path]] = []
    try:
        if folder.exists():
            for src, dst in ((prev, old), (folder, prev)):
                if src.exists():
                    os.replace(src, dst)
                    done.append((src, dst))
            fault_point("checkpoint_rename", **where)
        os.replace(tmp, folder)
    except OSError:
        for src, dst in reversed(done):  # a failed swap changes nothing
            os.replace(dst, src)
        raise
    fault_point("checkpoint_renamed", **where)
    fsync_dir(folder.parent)
    for stale in [old] if keep_prev else [old, prev]:
        if stale.exists():
            shutil.rmtree(stale)
    return folder


def _verified(path: Path, sha: str | None) -> bytes:
    """The bytes of checkpoint file ``path``, checked against its sha256 in meta.json (where it has one)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BlockKDError(f"cannot read checkpoint file {path}: {e.strerror}") from None
    if sha is not None and _sha256(data) != sha:
        raise BlockKDError(f"checkpoint file {path} is corrupt or truncated (sha256 mismatch with meta.json)")
    return data


def _read_tensors(path: Path, sha: str | None) -> dict[str, torch.Tensor]:
    data = _verified(path, sha)
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise BlockKDError(f"checkpoint file {path} is not a readable safetensors file ({e})") from None


def read_meta(folder: str | Path) -> dict:
    """``meta.json`` of a checkpoint folder, checked for format and version."""
    path = Path(folder) / META
    try:
        raw = path.read_bytes()
        meta = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BlockKDError(f"{folder} is not a checkpoint folder (no {META})") from None
    except (OSError, ValueError) as e:
        raise BlockKDError(f"checkpoint file {path} is unreadable or corrupt ({e})") from None
    if isinstance(meta, dict) and meta.get("version", 1) >= 2:
        try:
            want = (Path(folder) / META_SUM).read_text("ascii").strip()
        except (OSError, ValueError):
            raise BlockKDError(f"checkpoint file {Path(folder) / META_SUM} is missing or unreadable") from None
        if _sha256(raw) != want:
            raise BlockKDError(f"checkpoint file {path} is corrupt or truncated (sha256 mismatch with {META_SUM})")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BlockKDError(f"{path} is not a blockkd checkpoint "
                           f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version", 0) > VERSION:
        raise BlockKDError(f"{path} has checkpoint format version {meta['version']}; this blockkd reads up to "
                           f"{VERSION} (upgrade blockkd)")
    return meta


def load_checkpoint(folder: str | Path, *, with_state: bool = True) -> Checkpoint:
    """Load and verify a checkpoint folder; any missing, truncated or corrupt file -> BlockKDError naming it."""
    folder = Path(folder)
    meta = read_meta(folder)
    sha = meta.get("sha256", {})
    weights = _read_tensors(folder / WEIGHTS, sha.get(WEIGHTS))
    state = unpack_state(meta.get("state", {}), _read_tensors(folder / OPTIM, sha.get(OPTIM))) if with_state else {}
    return Checkpoint(folder, weights, meta, state)


def checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder or a run folder (its ``best/``, else ``last/``)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for name in ("best", "last", "last.prev"):
        if (path / name / META).is_file():
            return path / name
    raise BlockKDError(f"{path} is neither a run folder with best/ or last/ nor a checkpoint folder")


def saved_tokenizer(path: str | Path | None) -> Path | None:
    """The trained tokenizer a run folder or checkpoint folder holds (``tokenizer.json``, checked against
    meta.json's sha256), or None: none saved, or ``path`` is no checkpoint of ours (a ``.safetensors`` file).
    For a run folder, any of its checkpoints serves: they all hold the run's one tokenizer."""
    if not path:
        return None
    path = Path(path)
    errors = []
    for folder in (path, *(path / name for name in ("last", "last.prev", "best", "best.prev"))):
        file = folder / TOKENIZER
        if not ((folder / META).is_file() and file.is_file()):
            continue
        try:
            _verified(file, read_meta(folder).get("sha256", {}).get(TOKENIZER))
            return file
        except BlockKDError as e:  # another checkpoint of the run holds the same tokenizer
            errors.append(str(e))
    if errors:  # saved, but unreadable: training one again would give other ids than the weights learned
        raise BlockKDError(f"no readable {TOKENIZER} in {path}: {'; '.join(errors)}")
    return None


def teacher_tokenizer(checkpoint: str | Path | None, data: dict) -> Path | None:
    """The trained tokenizer of a teacher checkpoint, when its run's ``data.tokenizer`` and ``data.vocab_size``
    are this run's (``data``, flat): the ids its logits were learned with. Other settings: None (the run trains
    the tokenizer its config names, as without a saved one)."""
    file = saved_tokenizer(checkpoint)
    if file is None:
        return None
    saved = read_meta(file.parent).get("config", {}).get("data", {})
    same = all(saved.get(k) == data.get(k) for k in ("tokenizer", "vocab_size"))
    return file if same else None


def load_resumable(run_dir: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest readable checkpoint of a run: ``last/``, else ``last.prev/``, ``best/`` (with a warning).

    None when the run has no checkpoint at all; BlockKDError when every one is unreadable.
    """
    errors = []
    for name in ("last", "last.prev", "best", "best.prev"):
        folder = run_dir / name
        if not folder.exists():
            continue
        try:
            ckpt = load_checkpoint(folder)
        except BlockKDError as e:
            errors.append(str(e))
            continue
        if errors:
            warn(f"{'; '.join(errors)}; resuming from {name}/ (epoch {ckpt.meta.get('epoch')}) instead")
        return ckpt
    if errors:
        raise BlockKDError(f"no readable checkpoint in {run_dir}: {'; '.join(errors)}")
    return None
