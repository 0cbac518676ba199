"""The run folder: what a run leaves on disk, and how a resumed run finds its way back.

Why its own module: creating, refusing, clearing and resuming a run folder, and keeping ``last/`` and
``best/`` consistent after a kill at any moment, are one job with many corner cases (tests/faults).
Only rank 0 writes; every rank reads ``last/`` on resume.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from ..errors import BlockKDError
from ..utils import atomic_write
from . import runtime
from .checkpoint import Checkpoint, copy_checkpoint, load_resumable, read_meta, save_checkpoint

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "last", "last.prev", "best", "summary.json")


class RunFolder:
    """``path``: config.yaml, metrics, TensorBoard, ``last/`` (+ ``last.prev/``) and ``best/`` checkpoints."""

    def __init__(self, path: Path, warn: Callable[[str], None]):
        self.path, self.warn = Path(path), warn

    def write_config(self, text: str) -> None:
        if runtime.is_main():
            atomic_write(self.path / "config.yaml", text)

    def save(self, *, weights, meta: dict, state: dict, is_best: bool) -> None:
        """``last/`` (and ``best/``) from the current state; rank 0 only."""
        if not runtime.is_main():
            return
        last = save_checkpoint(self.path / "last", weights=weights, meta=meta, state=state, keep_prev=True)
        if is_best:
            copy_checkpoint(last, self.path / "best")

    def save_pretrained(self, model, tokenizer=None, state_dict=None) -> None:
        """``hf/``: ``model.save_pretrained`` (and the tokenizer's) for ``from_pretrained``; rank 0 only.
        Written to ``hf.tmp/`` then renamed, so ``hf/`` is never half-written."""
        if not runtime.is_main():
            return
        final, tmp, old = self.path / "hf", self.path / "hf.tmp", self.path / "hf.old"
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def resumable(self) -> Checkpoint | None:
        """The newest readable checkpoint (``last/``, else its fallbacks, with a warning), or None."""
        return load_resumable(self.path, self.warn)

    def saved_note(self) -> str:
        """What a ``--resume`` would continue from, as read back from the disk."""
        try:
            return f"{self.path / 'last'} holds epoch {read_meta(self.path / 'last')['epoch']}"
        except BlockKDError:
            return "no checkpoint was written yet"

    def repair_best(self, best_epoch: int | None, resumed_from: Path) -> None:
        """Make ``best/`` hold ``best_epoch`` again: a kill between writing ``last/`` and copying it to
        ``best/`` (or while swapping ``best/``) leaves an older or missing ``best/`` behind."""
        if best_epoch is None or not runtime.is_main():
            return

        def epoch_of(folder: Path) -> int | None:
            try:
                return read_meta(folder).get("epoch")
            except BlockKDError:
                return None

        best = self.path / "best"
        if epoch_of(best) == best_epoch:
            return
        source = next((f for f in (resumed_from, self.path / "best.prev") if epoch_of(f) == best_epoch), None)
        if source is None:
            self.warn(f"{best} does not hold the best epoch ({best_epoch}) and no checkpoint of it is "
                             f"left; it will be replaced by the next best epoch")
            return
        self.warn(f"{best} did not hold the best epoch ({best_epoch}); restored it from {source.name}/")
        copy_checkpoint(source, best)



def prepare(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create (or check, or clear) the run folder; refuse to silently mix two runs in one folder.

    A folder left by a start that failed before its first checkpoint (a typo in a teacher path, say)
    holds nothing worth keeping and is reused without flags.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise BlockKDError(f"run folder {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        ours = any((run_dir / m).exists() for m in RUN_MARKERS)
        progress = any((run_dir / m).exists() for m in RUN_MARKERS if m != "config.yaml")
        if overwrite or (ours and not progress):
            if not ours:
                raise BlockKDError(f"{run_dir} does not look like a blockkd run folder; refusing to delete it "
                                   f"(choose another output.dir/output.name)")
            shutil.rmtree(run_dir)
        elif not resume:
            raise BlockKDError(f"run folder {run_dir} exists; pass --resume to continue or --overwrite to replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BlockKDError(f"run folder {run_dir} is not writable ({e.strerror})") from None


