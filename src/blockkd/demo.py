"""``blockkd demo``: the main job on the embedded default data (Fashion-MNIST, real data).

It trains a teacher (or reuses it from the cache), distills the same student with ``ce``, ``kd``, ``dkd``
and ``blockkd`` from the recipes in ``configs/fashion_mnist/``, and prints one table plus a PNG of the
test-accuracy curves. Everything here is plain calls of ``config.load`` and ``engine.train``: the demo
is a recipe runner, not a second training loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from . import config
from .engine import train
from .errors import BlockKDError
from .utils import atomic_write, cache_home

METHODS = ("ce", "kd", "dkd", "blockkd")
# --quick: a smoke run of the whole pipeline (a few hundred images, one epoch) in about a minute.
QUICK = ["data.train_subset=1024", "train.epochs=1", "data.batch_size=64"]


def recipes_dir() -> Path:
    """configs/fashion_mnist of the source tree (or $BLOCKKD_CONFIGS/fashion_mnist)."""
    root = Path(os.environ.get("BLOCKKD_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))
    folder = root / "fashion_mnist"
    if not (folder / "teacher.yaml").is_file():
        raise BlockKDError(f"demo recipes not found in {folder}; run from a source checkout or set BLOCKKD_CONFIGS")
    return folder


def _overrides(args) -> list[str]:
    extra = list(QUICK) if args.quick else []
    if args.epochs is not None:
        extra.append(f"train.epochs={args.epochs}")
    if args.device is not None:
        extra.append(f"train.device={args.device}")
    return extra


def local_inputs(cfg: config.Config) -> list[tuple[str, int, int]]:
    """The local files a teacher recipe starts from beyond its data (the path in its model name, such as a
    pre-trained ``hf.<folder>``; a tokenizer folder or file), as (path, size, modification time): pre-trained
    again, they make another teacher instead of reusing the one fine-tuned from the earlier weights (the cache is
    per machine, so the times are enough)."""
    name = cfg.model.name
    prefix = next((p for p in config.paths.PATH_PREFIXES if name.startswith(p)), None)
    named = [name[len(prefix):] if prefix else "", str(config.flat_keys(cfg.to_dict()).get("data.tokenizer") or "")]
    found = []
    for p in (Path(n).expanduser() for n in named if n):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
        found += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return found


def teacher_cache_dir(cfg: config.Config) -> Path:
    """The cache folder of the teacher ``cfg`` trains: one per distinct recipe and starting files."""
    # Keys that cannot change the teacher's weights do not make another teacher (diagnostics: logging only).
    key = config.fingerprint(cfg, ignore=("output", "train.device", "train.diagnostics_every"))
    inputs = local_inputs(cfg)
    if inputs:
        key += "-" + hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:8]
    return cache_home() / "demo" / f"teacher-{key}"


def train_or_reuse_teacher(folder: Path, extra: list[str]) -> tuple[Path, dict]:
    """Train the teacher once per distinct recipe and starting files; later demos reuse it from the cache."""
    cfg = config.load(folder / "teacher.yaml", extra)
    run = teacher_cache_dir(cfg)
    cfg = cfg.replace(output=dataclasses.replace(cfg.output, dir=str(run.parent), name=run.name))
    summary_file = run / "summary.json"
    if summary_file.is_file():
        print(f"teacher: reusing {run}")
        return run, json.loads(summary_file.read_text())
    print(f"teacher: training {cfg.model.name} (cached in {run})")
    return run, train(cfg, overwrite=True)


def run(args) -> int:
    """Run the demo; returns the exit status."""
    from .engine.plots import plot_comparison  # matplotlib is slow to import; only the demo's plot needs it

    folder, extra = recipes_dir(), _overrides(args)
    out = Path(args.out or "runs/demo")
    start = time.perf_counter()
    teacher_dir, teacher_summary = train_or_reuse_teacher(folder, extra)
    results: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        cfg = config.load(folder / f"{method}.yaml",
                          extra + [f"output.dir={out}", f"output.name={method}"]
                          + ([f"teacher.checkpoint={teacher_dir}"] if method != "ce" else []))
        print(f"\n== {method}: {cfg.model.name} " + (f"<- {cfg.teacher.name}" if method != "ce" else ""))
        results[method] = train(cfg, overwrite=True)
    table = format_table(teacher_summary, results)
    png = plot_comparison({m: out / m / "metrics.jsonl" for m in METHODS}, out / "demo.png")
    report = {"teacher": teacher_summary, "students": results, "minutes": (time.perf_counter() - start) / 60}
    atomic_write(out / "demo.json", json.dumps(report, indent=2, default=str))
    print("\n" + table)
    print(f"\ncurves: {png}\ntotal time: {report['minutes']:.1f} min")
    return 0


def format_table(teacher: dict, results: dict[str, dict]) -> str:
    """One row per model: last-epoch and best test top-1, gain over ``ce`` (last epoch), time."""
    ce_last = results["ce"]["last"]["test_top1"] if "ce" in results else None
    rows = [("model", "method", "top-1 last", "top-1 best", "gain vs ce", "time")]
    rows.append((teacher["model"], "teacher", f"{teacher['last']['test_top1']:.2f}",
                 f"{teacher['best']['test_top1']:.2f}", "", f"{teacher['wall_time_s'] / 60:.1f} min"))
    for method, s in results.items():
        last = s["last"]["test_top1"]
        gain = "" if method == "ce" or ce_last is None else f"{last - ce_last:+.2f}"
        rows.append((s["model"], method, f"{last:.2f}", f"{s['best']['test_top1']:.2f}", gain,
                     f"{s['wall_time_s'] / 60:.1f} min"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for method, s in results.items():  # a distiller's further heads: Block-KD's stepping-stones, their ensemble
        heads = {k.removeprefix("test_top1_"): v for k, v in s["last"].items() if k.startswith("test_top1_")}
        if heads:
            lines.append(f"{method} heads, last epoch top-1: " + ", ".join(f"{k} {v:.2f}" for k, v in heads.items()))
    return "\n".join(lines)
