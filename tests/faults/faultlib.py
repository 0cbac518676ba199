"""Shared pieces of the reliability suite: tiny recipes, ``blockkd`` commands, file snapshots.

Why separate processes: a kill, a Ctrl-C or a crash must be observed the way a user meets it (exit
status, stderr, what is left on disk), so the tests run ``python -m blockkd ARGS``, each command in a
process of its own. Importing torch costs seconds per process, which the two-core CI cannot pay forty
times, so commands come from a fork server (:class:`Commands`): a fresh interpreter that has imported
blockkd forks one child per command, and the child runs ``python -m blockkd``'s ``__main__`` with its
own argv, working directory, environment, stdout/stderr and exit status. Two servers run side by side.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import io
import json
import os
import queue
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

from helpers import with_changes


# blockkd (the flagship method) from a random resnet14 teacher into a resnet8 on 16x16 synthetic data:
# 4 steps per epoch, deterministic on the CPU. whole_batch_stones=1 cuts each batch into the shallow stones'
# shares with torch's RNG, so an exact resume also proves the RNG state is restored; the milestone makes the
# scheduler state matter.
TINY: dict[str, Any] = {
    "model": {"name": "resnet8"},
    "teacher": {"name": "resnet14", "allow_random": True},
    "method": {"name": "blockkd", "options": {"whole_batch_stones": 1}},
    "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 256, "test_size": 64,
             "batch_size": 64, "eval_batch_size": 64},
    "optim": {"lr": 0.1},
    "schedule": {"name": "multistep", "milestones": [2]},
    "train": {"epochs": 3, "device": "cpu", "deterministic": True, "amp": "off"},
    "output": {"dir": "runs", "name": "r", "progress": False, "tensorboard": False, "plot": False},
}


def recipe(**dotted: Any) -> dict:
    """A copy of TINY with ``section__key=value`` changes (``method__options__gamma=2``)."""
    return with_changes(copy.deepcopy(TINY), **dotted)


def write_recipe(path: Path, **dotted: Any) -> Path:
    """``recipe(**dotted)`` as a YAML file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(**dotted), sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    """The environment of a ``blockkd`` subprocess: one thread (two run side by side), no fault unless asked."""
    base = {k: v for k, v in os.environ.items() if k != "BLOCKKD_FAULT"}
    return {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


_SERVER = r"""
import json, os, runpy, signal, sys, tempfile, time, traceback
import blockkd.cli, blockkd.engine  # the slow imports (torch, torchvision), paid once per server
BASE_ENV = dict(os.environ)

def child(job, out, err):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update({**BASE_ENV, **job["env"]})
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0), os.dup2(out, 1), os.dup2(err, 2)
    sys.argv = ["blockkd", *job["args"]]
    try:  # what `python -m blockkd ARGS` does, down to the traceback and status of an uncaught exception
        runpy.run_module("blockkd", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    job = json.loads(line)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            try:
                child(job, out.fileno(), err.fileno())
            finally:
                os._exit(70)
        deadline, timed_out = time.monotonic() + job["timeout"], False
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline and not timed_out:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.02)
        out.seek(0), err.seek(0)
        reply = {"returncode": os.waitstatus_to_exitcode(done[1]), "timed_out": timed_out,
                 "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}
    print(json.dumps(reply), flush=True)
"""


class ForkServer:
    """One fork server (see the module docstring): ``run`` is ``subprocess.run`` for ``blockkd`` commands."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env())

    def run(self, args: Iterable[Any], cwd: Path, fault: str | None = None, timeout: float = 240,
            ) -> subprocess.CompletedProcess:
        args = list(map(str, args))
        job = {"args": args, "cwd": str(cwd), "timeout": timeout,
               "env": {"BLOCKKD_FAULT": fault} if fault else {}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (status {self.proc.wait()})")
        reply = json.loads(line)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(["blockkd", *args], timeout, reply["stdout"], reply["stderr"])
        return subprocess.CompletedProcess(["blockkd", *args], reply["returncode"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        self.proc.kill()  # nothing to flush: every command ran in a child that has exited
        self.proc.wait()


class Commands:
    """``blockkd`` commands, each in its own process, two at a time (two fork servers)."""

    def __init__(self, servers: int = 2) -> None:
        self.idle: queue.Queue[ForkServer] = queue.Queue()
        for _ in range(servers):
            self.idle.put(ForkServer())
        self.servers = servers

    def run(self, args: Iterable[Any], cwd: Path, fault: str | None = None, timeout: float = 240,
            ) -> subprocess.CompletedProcess:
        server = self.idle.get()
        try:
            return server.run(args, cwd, fault, timeout)
        finally:
            self.idle.put(server)

    def run_many(self, jobs: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess]:
        """``{name: run(*job)}`` for ``job = (args, cwd[, fault])``, all servers busy at once."""
        return parallel(jobs, lambda job: self.run(*job))

    def close(self) -> None:
        for _ in range(self.servers):
            self.idle.get().close()


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


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed command printed; fails the test on anything else."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> str:
    """stderr of ``proc`` up to the first line containing ``text``."""
    seen, deadline = "", time.monotonic() + timeout
    while text not in seen:
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before {text!r}:\n{seen}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{seen}"
        if select.select([proc.stderr], [], [], 1.0)[0]:
            seen += proc.stderr.readline()
    return seen
