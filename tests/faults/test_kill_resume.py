"""Guarantee 1: a run killed with SIGKILL at any point resumes with --resume and ends bit-identical to an
uninterrupted run of the same seed (metrics, summary, student + connector weights, best/).

The kills happen in ``blockkd train`` processes through the BLOCKKD_FAULT hook; the reference and the
resumes run in this process (cheaper: no torch import), which also shows that nothing but the run
folder carries state from the killed process to the resumed one.
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from faultlib import cli_here, write_recipe
from helpers import rows, untimed


def _epoch(folder: Path) -> int | None:
    meta = folder / "meta.json"
    return json.loads(meta.read_text())["epoch"] if meta.is_file() else None


# name -> (BLOCKKD_FAULT spec, what the kill must have left on disk). 4 steps per epoch, 3 epochs;
# epoch 1 is always a new best, so a kill after last/ of epoch 1 lands before best/ is written.
KILLS = {
    "mid-epoch-1": ("step:step=1", lambda run: not (run / "last").exists()),
    "mid-epoch-2": ("step:step=6", lambda run: _epoch(run / "last") == 1),
    "writing-last": ("checkpoint_write:folder=last,epoch=2",
                     lambda run: (run / ".last.tmp").is_dir() and _epoch(run / "last") == 1),
    "renaming-last": ("checkpoint_rename:folder=last,epoch=2",  # last/ moved aside, the new one not in place
                      lambda run: not (run / "last").exists() and _epoch(run / "last.prev") == 1),
    "after-rename-before-best": ("checkpoint_renamed:folder=last,epoch=1",
                                 lambda run: _epoch(run / "last") == 1 and not (run / "best").exists()),
    "after-last-epoch": ("checkpoint_renamed:folder=last,epoch=3",
                         lambda run: _epoch(run / "last") == 3 and not (run / "summary.json").exists()),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, commands):
    """name -> (the killed process, its kill-state check, the resumed run); and the reference run folder."""
    root = tmp_path_factory.mktemp("kill")
    for name in KILLS:
        write_recipe(root / name / "r.yaml")
    killed = commands.run_many({name: (["train", "r.yaml"], root / name, fault) for name, (fault, _) in KILLS.items()})
    results = {}
    for name, (_, check) in KILLS.items():
        run = root / name / "runs" / "r"
        results[name] = (killed[name], check(run), cli_here(["train", "r.yaml", "--resume"], root / name))
    write_recipe(root / "reference" / "r.yaml")
    reference = cli_here(["train", "r.yaml"], root / "reference")
    assert reference.returncode == 0, reference.stderr
    return root, results


@pytest.mark.parametrize("name", list(KILLS))
def test_killed_run_resumes_exactly(outcomes, name):
    root, results = outcomes
    ref = root / "reference" / "runs" / "r"
    killed, state_ok, resumed = results[name]
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)  # the hook fired
    assert state_ok, "the kill did not leave the state this scenario is about"
    assert resumed.returncode == 0, resumed.stderr
    run = root / name / "runs" / "r"
    # the killed run's lock record is stale (the kernel dropped its flock): reported, taken over, released
    assert "ended without releasing it (killed?); taking over" in (run / "train.log").read_text()
    assert (run / "run.lock").read_text() == ""
    assert untimed(rows(run)) == untimed(rows(ref))
    assert [r["epoch"] for r in rows(run)] == [1, 2, 3]
    summary, ref_summary = (json.loads((r / "summary.json").read_text()) for r in (run, ref))
    assert untimed(summary) == untimed(ref_summary)
    for folder in ("last", "best"):
        weights = (run / folder / "weights.safetensors").read_bytes()
        assert weights == (ref / folder / "weights.safetensors").read_bytes(), folder
        assert _epoch(run / folder) == _epoch(ref / folder), folder
    assert b'"connectors.' in (run / "last" / "weights.safetensors").read_bytes()[:8192]  # distiller state too
    assert not list(run.glob(".*.tmp")), "a temporary checkpoint folder was left behind"
    if name == "after-rename-before-best":  # later epochs may overwrite best/ anyway: check the repair itself
        log = (run / "train.log").read_text()
        assert "runs/r/best did not hold the best epoch (1); restored it from last/" in log
