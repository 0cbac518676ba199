"""Training runs on the Fashion-MNIST recipes, shared by ``accuracy.py`` and ``tune.py``.

Why a module of its own: both benchmarks train the same recipes the same way (the cached teacher of
``blockkd demo``, then each student with a seed and overrides); neither imports the other's internals.
"""
from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from blockkd import config, methods
from blockkd.demo import recipes_dir, train_or_reuse_teacher  # noqa: F401  (re-exported for the scripts)
from blockkd.engine import train
from blockkd.errors import BlockKDError

import common

METHODS = ["ce", "kd", "dkd", "blockkd", "blockkd-lite"]
# The order of a leaderboard's entries (a recipe's name: a method, or a method with options such as kd-ls):
# the student alone, logit methods, feature and relation methods, Block-KD. Recipes not named here follow,
# sorted.
ORDER = ["ce", "kd", "kd-ls", "dkd", "dkd-ls", "dist", "fitnet", "at", "sp", "rkd", "pkt", "nst", "kdsvd", "vid",
         "crd", "ofd", "reviewkd", "blockkd", "blockkd-lite"]
NOT_STUDENTS = {"base", "pair", "teacher"}  # the recipe folders' shared layers, not entries
# epochs / train_subset None: the recipes' own (configs/fashion_mnist/base.yaml).
DEFAULTS: dict[str, Any] = {"seeds": [0, 1, 2, 3, 4], "methods": METHODS, "epochs": None, "train_subset": None}
# --quick: the whole pipeline in seconds (the smoke test); add --val N to keep evaluation small too.
QUICK: dict[str, Any] = {"seeds": [0], "methods": ["ce", "blockkd"], "epochs": 1, "train_subset": 128}
QUICK_TEACHER = ["train.epochs=1", "data.batch_size=64"]
# What may differ between the runs of one recipe without making it another recipe.
RUN_KEYS = ("output", "train.seed", "train.device", "teacher.checkpoint")


# ----------------------------------------------------------------------------------------- runs
def overrides(s: dict[str, Any], quick: bool) -> tuple[list[str], list[str]]:
    """(teacher's, students') overrides. Both see the same images (the subset, and never the held-out
    ones); ``--epochs`` changes the students' schedule only, the teacher keeps its recipe's."""
    shared = ["output.tensorboard=false", "output.plot=false"]
    if s["train_subset"] is not None:
        shared.append(f"data.train_subset={s['train_subset'] or 'null'}")  # 0: all images
    shared += [f"data.val_split={s['val']}"] if s["val"] else []
    shared += [f"train.device={s['device']}"] if s["device"] else []
    teacher = shared + (QUICK_TEACHER if quick else [])
    students = shared + ([f"train.epochs={s['epochs']}"] if s["epochs"] else []) + (QUICK_TEACHER[1:] if quick else [])
    return teacher, students


def entries_in(folder: Path) -> list[str]:
    """The student recipes of ``folder`` (``<name>.yaml`` but the shared layers), in leaderboard order."""
    return ordered(p.stem for p in folder.glob("*.yaml") if p.stem not in NOT_STUDENTS)


def ordered(names) -> list[str]:
    names = set(names)
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def side_by_side(fn: Callable[..., Any], calls: list[tuple], jobs: int, threads: int | None = None) -> list[Any]:
    """``[fn(*c) for c in calls]``, ``jobs`` at a time in fresh processes of ``threads`` torch threads each
    (default: cores / jobs). Why: the small CPU models use two cores poorly, two runs side by side finish
    sooner than one after the other. ``jobs`` 1 runs here, in order, with the caller's threads."""
    if jobs <= 1:
        return [(_with_threads(threads, fn, c) if threads else fn(*c)) for c in calls]
    threads = threads or common.threads_per_job(jobs)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no thread pools inherited by a fork
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_die_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(_with_threads, threads, fn, c) for c in calls]
        return [f.result() for f in futures]


