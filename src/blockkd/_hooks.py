"""Test hooks, inert unless their environment variable is set (the reliability suite and the DDP tests).

Why one internal module: they are not part of the library's behaviour, only ways for tests to stop a
run at a precise point or to see what each rank did; keeping them together makes that visible.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any, Callable

FAULT_ENV = "BLOCKKD_FAULT"
DEBUG_LOG_ENV = "BLOCKKD_DEBUG_LOG"


def fault_point(point: str, **where: Any) -> None:
    """Does nothing unless ``$BLOCKKD_FAULT`` is set.

    ``BLOCKKD_FAULT=[pause@]POINT[:key=value,...]``: when the run reaches ``POINT`` with every ``key``
    equal to ``value``, the process SIGKILLs itself (default), or with ``pause@`` prints
    ``fault point POINT reached`` to stderr and sleeps (up to 10 minutes, or until a SIGUSR1 lets it go on)
    so a test can signal it there or act while it waits.
    Points: ``step`` (step=global step index, before it runs), ``checkpoint_write`` (after each file
    written into the temporary folder: a kill there leaves a half-written checkpoint), ``checkpoint_rename``
    (old folder moved aside, new one not yet in place), ``checkpoint_renamed`` (new folder in place,
    nothing after it done); the checkpoint points have ``folder`` (last, best) and ``epoch``; ``cache_shard``
    (``blockkd cache-logits``: shard ``shard`` written to its temporary file, not yet renamed into place).
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, spec = spec.rpartition("@")
    name, _, conditions = spec.partition(":")
    want = dict(c.split("=", 1) for c in conditions.split(",") if c)
    if name != point or any(str(where.get(k)) != v for k, v in want.items()):
        return
    if action == "pause":  # SIGUSR1 ends the pause early (the run goes on); SIGINT still interrupts it
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
        print(f"fault point {point} reached", file=sys.stderr, flush=True)
        try:
            signal.sigtimedwait([signal.SIGUSR1], 600)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def debug_log(rank: int, record: dict | Callable[[], dict]) -> None:
    """Off unless ``$BLOCKKD_DEBUG_LOG=PATH``: rank ``rank`` appends ``record`` as a JSON line to
    ``PATH.rank<rank>``. In-memory training loaders log each batch's sample indices as they deliver it
    (``{"epoch", "indices"}``), the trainer each rank's weight digest after every epoch, so a test can
    check that DDP ranks saw disjoint data and ended with identical weights. ``record`` may be a function,
    called only when the hook is on.
    """
    path = os.environ.get(DEBUG_LOG_ENV)
    if path:
        with open(f"{path}.rank{rank}", "a", encoding="utf-8") as f:
            f.write(json.dumps(record() if callable(record) else record) + "\n")
