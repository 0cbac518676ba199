"""The run folder: what a run leaves on disk, and how a resumed run finds its way back.

Why its own module: creating, refusing, clearing and resuming a run folder, and keeping ``last/`` and
``best/`` consistent after a kill at any moment, are one job with many corner cases (tests/faults).
Only rank 0 writes; every rank reads ``last/`` on resume.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

from ..errors import BlockKDError
from ..utils import atomic_write
from . import runtime
from .checkpoint import Checkpoint, copy_checkpoint, load_resumable, read_meta, save_checkpoint

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "last", "last.prev", "best", "summary.json")
LOCK_FILE = "run.lock"  # who owns the run folder now; kept (empty) when free


class RunLock:
    """The run folder's owner: an exclusive ``flock`` on ``<run>/run.lock``, held for the run's life, with the
    holder's pid, host and start time written in the file so a refused run can name it.

    Why flock: the kernel releases it when its holder dies, however it dies (SIGKILL, OOM killer, power
    loss of a client), so a crashed run never leaves a folder locked. The record left behind by such a death
    is what marks it *stale*: the next owner reports it (``stale``) and takes over. On a file system without
    flock the record alone decides: a holder on this host whose pid is gone is stale, any other is busy.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict | None = None  # the record of a previous holder that died holding the lock

    def _record(self, fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            record = json.loads(raw) if raw.strip() else None
        except ValueError:
            record = {"pid": "?", "host": "?", "since": "?"}  # a torn write: someone held it
        return record if isinstance(record, dict) else None

    def _busy(self, holder: dict | None) -> BlockKDError:
        who = describe_holder(holder) if holder else "another process"
        gone = alive(holder) is False if holder else False
        tip = ("that process is gone; if it was killed, its DataLoader workers may still be exiting: try again in "
               "a few seconds" if gone else "wait for that run to end, or choose another output.name")
        return BlockKDError(f"run folder {self.path.parent} is in use by {who} (lock {self.path}); {tip}")

    def acquire(self) -> "RunLock":
        """Take the lock or raise a one-line BlockKDError naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(self._record(fd)) from None
            except OSError as e:  # no flock here (some network file systems): the record decides
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                holder = self._record(fd)
                if holder and alive(holder) is not False:
                    raise self._busy(holder) from None
            self.stale = self._record(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        """Clear the record and drop the lock (the file stays: deleting it would race with a new owner)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or vanished disk: the kernel still drops the lock below; the record reads as stale
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for DataLoader workers forked with a copy of the descriptor
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def alive(holder: dict) -> bool | None:
    """Whether the process of a lock record runs: None where that cannot be known (another host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


class RunFolder:
    """``path``: config.yaml, metrics, TensorBoard, ``last/`` (+ ``last.prev/``) and ``best/`` checkpoints."""

    def __init__(self, path: Path, warn: Callable[[str], None]):
        self.path, self.warn = Path(path), warn

    def write_config(self, text: str) -> None:
        if runtime.is_main():
            atomic_write(self.path / "config.yaml", text)

    def save(self, *, weights, meta: dict, state: dict, is_best: bool, tokenizer: bytes | None = None) -> None:
        """``last/`` (and ``best/``) from the current state (and the trained tokenizer's json); rank 0 only."""
        if not runtime.is_main():
            return
        last = save_checkpoint(self.path / "last", weights=weights, meta=meta, state=state, keep_prev=True,
                               tokenizer=tokenizer)
        if is_best:
            copy_checkpoint(last, self.path / "best")

    def save_pretrained(self, model, tokenizer=None, *, classes: list[str] | None = None,
                        max_length: int | None = None, state_dict=None) -> None:
        """``hf/``: ``model.save_pretrained`` (and the tokenizer's) for ``from_pretrained``; rank 0 only.
        Deployable as saved: the config names the classes (``id2label``/``label2id``) and the tokenizer's
        ``model_max_length`` is the length the model was trained on, so ``pipeline(..., truncation=True)``
        cuts longer texts to it. Written to ``hf.tmp/`` then renamed, so ``hf/`` is never half-written."""
        if not runtime.is_main():
            return
        final, tmp, old = self.path / "hf", self.path / "hf.tmp", self.path / "hf.old"
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        config = getattr(model, "config", None)
        if classes and config is not None:
            config.id2label = dict(enumerate(classes))
            config.label2id = {name: i for i, name in enumerate(classes)}
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            if max_length is not None:
                tokenizer.model_max_length = max_length
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



def prepare(run_dir: Path, *, resume: bool, overwrite: bool) -> RunLock:
    """Create (or check, or clear) the run folder and take its lock (:class:`RunLock`, returned: the caller
    releases it when the run ends); refuse to silently mix two runs in one folder.

    A folder left by a start that failed before its first checkpoint (a typo in a teacher path, say)
    holds nothing worth keeping and is reused without flags, once its lock shows no run owns it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise BlockKDError(f"run folder {run_dir} exists and is not a folder")

    def entries() -> list[Path]:
        return [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []

    def ours() -> bool:
        return (run_dir / LOCK_FILE).exists() or any((run_dir / m).exists() for m in RUN_MARKERS)

    foreign = bool(entries()) and not ours()
    if foreign:  # someone else's folder: nothing deleted, no lock file dropped into it without --resume
        if overwrite:
            raise BlockKDError(f"{run_dir} does not look like a blockkd run folder; refusing to delete it "
                               f"(choose another output.dir/output.name)")
        if not resume:
            raise BlockKDError(f"run folder {run_dir} exists; pass --resume to continue or --overwrite to replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir).acquire()
    except OSError as e:
        raise BlockKDError(f"run folder {run_dir} is not writable ({e.strerror})") from None
    try:
        present = entries()  # looked at again under the lock: the folder's last owner may have just left
        progress = any((run_dir / m).exists() for m in RUN_MARKERS if m != "config.yaml")
        if present and not foreign and (overwrite or not progress):
            for p in present:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif present and not resume:
            raise BlockKDError(f"run folder {run_dir} exists; pass --resume to continue or --overwrite to replace it")
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise BlockKDError(f"run folder {run_dir} is not writable ({e.strerror})") from None
    except BaseException:
        lock.release()
        raise
    return lock
