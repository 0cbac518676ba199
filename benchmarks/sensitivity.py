"""How much Block-KD's validation top-1 moves when one option leaves its default: one-at-a-time sweeps.

    python benchmarks/sensitivity.py [--knobs alpha_beta gamma temperature connector warmup] [--seeds 0 1]
                                     [--method blockkd] [--recipes configs/fashion_mnist] [--jobs 2]
                                     [--val 10000] [--append] [--quick] [--out results/sensitivity.json]
    python benchmarks/sensitivity.py --render [--out results/sensitivity.json]   # .md and .png again

Why: users of every KD toolkit ask which knob to turn first; the answer is a measurement, not folklore. Each
knob is swept around the method's defaults *as they are when the command runs* (``blockkd.methods.defaults``),
every other knob pinned at its default, so the sweep stays right when the defaults change:

- ``alpha_beta``: α and β together, x0.5 and x2 (the task and distillation terms' weights);
- ``gamma``: γ (L_cross) off and x4 (0.05 and 0.2 when the default is 0);
- ``temperature``: T x0.5 and x2;
- ``connector``: every registered feature-map connector;
- ``warmup``: the stones' warm-up option (whatever the method names it) off and at twice its default; from a
  default of 0, a quarter and a half of the schedule (in the option's unit: epochs, or a fraction of training
  when its help says so).

Every run is ``tune.py``'s (``students.run_student``): the recipe ``--recipes/<method>.yaml`` (default
``configs/fashion_mnist/blockkd.yaml``) plus the knobs' ``method.options``, trained by ``blockkd.engine.train`` and
evaluated on ``--val`` images held out from the training set (the teacher never sees them), never the test
split. The defaults run once per seed and are every panel's marked point. Outputs: a table on stdout,
``--out`` (JSON), ``.md`` and ``.png`` (one panel per knob: val top-1 against the value, the default marked).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import students  # noqa: E402
import tune  # noqa: E402
from blockkd import config, methods  # noqa: E402
from blockkd.engine import runtime  # noqa: E402
from blockkd.errors import BlockKDError  # noqa: E402
from blockkd.methods.connectors import CONNECTORS  # noqa: E402
from common import (REPO, append_runs, machine_info, machine_line, markdown_table, mean_std,  # noqa: E402
                    reproduce_line, runs_beside, section, text_table, threads_per_job, write_json, write_text)

KNOBS = ["alpha_beta", "gamma", "temperature", "connector", "warmup"]
TITLES = {"alpha_beta": "α = β (task and distillation weights)", "gamma": "γ (L_cross weight)",
          "temperature": "T (temperature)", "connector": "connector", "warmup": "stones' warm-up"}
DEFAULT = "defaults"  # the run of the method's defaults, shared by every knob
# --quick: the first non-default value of each knob, one seed, 1 epoch on 128 images (the smoke test)
QUICK: dict[str, Any] = {"seeds": [0], "val": 300, "points": 1}


def warmup_key(defaults: dict[str, Any]) -> str | None:
    """The option that ramps the stones in (``stone_warmup`` today): the first option named ``*warmup*``."""
    return next((k for k in defaults if "warmup" in k), None)


def warmup_in_fraction(method: str, key: str) -> bool:
    """Whether the warm-up option counts in fractions of training rather than epochs (its help says so)."""
    return any(name == key and "fraction" in text for name, _, _, text in methods.describe(method))


def grid(method: str, defaults: dict[str, Any], epochs: int) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """knob -> its non-default points, each (label, method.options): values relative to ``defaults``."""
    def scaled(value: float, factors: tuple[float, ...]) -> list[float]:
        return [round(value * f, 6) for f in factors]

    a, b, g, t = (defaults[k] for k in ("alpha", "beta", "gamma", "temperature"))
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "alpha_beta": [(f"x{f:g}", {"alpha": round(a * f, 6), "beta": round(b * f, 6)}) for f in (0.5, 2.0)],
        "gamma": [(f"{v:g}", {"gamma": v}) for v in (scaled(g, (0.0, 4.0)) if g else [0.05, 0.2])],
        "temperature": [(f"{v:g}", {"temperature": v}) for v in scaled(t, (0.5, 2.0))],
        "connector": [(c, {"connector": c}) for c in CONNECTORS.names() if c != defaults["connector"]],
    }
    key = warmup_key(defaults)
    if key is not None:
        w = defaults[key]
        if w:
            values = [0.0, min(2 * w, 1.0) if warmup_in_fraction(method, key) else 2 * w]
        else:
            values = [0.25, 0.5] if warmup_in_fraction(method, key) else [round(epochs / 4, 3), round(epochs / 2, 3)]
        out["warmup"] = [(f"{v:g}", {key: v}) for v in values if v != w]
    return out


def swept_keys(defaults: dict[str, Any]) -> list[str]:
    """The options the sweep sets on every run (at their defaults unless the run's knob changes them)."""
    return ["alpha", "beta", "gamma", "temperature", "connector", *filter(None, [warmup_key(defaults)])]


def run_point(name: str, options: dict[str, Any], seed: int, extra: list[str], teacher_dir: str, runs: str,
              folder: str, method: str) -> dict[str, Any]:
    """One training (in a worker process): the recipe with every swept option given (``options``)."""
    _, result = students.run_student(Path(folder), method, seed, extra + tune.option_overrides(options),
                                     Path(teacher_dir), Path(runs), name=tune.slug(name))
    return {**result, "point": name, "options": options}


def points_of(knobs: list[str], method: str, defaults: dict[str, Any], epochs: int, per_knob: int | None
              ) -> list[tuple[str, str | None, str, dict[str, Any]]]:
    """(run name, knob, label, method.options) of every run: the defaults first, then each knob's points."""
    pinned = {k: defaults[k] for k in swept_keys(defaults)}
    out = [(DEFAULT, None, "default", pinned)]
    sweeps = grid(method, defaults, epochs)
    for knob in knobs:
        for label, change in sweeps.get(knob, [])[:per_knob]:
            out.append((f"{knob} {label}", knob, label, {**pinned, **change}))
    return out


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per knob: its points (the default among them, in value order) with mean ± std val top-1 over seeds."""
    runs, defaults = report["runs"], report["setup"]["defaults"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_name.setdefault(r["point"], []).append(r)
    if DEFAULT not in by_name:
        return {}
    stat = lambda rs: {"seeds": [r["seed"] for r in rs], "last_top1": mean_std([r["last_top1"] for r in rs]),  # noqa: E731
                       "best_top1": mean_std([r["best_top1"] for r in rs]),
                       "wall_time_s": mean_std([r["wall_time_s"] for r in rs])}
    out = {}
    for knob in KNOBS:
        if not any(r.get("knob") == knob for r in runs):
            continue
        points = [{"label": "default", "default": True, "options": by_name[DEFAULT][0]["options"],
                   **stat(by_name[DEFAULT])}]
        for name in dict.fromkeys(r["point"] for r in runs if r.get("knob") == knob):
            rs = by_name[name]
            points.append({"label": rs[0]["label"], "default": False, "options": rs[0]["options"], **stat(rs)})
        for p in points:
            p["value"] = value_of(knob, p["options"], defaults)
            p["vs_default"] = p["last_top1"]["mean"] - points[0]["last_top1"]["mean"]
        numeric = all(isinstance(p["value"], (int, float)) for p in points)
        out[knob] = sorted(points, key=lambda p: p["value"]) if numeric else points
    return out


def value_of(knob: str, options: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """The x of a point: α (= β's share) for alpha_beta, the option's value otherwise."""
    if knob == "alpha_beta":
        return options["alpha"]
    if knob == "warmup":
        return options[warmup_key(defaults)]
    return options[knob]


def shown_value(knob: str, p: dict[str, Any]) -> str:
    if knob == "alpha_beta":
        return f"α {p['options']['alpha']:g}, β {p['options']['beta']:g}"
    return f"{p['value']:g}" if isinstance(p["value"], (int, float)) else str(p["value"])


def table(knobs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["knob", "value", "seeds", "val top-1, last", "val top-1, best", "vs default (last)", "time/run"]
    rows = []
    for knob, points in knobs.items():
        for p in points:
            value = shown_value(knob, p) + (" (default)" if p["default"] else "")
            rows.append([knob, f"**{value}**" if p["default"] else value, len(p["seeds"]), students.pm(p["last_top1"]),
                         students.pm(p["best_top1"]), "" if p["default"] else f"{p['vs_default']:+.2f}",
                         f"{p['wall_time_s']['mean'] / 60:.1f} min"])
    return header, rows


def plot(report: dict[str, Any], path: Path) -> Path:
    """One panel per knob: mean val top-1 (± std over seeds) against the knob's value, the default marked."""
    knobs = report["knobs"]
    fig = Figure(figsize=(3.6 * max(1, len(knobs)), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(1, len(knobs)), sharey=True, squeeze=False)[0]
    for ax, (knob, points) in zip(axes, knobs.items()):
        xs = list(range(len(points)))
        means = [p["last_top1"]["mean"] for p in points]
        ax.errorbar(xs, means, yerr=[p["last_top1"]["std"] for p in points], marker="o", capsize=3, lw=1.2)
        k = next(i for i, p in enumerate(points) if p["default"])
        ax.plot([k], [means[k]], marker="*", ms=16, color="tab:red", ls="", label="default", zorder=3)
        ax.axhline(means[k], color="tab:red", lw=0.8, ls=":")
        labels = [shown_value(knob, p).replace("α ", "").split(",")[0] for p in points]
        ax.set_xticks(xs, labels, rotation=30 if knob == "connector" else 0,
                      ha="right" if knob == "connector" else "center",
                      fontsize=7 if knob == "connector" else 9)
        unit = report["setup"].get("warmup_unit")
        ax.set_title(TITLES[knob] + (f" ({unit})" if knob == "warmup" and unit else ""), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%), last epoch, mean ± std")
    axes[0].legend(fontsize=8, loc="lower left")
    u = report["setup"]
    fig.suptitle(f"{u['method']} sensitivity, one knob at a time around its defaults: {u['recipes']}, "
                 f"{u['val_split']} validation images, {len(u['seeds'])} seed(s)", fontsize=10)
    fig.savefig(path, dpi=100)
    return path


def render(report: dict[str, Any], out: Path) -> tuple[str, Path, Path]:
    """The setup sentence, the .md and the .png beside ``out``, from a sensitivity report."""
    u, t = report["setup"], report["teacher"]
    shown = ", ".join(f"{k} {v}" for k, v in u["defaults"].items())
    text = (f"{u['method']} on {u['recipes']} (teacher {t['model']} at {t['last_top1']:.2f} test top-1), "
            f"{u['epochs']} epochs; validation top-1 on {u['val_split']} images held out from the training set (the "
            f"test split is unused), last epoch, mean ± std over seeds {', '.join(map(str, u['seeds']))}; "
            f"{tune.parallelism(report)}. One knob changes at a time; every other stays at the method's defaults "
            f"when the sweep ran ({shown}); the default's runs are shared by every knob.")
    png = plot(report, out.with_suffix(".png"))
    try:
        image = png.resolve().relative_to(REPO).as_posix()
    except ValueError:
        image = png.name
    md = write_text(out.with_suffix(".md"), section(f"Sensitivity of {u['method']} (validation split)", [
        text, markdown_table(*table(report["knobs"])), f"![val top-1 per knob]({image})",
        f"Machine: {machine_line(report['machine'])}; {report['minutes']:.0f} min in all. "
        + reproduce_line(report["invocations"])]))
    return text, md, png


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--knobs", nargs="+", choices=KNOBS, help="knobs to sweep (default all)")
    p.add_argument("--method", default="blockkd", choices=["blockkd", "blockkd-lite"],
                   help="the method (and recipe) swept (default blockkd)")
    p.add_argument("--recipes", metavar="DIR", help="folder of the recipes (default configs/fashion_mnist)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1)")
    p.add_argument("--val", type=int, help="images held out from the training set for evaluation (default 10000)")
    p.add_argument("--epochs", type=int, help="students' epochs (default: the recipes')")
    p.add_argument("--jobs", type=int, default=2, help="trainings run side by side (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per training (default: cores / jobs)")
    p.add_argument("--append", action="store_true", help="keep the runs already in --out (other knobs or seeds, "
                   "same defaults) and report all of them")
    p.add_argument("--render", action="store_true", help="train nothing: rewrite the .md and .png from --out")
    p.add_argument("--quick", action="store_true", help="one point per knob, 1 seed, 1 epoch on 128 images: the "
                   "smoke test")
    p.add_argument("--out", default="results/sensitivity.json", help="JSON output; .md and .png go beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:
        _, md, png = render(json.loads(out.read_text()), out)
        print(f"{md}, {png}")
        return 0
    quick = QUICK if args.quick else {}
    seeds = args.seeds or quick.get("seeds") or [0, 1]
    val = args.val or quick.get("val") or 10000
    s = {**students.DEFAULTS, **(students.QUICK if args.quick else {}), "val": val, "device": None}
    if args.epochs is not None:
        s["epochs"] = args.epochs
    started = time.perf_counter()
    teacher_extra, extra = students.overrides(s, args.quick)
    extra.append("output.progress=false")  # side-by-side runs: one line per epoch, no live bars
    defaults = methods.defaults(args.method)
    pinned = {k: defaults[k] for k in swept_keys(defaults)}
    before = json.loads(out.read_text()) if args.append and out.is_file() else None
    try:
        folder = students.recipe_folder(args.recipes)
        if before and (before["setup"]["recipes"], before["setup"]["method"], before["setup"]["defaults"],
                       before["setup"]["overrides"]) != (students.shown(folder), args.method, pinned, extra):
            raise BlockKDError(f"--append: {out} was made with other recipes, method, defaults or overrides")
        epochs = config.load(folder / f"{args.method}.yaml", extra).train.epochs
        teacher_dir, teacher = students.train_or_reuse_teacher(folder, teacher_extra)
    except BlockKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    points = points_of(args.knobs or KNOBS, args.method, defaults, epochs, quick.get("points"))
    calls = [(name, options, seed, extra, str(teacher_dir), str(runs_beside(out)), str(folder),
              args.method) for seed in seeds for name, _, _, options in points]
    jobs = max(1, min(args.jobs, len(calls)))
    threads = args.threads or threads_per_job(jobs)
    results = students.side_by_side(run_point, calls, jobs, threads)
    meta = {name: (knob, label) for name, knob, label, _ in points}
    for r in results:
        r["knob"], r["label"] = meta[r["point"]]
    command = shlex.join(["python", "benchmarks/sensitivity.py", *(sys.argv[1:] if argv is None else argv)])
    invocations = [{"command": command, "minutes": (time.perf_counter() - started) / 60,
                    "date": machine_info()["date"], "jobs": jobs, "threads_per_job": threads}]
    if before:  # earlier runs first, minus those just redone
        results, invocations = append_runs(before, results, invocations, key=lambda r: (r["point"], r["seed"]))
    report: dict[str, Any] = {
        "machine": machine_info(runtime.resolve_device("auto"), jobs=jobs, threads=threads), "invocations": invocations,
        "setup": {"method": args.method, "recipes": students.shown(folder), "val_split": val, "epochs": epochs,
                  "warmup_unit": warmup_key(defaults) and ("fraction of training" if warmup_in_fraction(
                      args.method, warmup_key(defaults)) else "epochs"),
                  "seeds": sorted({r["seed"] for r in results}), "defaults": pinned, "jobs": jobs,
                  "threads_per_job": threads, "overrides": extra, "teacher_overrides": teacher_extra},
        "teacher": {"model": teacher["model"], "run_dir": str(teacher_dir), "last_top1": teacher["last"]["test_top1"]},
        "runs": results, "minutes": sum(i["minutes"] for i in invocations)}
    report["knobs"] = summarise(report)
    write_json(out, report)
    text, md, png = render(report, out)
    print("\n" + text + "\n\n" + text_table(*table(report["knobs"])))
    print(f"\n{out}, {md}, {png} ({report['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