def _die_with_parent(parent: int) -> None:
    """In a worker: exit once the benchmark that started it is gone. A pool's workers outlive a kill of their
    parent and would go on training unseen, holding the cores and their run folders; the runs' checkpoints
    are whole at any instant, so ``--resume`` goes on from them."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _with_threads(threads: int, fn: Callable[..., Any], args: tuple) -> Any:
    import torch

    torch.set_num_threads(threads)
    return fn(*args)


def history_of(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_student(folder: Path, method: str, seed: int, extra: list[str], teacher_dir: Path, runs: Path,
                name: str | None = None, resume: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the recipe ``folder/<method>.yaml`` with ``seed``; returns (its resolved config, its per-run
    result). ``method`` is the recipe's name (kd-ls is the kd method with options).

    ``name`` (default: the recipe's) names the run folder ``<name>-seed<seed>`` under ``runs``. ``resume``:
    a run already in that folder with the same recipe (:func:`same_recipe`) is reused if it finished and
    continued from its last checkpoint if not (a benchmark stopped by a deadline or a killed session goes on
    where it stopped); a run of another recipe is trained again."""
    uses_teacher = methods.needs_teacher(config.load(folder / f"{method}.yaml", extra).method.name)
    run_name = f"{name or method}-seed{seed}"
    cfg = config.load(folder / f"{method}.yaml", extra + [
        f"train.seed={seed}", f"output.dir={runs}", f"output.name={run_name}",
        *([f"teacher.checkpoint={teacher_dir}"] if uses_teacher else [])])
    print(f"\n== {method}, seed {seed}: {cfg.model.name}" + (f" <- {cfg.teacher.name}" if uses_teacher
                                                                    else ""), flush=True)
    if resume and same_recipe(Path(runs) / run_name, cfg.to_dict()):
        done = finished_run(Path(runs), name or method, seed)
        if done is not None:
            print(f"finished before in {Path(runs) / run_name}: reused", flush=True)
            return done
        return cfg.to_dict(), result_of(train(cfg, resume=True), method, seed)
    summary = train(cfg, overwrite=True)
    return cfg.to_dict(), result_of(summary, method, seed)


def same_recipe(run: Path, cfg: dict[str, Any]) -> bool:
    """Was the run in folder ``run`` started from the recipe ``cfg`` (its saved config equal but for
    ``RUN_KEYS``)? False where there is no run."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return False
    try:
        before = config.load(saved).to_dict()
    except BlockKDError:  # a config today's blockkd no longer takes (a removed option): another recipe
        return False
    # compared as values, not by fingerprint: the saved YAML may write a default 0 as 0.0
    recipe = lambda d: {k: v for k, v in config.flat_keys(d).items()  # noqa: E731
                        if not any(k == i or k.startswith(i + ".") for i in RUN_KEYS)}
    return recipe(before) == recipe(cfg)


def result_of(summary: dict[str, Any], method: str, seed: int) -> dict[str, Any]:
    """The per-run result the reports use, from a finished run's ``summary.json`` and its metrics."""
    history = history_of(summary["run_dir"])
    heads = {k.removeprefix("test_top1_"): v for k, v in summary["last"].items() if k.startswith("test_top1_")}
    return {"method": method, "seed": seed, "last_top1": summary["last"]["test_top1"], "last_heads": heads,
            "last_epoch": summary["last"]["epoch"], "best_top1": summary["best"]["test_top1"],
            "best_epoch": summary["best"]["epoch"], "wall_time_s": summary["wall_time_s"],
            "images_per_s": summary["images_per_s"], "run_dir": summary["run_dir"],
            "curve": [[r["epoch"], r["test_top1"]] for r in history if r.get("test_top1") is not None]}


def finished_run(runs: Path, method: str, seed: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, result) of the run ``runs/<method>-seed<seed>`` if it finished (its summary.json is written
    last), else None: how a benchmark stopped at a deadline is still reported from what it finished."""
    run = runs / f"{method}-seed{seed}"
    if not (run / "summary.json").is_file():
        return None
    summary = json.loads((run / "summary.json").read_text())
    summary["run_dir"] = str(run)
    return config.load(run / "config.yaml").to_dict(), result_of(summary, method, seed)



def pm(stat: dict[str, Any]) -> str:
    """"mean ± std" of a ``common.mean_std``; one value alone has no spread to show (not "± 0.00")."""
    if stat.get("n") == 1:
        return f"{stat['mean']:.2f}"
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def recipe_folder(given: str | None) -> Path:
    """``--recipes`` as an absolute folder holding a teacher.yaml (relative: to the working directory, else
    to the repository); none given: ``configs/fashion_mnist`` (``blockkd.demo.recipes_dir``)."""
    if given is None:
        return recipes_dir()
    folder = Path(given).expanduser()
    if not folder.is_absolute() and not folder.is_dir() and (common.REPO / folder).is_dir():
        folder = common.REPO / folder
    folder = folder.resolve()
    if not (folder / "teacher.yaml").is_file():
        raise BlockKDError(f"--recipes {given}: no teacher.yaml in {folder}")
    return folder


def shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the reports name recipes), else as it is."""
    try:
        return path.resolve().relative_to(common.REPO).as_posix()
    except ValueError:
        return str(path)
