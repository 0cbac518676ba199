"""What a run reports: log lines, the progress bar, metrics.csv/jsonl, TensorBoard scalars, summary.json.

Why one object: every output is rank-0-only and lives in the run folder; the trainer calls
``RunLogger`` methods and never decides itself whether or where to write. Progress bars are drawn only
on a terminal: redirected to a file they would fill it with ``\r`` updates, and the per-epoch lines (with
the whole run's ETA) already say how far the run is.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from ..utils import atomic_write

LOG = logging.getLogger("blockkd.engine")


class _TqdmHandler(logging.Handler):
    """Console lines that do not break a live progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        tqdm.write(self.format(record), file=stream)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno >= logging.WARNING else msg


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is a terminal, where a live bar is readable."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when ``enabled`` and stderr is a terminal (else a silent pass-through)."""
    return tqdm(iterable, disable=not (enabled and on_terminal()), leave=False, dynamic_ncols=True,
                file=sys.stderr, **kwargs)


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True):
    """transformers' (and the hub's) own tqdm bars off while inside, e.g. save_pretrained's "Writing model
    shards": with output.progress false, or off a terminal, a run prints only its own lines."""
    tl = None
    if quiet and "transformers" in sys.modules:  # a run that saves a Hugging Face model imported it already
        from transformers.utils import logging as tl
    was = tl is not None and tl.is_progress_bar_enabled()
    if was:
        tl.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tl.enable_progress_bar()


def _has_handlers(logger: logging.Logger) -> bool:
    """True when the application already routes blockkd's log records somewhere."""
    while logger is not None:
        if logger.handlers:
            return True
        if not logger.propagate:
            return False
        logger = logger.parent  # type: ignore[assignment]
    return False


class RunLogger(contextlib.AbstractContextManager):
    """All outputs of one run; a no-op writer on ranks other than 0 (``enabled=False``)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, progress: bool = True):
        self.run_dir, self.enabled, self.progress = Path(run_dir), enabled, progress and enabled
        self.tensorboard = tensorboard and enabled
        self._handlers: list[logging.Handler] = []
        self.tb = None
        if not enabled:
            return
        file_handler = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
        file_handler.setFormatter(_Format())
        self._handlers.append(file_handler)
        if not _has_handlers(LOG):  # a script that configured logging keeps its own console output
            console = _TqdmHandler()
            console.setFormatter(_Format())
            self._handlers.append(console)
        for h in self._handlers:
            LOG.addHandler(h)
        if LOG.level == logging.NOTSET or LOG.level > logging.INFO:
            self._old_level = LOG.level
            LOG.setLevel(logging.INFO)

    def open_tensorboard(self, purge_step: int | None = None) -> None:
        """Start the TensorBoard writer; ``purge_step`` drops events a resumed run is about to redo."""
        if self.tensorboard and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    # -- lines ---------------------------------------------------------------------------------------
    def info(self, msg: str) -> None:
        if self.enabled:
            LOG.info(msg)

    def warning(self, msg: str) -> None:
        if self.enabled:
            LOG.warning(msg)

    # -- progress ------------------------------------------------------------------------------------
    def bar(self, total: int, desc: str, unit: str = "step") -> tqdm:
        """A live bar (only with output.progress on and stderr a terminal)."""
        return progress_bar(total=total, desc=desc, enabled=self.progress, unit=unit)

    def shows_bars(self) -> bool:
        return self.progress and on_terminal()

    # -- scalars -------------------------------------------------------------------------------------
    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def metrics(self, history: list[dict]) -> None:
        """Rewrite metrics.csv and metrics.jsonl from the whole history (a resumed run stays consistent)."""
        if not self.enabled:
            return
        columns = _columns(history)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
        atomic_write(self.run_dir / "metrics.csv", buf.getvalue())
        atomic_write(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            atomic_write(self.run_dir / name, json.dumps(obj, indent=2) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        for h in self._handlers:
            LOG.removeHandler(h)
            h.close()
        self._handlers = []
        if hasattr(self, "_old_level"):
            LOG.setLevel(self._old_level)

    def __exit__(self, *exc) -> None:
        self.close()


def _columns(rows: Iterable[dict]) -> list[str]:
    """Union of the rows' keys in first-seen order (loss terms differ between methods)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v
