"""Small helpers every layer uses: module modes, atomic file writes, where blockkd keeps its files.

Why one module: each of these existed in several copies (probe, tracing, evaluation, checkpoints,
logs, the demo's cache, benchmarks); one version keeps their guarantees identical everywhere.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import torch.nn as nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and all its children in eval mode for the block; each module's own mode is restored after
    (not just the root's: a frozen teacher inside a training distiller stays in eval mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync, so a rename that follows never publishes a half-written file."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace ``path`` by ``data`` atomically (a synced temporary file beside it, then a rename): a reader
    sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_synced(tmp, data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def cache_home() -> Path:
    """The user cache for blockkd: ``$XDG_CACHE_HOME/blockkd`` (``~/.cache/blockkd``); downloads go here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "blockkd"


def data_home() -> Path:
    """Where datasets live by default: ``$BLOCKKD_DATA`` or the user cache."""
    if os.environ.get("BLOCKKD_DATA"):
        return Path(os.environ["BLOCKKD_DATA"]).expanduser()
    return cache_home()


def shown(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when below it, else as given: how files are named in
    messages, and read during a run (the same file: the working directory does not change), so that a path
    a recipe stores absolute (``blockkd.config.paths``) still appears as the user typed it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)
