"""Shared pieces of the reliability suite: tiny recipes, ``blockkd`` subprocesses, file snapshots.

Why subprocesses: a kill, a Ctrl-C or a crash must be observed the way a user meets it (exit status,
stderr, what is left on disk), so most tests run ``python -m blockkd`` exactly as the command line does.
They run two at a time (the CI machine has two cores; each spends seconds importing torch).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

TIMING = ("images_per_s", "train_time_s", "epoch_time_s", "wall_time_s")

# blockkd (the flagship method) from a random resnet14 teacher into a resnet8 on 16x16 synthetic data:
# 4 steps per epoch, deterministic on the CPU. stones_per_step=2 draws stones from torch's RNG, so an
# exact resume also proves the RNG state is restored; the milestone makes the scheduler state matter.
TINY: dict[str, Any] = {
    "model": {"name": "resnet8"},
    "teacher": {"name": "resnet14", "allow_random": True},
    "method": {"name": "blockkd", "options": {"stones_per_step": 2}},
    "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 256, "test_size": 64,
             "batch_size": 64, "eval_batch_size": 64},
    "optim": {"lr": 0.1},
    "schedule": {"name": "multistep", "milestones": [2]},
    "train": {"epochs": 3, "device": "cpu", "deterministic": True, "amp": "off"},
    "output": {"dir": "runs", "name": "r", "progress": False, "tensorboard": False, "plot": False},
}


def recipe(**dotted: Any) -> dict:
    """A copy of TINY with ``section__key=value`` changes (``method__options__gamma=2``)."""
    cfg = copy.deepcopy(TINY)
    for key, value in dotted.items():
        *path, leaf = key.split("__")
        node = cfg
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return cfg


def write_recipe(path: Path, cfg: dict | None = None, **dotted: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg if cfg is not None else recipe(**dotted), sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of a ``blockkd`` subprocess: one thread (two run side by side), no fault unless asked."""
    base = {k: v for k, v in os.environ.items() if k != "BLOCKKD_FAULT"}
    return {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def blockkd(args: Iterable[str], cwd: Path, fault: str | None = None, timeout: float = 240,
            ) -> subprocess.CompletedProcess:
    """``python -m blockkd ARGS`` in ``cwd`` (``fault``: the BLOCKKD_FAULT hook, see engine/runtime.py)."""
    extra = {"BLOCKKD_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, "-m", "blockkd", *map(str, args)], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, timeout=timeout)


def cli_here(args: Iterable[str], cwd: Path) -> subprocess.CompletedProcess:
    """``blockkd ARGS`` run in this process (no torch import to pay) with its exit status and output
    captured like a subprocess's: for the runs whose process boundary does not matter (resumes)."""
    from blockkd import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(map(str, args)))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def parallel(jobs: dict[str, Any], fn) -> dict[str, Any]:
    """``{name: fn(job)}``, two at a time."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(zip(jobs, pool.map(fn, jobs.values())))


def snapshot(run: Path, names: Iterable[str] = ("last", "last.prev", "best")) -> dict[str, dict[str, bytes]]:
    """Every byte of the given checkpoint folders (absent folders map to {})."""
    return {n: {p.name: p.read_bytes() for p in sorted((run / n).iterdir())} if (run / n).is_dir() else {}
            for n in names}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(obj: Any) -> Any:
    """Metrics or a summary without wall-clock/throughput fields (and without the run folder's path)."""
    if isinstance(obj, list):
        return [untimed(r) for r in obj]
    return {k: v for k, v in obj.items() if k not in TIMING and k != "run_dir"}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed command printed; fails the test on anything else."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]
