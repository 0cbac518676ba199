"""One run folder, one owner: a second ``train`` (fresh, ``--resume`` or ``--overwrite``) into a folder a
running training holds is refused in one line naming the holder, and the first run's files stay its own."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import yaml
from faultlib import env, wait_for_line, write_recipe
from helpers import rows

from blockkd.engine import run_folder
from blockkd.engine.checkpoint import load_checkpoint
from blockkd.errors import BlockKDError

HOLD = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "then"}).encode())
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``runs/r/run.lock`` (started with only config.yaml in the folder)."""
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("a failed start's config\n")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run / run_folder.LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "held\n"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
def test_a_held_folder_is_refused_and_untouched(holder, flags):
    """Even the "failed start" repair (a folder with only config.yaml) leaves a held folder alone."""
    run, proc = holder
    with pytest.raises(BlockKDError) as e:
        run_folder.prepare(run, resume=flags.get("resume", False), overwrite=flags.get("overwrite", False))
    assert f"is in use by pid {proc.pid} on host {socket.gethostname()} since then" in str(e.value)
    assert (run / "config.yaml").read_text() == "a failed start's config\n"


def test_lock_released_and_a_dead_holders_record_is_stale(tmp_path):
    run = tmp_path / "r"
    first = run_folder.prepare(run, resume=False, overwrite=False)
    record = json.loads((run / run_folder.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(BlockKDError, match=f"in use by pid {os.getpid()}"):  # a second owner, even in-process
        run_folder.RunLock(run).acquire()
    first.release()
    assert (run / run_folder.LOCK_FILE).read_text() == ""  # released: no record, no stale report
    with run_folder.RunLock(run) as again:
        assert again.stale is None
    # a holder killed with the lock held leaves its record; the kernel dropped the flock itself
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / run_folder.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "since": "before"}))
    assert run_folder.alive({"pid": dead.pid, "host": socket.gethostname()}) is False
    lock = run_folder.prepare(run, resume=True, overwrite=False)
    try:
        assert lock.stale == {"pid": dead.pid, "host": socket.gethostname(), "since": "before"}
    finally:
        lock.release()


def test_second_training_into_a_busy_folder_exits_2_and_the_first_completes(tmp_path, commands):
    write_recipe(tmp_path / "a.yaml")
    write_recipe(tmp_path / "b.yaml", optim__lr=0.01, train__epochs=1)
    first = subprocess.Popen([sys.executable, "-m", "blockkd", "train", "a.yaml"], cwd=tmp_path,
                             env=env(BLOCKKD_FAULT="pause@step:step=1"),  # epoch 1: no checkpoint yet
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(first, "fault point step reached", timeout=180)
        run = tmp_path / "runs" / "r"
        before = {p.name for p in run.iterdir()}
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = commands.run(["train", "b.yaml", *extra], tmp_path)
            assert second.returncode == 2, second.stderr
            lines = second.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: run folder runs/r is in use by "
                                                           f"pid {first.pid} on host {socket.gethostname()} since ")
            assert {p.name for p in run.iterdir()} == before
        os.kill(first.pid, signal.SIGUSR1)  # let the first run go on
        _, stderr = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.1  # a.yaml's, not b.yaml's
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert load_checkpoint(run / "last").meta["epoch"] == 3
    assert (run / run_folder.LOCK_FILE).read_text() == ""  # released at the end
    again = commands.run(["train", "b.yaml", "--overwrite"], tmp_path)  # free now: replaced as asked
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in rows(run)] == [1]
