"""Distillation across architecture families: every pair folder of configs/fashion_mnist_hetero, one table.

    python benchmarks/hetero.py [--recipes configs/fashion_mnist_hetero] [--seeds 0 1 2] [--methods ...]
                                [--pairs PAIR ...] [--jobs N] [--resume] [--from-runs] [--append] [--quick]
                                [--render]
                                [--out results/hetero.md]

Each pair folder (``<teacher>-<student>/``, a recipe folder of its own) is run by ``benchmarks/accuracy.py``
(no second training loop): its JSON, table and plot go to ``<out stem>/<pair>.json|.md|.png``. This file then
writes ``--out`` from every pair's report there (those not run now included, so pairs run in different
sessions share one table): per pair and method, the mean ± std over seeds of the last-epoch test top-1, and
the largest drop of any run's test top-1 from one epoch to the next (issue 35: a drop above 10 points is a
collapse). ``--resume``: accuracy.py's (finished runs reused, interrupted ones continued: the benchmark takes
hours on a CPU and goes on where a stop left it); ``--from-runs``: accuracy.py's (train nothing, report
the runs finished so far; a pair with none is left out). ``--append``: accuracy.py's (the runs already in each
pair's report are kept, those named now added: run folders stay on the machine that trained them, so runs
finished elsewhere join by their report; a teacher retrained from the same recipe is recorded beside the
earlier one). ``--quick``: accuracy.py's smoke test (tiny subset, 1 epoch, 1 seed) on every pair.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy  # noqa: E402
import students  # noqa: E402
from common import REPO, fmt, markdown_table, runs_beside, write_text  # noqa: E402

DEFAULT_METHODS = ["ce", "kd", "dkd", "reviewkd", "dist", "blockkd"]


def largest_drop(curve) -> float:
    """The largest fall of test top-1 from one epoch to the next (0 if it never falls)."""
    values = [v for _, v in sorted(curve)]
    return max([0.0] + [a - b for a, b in zip(values, values[1:])])


def render(reports: dict[str, dict]) -> str:
    rows = []
    for pair, r in reports.items():
        for k, (m, v) in enumerate(r["methods"].items()):
            drops = [largest_drop(run["curve"]) for run in r["runs"] if run["method"] == m]
            top1 = v["last_top1"]
            rows.append([pair if k == 0 else "", m, students.pm(top1),
                         str(len(v["seeds"])), fmt(max(drops), ".1f"),
                         " / ".join(fmt(t["last_top1"]) for t, _ in accuracy.served(r)) if k == 0 else ""])
    table = markdown_table(["pair", "method", "test top-1 (last epoch)", "seeds", "largest epoch drop",
                            "teacher"], rows)
    return ("# Distillation across architecture families (Fashion-MNIST)\n\n"
            "Each pair's rows come from its own report beside this file (setup, curves, every run, and the "
            "commands that ran them); `python benchmarks/hetero.py --render` writes this table again from those "
            "reports, and `python benchmarks/hetero.py --jobs 2 --resume` trains every run of every pair (hours "
            "on a CPU; a stopped one goes on where it stopped). Every recipe is its "
            "configs/fashion_mnist one with the pair's models and the student family's learning rate "
            "(configs/fashion_mnist_hetero/README.md). \"largest epoch drop\": the largest fall of a run's test "
            "top-1 from one epoch to the next, over the seeds (a collapse: above 10 points). \"teacher\": its "
            "last-epoch test top-1; two where it was retrained between sessions (the pair's report says which "
            "runs each taught).\n\n" + table + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default="configs/fashion_mnist_hetero", help="folder of pair folders")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="accuracy.py --quick on every pair: the smoke test")
    p.add_argument("--resume", action="store_true", help="accuracy.py --resume: reuse the finished runs, continue "
                   "the interrupted ones")
    p.add_argument("--from-runs", action="store_true", help="accuracy.py --from-runs: train nothing, table the "
                   "runs finished so far (a pair with none is left out)")
    p.add_argument("--append", action="store_true", help="accuracy.py --append: keep the runs already in each "
                   "pair's report and add these")
    p.add_argument("--pairs", nargs="+", metavar="PAIR", help="only these pair folders (default: every one)")
    p.add_argument("--render", action="store_true", help="train nothing: the table again from the pairs' JSON "
                   "reports already beside --out")
    p.add_argument("--out", default="results/hetero.md", help="the combined table; each pair's report beside it")
    args = p.parse_args(argv)
    folder = Path(args.recipes)
    folder = folder if folder.is_dir() else REPO / folder
    every = sorted(d.name for d in folder.iterdir() if (d / "teacher.yaml").is_file())
    pairs = [d for d in every if args.pairs is None or d in args.pairs]
    if not pairs:
        print(f"error: no pair folder (with a teacher.yaml) in {args.recipes} named {args.pairs or 'anything'}",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    reports = {}
    for pair in every:
        json_out = out.with_suffix("") / f"{pair}.json"
        if args.render or pair not in pairs:  # not run now: its report as it is, if it has one
            if json_out.is_file():
                reports[pair] = json.loads(json_out.read_text())
            continue
        cmd = ["--recipes", str(folder / pair), "--methods", *args.methods, "--jobs", str(args.jobs),
               "--out", str(json_out)] + (["--quick"] if args.quick else ["--seeds", *map(str, args.seeds)]) \
            + (["--resume"] if args.resume else []) + (["--from-runs"] if args.from_runs else []) \
            + (["--append"] if args.append else [])
        if args.from_runs and not any(runs_beside(json_out).glob("*/summary.json")):
            print(f"{pair}: no finished run yet, left out", flush=True)
            continue
        if accuracy.main(cmd) != 0:
            return 2
        reports[pair] = json.loads(json_out.read_text())
    if not reports:
        print(f"error: no pair report beside {out}", file=sys.stderr)
        return 2
    print(write_text(out, render(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
