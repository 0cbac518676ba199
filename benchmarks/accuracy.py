"""Accuracy of every method on a folder of recipes (default Fashion-MNIST, real data), over several seeds.

    python benchmarks/accuracy.py [--recipes configs/fashion_mnist] [--seeds 0 1 2 3 4]
                                  [--methods ce kd ... blockkd-lite] [--epochs N] [--train-subset N]
                                  [--val [N]] [--jobs 2] [--append] [--resume] [--quick] [--out results/accuracy.json]
    python benchmarks/accuracy.py --render [--out results/accuracy.json]   # .md and .png again, from the JSON

How, and why this way: every run is a plain ``blockkd.config.load`` of a recipe of ``--recipes`` (the
teacher ``DIR/teacher.yaml``, the students ``DIR/<name>.yaml``: every other recipe there but the shared
layers ``base``/``pair``, so a method with other options, such as ``kd-ls``, is an entry of its own) plus overrides,
trained by ``blockkd.engine.train`` (no second training loop), so the numbers are those a user gets from the recipes.
One teacher, trained once with the same data and schedule overrides and cached by ``blockkd.demo`` (keyed by its
recipe's fingerprint and the local files it starts from, such as a pre-trained ``hf.<folder>``), serves every
student. Recipes naming files by relative paths (the ``hf-config.configs/...`` models of ``configs/fortunes``) need
the repository root as working directory, as for ``blockkd train``. Text recipes work the same way (``--recipes
configs/fortunes``; their top-1 is the accuracy on texts). For each seed, every method gets the same ``train.seed``,
hence the same initialisation and data order. Reported per method:
mean ± std over seeds of the last-epoch top-1 and of the best-epoch top-1 (the best epoch is chosen on
the evaluated split, so it is optimistic and labelled as such), the gain over ``ce`` (means of the last
epochs) and the wall-clock time; for a method with extra heads (Block-KD's stepping-stones and their
ensemble), each head's mean ± std last-epoch top-1 on a line under the table. ``--val`` evaluates on
images held out from the training set instead of the test split, for tuning without ever looking at the
test split.

Subset and schedule are the recipes' own (``DIR/base.yaml``) unless ``--train-subset``
(0: all the training images) or ``--epochs`` (students only) say otherwise. Outputs: a table on stdout, ``--out``
(JSON), and beside it ``<name>.png`` (bars with error bars, mean test-accuracy curves) and ``<name>.md``
(a section of results/README.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from blockkd import config
from blockkd.config.paths import short
from blockkd import data as data_lib
from blockkd.engine import runtime
from blockkd.engine.checkpoint import WEIGHTS, checkpoint_dir, read_meta
from blockkd.errors import BlockKDError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from students import (DEFAULTS, QUICK, RUN_KEYS, entries_in, finished_run, ordered, overrides, pm,  # noqa: E402
                      recipe_folder, run_student, shown, side_by_side, train_or_reuse_teacher)
from common import (REPO, append_runs, command_line, fmt, machine_info, machine_line, markdown_table,  # noqa: E402
                    mean_std, plural, reproduce_line, runs_beside, section, text_table, write_json, write_text)

# How reports name the datasets (else their data.name; a GLUE task is "GLUE <task>"), and what the setup
# line says of some.
TITLES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
          "imagefolder": "image folder"}
ABOUT = {"fortunes": "topic classification of Debian's fortune files"}
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW", "adam": "Adam"}


def aggregate(runs: list[dict[str, Any]], method_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean ± std of last/best top-1 and of time, the gain over ce, the mean curve."""
    out: dict[str, dict[str, Any]] = {}
    for m in method_names:
        mine = [r for r in runs if r["method"] == m]
        curves = [dict(r["curve"]) for r in mine]  # epoch -> top-1 of each run
        epochs = sorted({e for c in curves for e in c})
        curve = [mean_std([c[e] for c in curves if e in c]) for e in epochs]
        out[m] = {"seeds": [r["seed"] for r in mine], "last_top1": mean_std([r["last_top1"] for r in mine]),
                  "best_top1": mean_std([r["best_top1"] for r in mine]), "best_epoch": [r["best_epoch"] for r in mine],
                  "wall_time_s": mean_std([r["wall_time_s"] for r in mine]),
                  "curve": {"epoch": epochs, "mean": [c["mean"] for c in curve], "std": [c["std"] for c in curve]}}
    ce = out.get("ce", {}).get("last_top1", {}).get("mean")
    for m, v in out.items():
        v["gain_vs_ce"] = None if ce is None or m == "ce" else v["last_top1"]["mean"] - ce
    return out


# ----------------------------------------------------------------------------------------- report
def weights_sha256(run_dir: Path) -> str | None:
    """The sha256 of the weights a run's checkpoint holds (the one students load), as its meta.json records it."""
    return read_meta(checkpoint_dir(run_dir)).get("sha256", {}).get(WEIGHTS)


def teacher_record(teacher_dir: Path, teacher: dict[str, Any], seeds: list[int], cpu: str) -> dict[str, Any]:
    """The teacher of this invocation: its scores and the sha256 of the weights the students distil (the
    teacher cache is per machine, so an ``--append`` elsewhere retrains it from the same recipe and seed,
    and CPU training need not repeat bit for bit)."""
    ckpt = checkpoint_dir(teacher_dir)
    return {"model": teacher["model"], "run_dir": str(teacher_dir), "last_top1": teacher["last"]["test_top1"],
            "best_top1": teacher["best"]["test_top1"], "wall_time_s": teacher.get("wall_time_s"),
            "checkpoint": ckpt.name, "weights_sha256": weights_sha256(teacher_dir),
            "seeds": seeds, "cpu": cpu}


def same_teacher(old: dict[str, Any], teacher_dir: Path) -> bool:
    """Is ``teacher_dir`` the teacher of an earlier invocation (``old``)? Its cache folder, named by the teacher
    recipe's fingerprint, or, where a key added to the config since renamed that folder, the same weights."""
    if old["run_dir"] == str(teacher_dir):
        return True
    sha = weights_sha256(teacher_dir)
    return sha is not None and sha == old.get("weights_sha256")


def teachers_of(before: dict[str, Any] | None, now: dict[str, Any]) -> dict[str, Any]:
    """``now``, with the earlier invocations' teachers under "earlier" when they were other weights."""
    if not before:
        return now
    old = before["teacher"]
    earlier = [*old.get("earlier", []), {k: v for k, v in old.items() if k != "earlier"}]
    same = (old.get("weights_sha256") == now["weights_sha256"] if old.get("weights_sha256")
            else (old["last_top1"], old["best_top1"]) == (now["last_top1"], now["best_top1"]))
    if same:
        return {**now, "seeds": sorted({*old.get("seeds", before["setup"]["seeds"]), *now["seeds"]}),
                **({"earlier": old["earlier"]} if old.get("earlier") else {})}
    earlier[-1].setdefault("seeds", before["setup"]["seeds"])
    earlier[-1].setdefault("cpu", before["machine"]["cpu"])
    return {**now, "earlier": earlier}


def served(report: dict[str, Any]) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each teacher of the report with the runs it taught, oldest first; a teacher none of whose runs is left
    (all redone since) is left out. Runs written before they recorded their teacher's weights go to the
    oldest teacher whose seeds hold theirs, else to the current one."""
    t = report["teacher"]
    teachers = [*t.get("earlier", []), t]
    taught: list[list[dict[str, Any]]] = [[] for _ in teachers]
    for r in report["runs"]:
        sha = r.get("teacher_sha256")
        mine = [k for k, x in enumerate(teachers) if (x.get("weights_sha256") == sha if sha
                                                      else r["seed"] in x.get("seeds", []))]
        taught[mine[0] if mine else len(teachers) - 1].append(r)
    return [(x, runs) for x, runs in zip(teachers, taught) if runs]


def runs_phrase(runs: list[dict[str, Any]]) -> str:
    """'seeds 0, 1, 2 of ce, kd and seed 3 of dkd': the (method, seed) pairs, methods with equal seeds together."""
    seeds = {m: sorted(r["seed"] for r in runs if r["method"] == m) for m in ordered({r["method"] for r in runs})}
    groups: dict[tuple[int, ...], list[str]] = {}
    for m, mine in seeds.items():
        groups.setdefault(tuple(mine), []).append(m)
    return " and ".join(f"seed{'s' if len(k) > 1 else ''} {', '.join(map(str, k))} of {', '.join(ms)}"
                        for k, ms in groups.items())


def teacher_sentence(report: dict[str, Any]) -> str:
    teachers = served(report)
    if len(teachers) < 2:
        return "One teacher serves all students."
    score = lambda x: f"{x['last_top1']:.2f} last / {x['best_top1']:.2f} best epoch"  # noqa: E731
    cpu = lambda x: f" ({x['cpu']})" if x.get("cpu") else ""  # noqa: E731
    each = "; ".join(f"{score(x)}{cpu(x)} for {runs_phrase(runs)}" for x, runs in teachers)
    return (f"The teacher was retrained between invocations from the same recipe and seed (the cache is per "
            f"machine, and training on another CPU does not repeat bit for bit): {each}. The students distil "
            f"from its {report['teacher'].get('checkpoint', 'best')} checkpoint.")


def setup_of(cfg: dict[str, Any], teacher: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """What was run, from a student's resolved config: models, data split sizes, schedule, seeds."""
    sizes = data_lib.build(cfg["data"], device="cpu")  # the exact split sizes the runs used
    name = cfg["data"]["name"]
    title = f"GLUE {cfg['data']['task']}" if name == "glue" else TITLES.get(name, name)
    about = f" ({ABOUT[name]}, {sizes.num_classes} classes)" if name in ABOUT else ""
    return {"dataset": name, "title": title, "about": about,
            "samples": "texts" if sizes.tokenizer is not None else "images",
            "student": short(cfg["model"]["name"]), "teacher": teacher["model"],
            "split": "val" if s["val"] else "test", "val_split": s["val"], "train_subset": cfg["data"]["train_subset"],
            "train_images": sizes.train_size, "eval_images": sizes.test_size, "epochs": cfg["train"]["epochs"],
            "teacher_epochs": teacher["epochs"], "seeds": s["seeds"], "methods": s["methods"],
            "batch_size": cfg["data"]["batch_size"], "optimizer": cfg["optim"]["name"], "lr": cfg["optim"]["lr"],
            "weight_decay": cfg["optim"]["weight_decay"], "schedule": cfg["schedule"]["name"],
            "warmup_epochs": cfg["schedule"]["warmup_epochs"]}


def ranked(report: dict[str, Any]) -> list[str]:
    """The entries, best first: by mean last-epoch top-1 (the honest figure), ties by name."""
    return sorted(report["methods"], key=lambda m: (-report["methods"][m]["last_top1"]["mean"], m))


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The leaderboard: the teacher, then the students ranked by mean last-epoch top-1."""
    split = report["setup"]["split"]
    header = ["rank", "model", "method", "seeds", f"{split} top-1, last epoch",
              f"{split} top-1, best epoch (optimistic)", "gain vs ce (last)", "time/run"]
    t = report["teacher"]
    rows = [["", t["model"], "teacher (ce)", 1, fmt(t["last_top1"]), fmt(t["best_top1"]), "",
             duration(t["wall_time_s"]) if t.get("wall_time_s") else ""]]
    for rank, m in enumerate(ranked(report), 1):
        v = report["methods"][m]
        rows.append([rank, report["setup"]["student"], m, len(v["seeds"]), pm(v["last_top1"]), pm(v["best_top1"]),
                     "" if v["gain_vs_ce"] is None else f"{v['gain_vs_ce']:+.2f}",
                     duration(v["wall_time_s"]["mean"])])
    return header, rows


def place_line(report: dict[str, Any], entry: str = "blockkd") -> str:
    """Where ``entry`` stands, said plainly: its rank, and its distance to the best other entry against the
    larger of the two standard deviations (the issue's bar for "above": more than that)."""
    res = report["methods"]
    if entry not in res or len(res) < 2:
        return ""
    order = ranked(report)
    best = next(m for m in order if m != entry)
    said = [f"**{entry} ranks {order.index(entry) + 1} of {len(order)}** (mean last-epoch top-1)."]
    for other, who in ((best, f"the best other entry, {best}"), ("dkd", "dkd")):
        if other not in res or (other == "dkd" and best == "dkd" and len(said) > 1):
            continue
        me, them = res[entry]["last_top1"], res[other]["last_top1"]
        gap, noise = me["mean"] - them["mean"], max(me["std"], them["std"])
        verdict = ("above it by more than the larger std" if gap > noise else "below it by more than the larger "
                   "std" if gap < -noise else "within the larger std of it")
        said.append(f"Against {who}: {gap:+.2f} points, larger std {noise:.2f}, so {verdict}.")
    return " ".join(said)


def heads_lines(report: dict[str, Any]) -> list[str]:
    """A line per method whose runs report extra heads (Block-KD's stepping-stones and their ensemble): each
    head's mean ± std top-1 at the last epoch beside the student's, so that which stone leads, and whether the
    ensemble is above the student, reads from the report (the heads are dropped at inference; the student's
    figure is the one ranked)."""
    split, lines = report["setup"]["split"], []
    for m in ranked(report):
        runs = [r for r in report["runs"] if r["method"] == m and r.get("last_heads")]
        heads = list(dict.fromkeys(h for r in runs for h in r["last_heads"]))
        if not heads:
            continue
        said = ", ".join(f"{h.replace('stone', 'stone ')} "
                         f"{pm(mean_std([r['last_heads'][h] for r in runs if h in r['last_heads']]))}" for h in heads)
        lines.append(f"{m}'s heads, {split} top-1 at the last epoch over {plural(len(runs), 'run')}: {said}; "
                     f"the student {pm(report['methods'][m]['last_top1'])}.")
    return lines


def duration(seconds: float) -> str:
    """Minutes with one decimal; under a minute, whole seconds."""
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def setup_line(report: dict[str, Any]) -> str:
    u = report["setup"]
    unit = u.get("samples", "images")
    data = f"{u['train_images']} training {unit}" + (" (all)" if not u["train_subset"] else " (fixed subset)")
    where = (f"the test split ({u['eval_images']} {unit})" if u["split"] == "test"
             else f"{u['eval_images']} {unit} held out from the training set "
                  f"(data.val_split; the test split is unused)")
    w = u.get("warmup_epochs")
    warmup = f", {w:g} warm-up epoch{'' if w == 1 else 's'}" if w else ""
    optim = OPTIMIZERS.get(u.get("optimizer", "sgd"), u.get("optimizer"))
    return (f"{u.get('title', 'Fashion-MNIST')}{u.get('about', '')}, {u['teacher']} -> {u['student']}, recipes "
            f"`{u.get('recipes', 'configs/fashion_mnist')}/<method>.yaml` with "
            f"{data}, {plural(u['epochs'], 'epoch')} ({u['schedule']} schedule{warmup}, {optim} lr {u['lr']}, batch "
            f"{u['batch_size']}; teacher {plural(u['teacher_epochs'], 'epoch')}), "
            f"seeds {', '.join(map(str, u['seeds']))}; evaluated on {where}. Mean ± std over seeds; the best "
            f"epoch is picked on the same split, so it is optimistic. {teacher_sentence(report)}")


def plot(report: dict[str, Any], path: Path) -> Path:
    """Left: last/best top-1 per method with ±std error bars; right: mean top-1 per epoch (±std band).
    Both in the leaderboard's order; past ten entries the curves take tab20's colours (the default cycle
    repeats after ten) and the Block-KD entries a thicker line, so that each curve stays findable."""
    split, res = report["setup"]["split"], report["methods"]
    fig = Figure(figsize=(max(12, 0.75 * len(res) + 7), 4.2), layout="constrained")  # room for every name
    FigureCanvasAgg(fig)
    ax_bar, ax_curve = fig.subplots(1, 2, width_ratios=[1, 1.3])
    names = ranked(report)
    xs = range(len(names))
    many = len(names) > 10
    colours = colormaps["tab20"].colors if many else [None] * len(names)
    for offset, key, label in ((-0.2, "last_top1", "last epoch"), (0.2, "best_top1", "best epoch (optimistic)")):
        means, stds = [res[m][key]["mean"] for m in names], [res[m][key]["std"] for m in names]
        bars = ax_bar.bar([x + offset for x in xs], means, 0.4, yerr=stds, capsize=4, label=label)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=6 if many else 7, padding=2, rotation=90 if many else 0)
    lows = [res[m][k]["mean"] - res[m][k]["std"] for m in names for k in ("last_top1", "best_top1")]
    highs = [res[m][k]["mean"] + res[m][k]["std"] for m in names for k in ("last_top1", "best_top1")]
    teacher = report["teacher"]["last_top1"]
    ax_bar.set_ylim(max(0.0, min(lows) - 2), min(100.0, max(highs + [teacher]) + 1.5))  # zoomed: differences are small
    ax_bar.axhline(teacher, color="grey", ls="--", lw=1, label=f"teacher {teacher:.2f}")
    ax_bar.set_xticks(list(xs), names, rotation=45 if len(names) > 7 else 0, ha="right" if len(names) > 7 else "center")
    ax_bar.set_ylabel(f"{split} top-1 (%), mean ± std over seeds")
    ax_bar.legend(fontsize=7, loc="best")
    for m, colour in zip(names, colours):
        c = res[m]["curve"]
        lo = [a - b for a, b in zip(c["mean"], c["std"])]
        hi = [a + b for a, b in zip(c["mean"], c["std"])]
        (line,) = ax_curve.plot(c["epoch"], c["mean"], marker=".", label=m, color=colour,
                                lw=2.5 if m.startswith("blockkd") else 1.2)
        ax_curve.fill_between(c["epoch"], lo, hi, color=line.get_color(), alpha=0.06 if many else 0.15)
    ax_curve.axhline(teacher, color="grey", ls="--", lw=1, label="teacher")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel(f"{split} top-1 (%)")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = max([e for m in names for e in res[m]["curve"]["epoch"]], default=1)
    ax_curve.set_xlim(0.5, epochs + 0.5)
    if many:  # many close curves: zoom on the second half of training, where the ranking forms
        half = [v for m in names for e, v in zip(res[m]["curve"]["epoch"], res[m]["curve"]["mean"]) if e > epochs / 2]
        ax_curve.set_ylim(min(half) - 1, max(half + [teacher]) + 0.5)
        ax_curve.set_title("zoomed on the second half of training", fontsize=8)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7, ncols=2 if many else 1)
    u = report["setup"]
    pair = f"{u.get('title', 'Fashion-MNIST')}, {u['teacher']} -> {u['student']}"
    fig.suptitle(pair + ("\n" if len(pair) > 80 else ": ")  # long (path-like) model names: two lines
                 + f"{u['train_images']} training {u.get('samples', 'images')}, "
                 f"{plural(u['epochs'], 'epoch')}, {plural(len(u['seeds']), 'seed')}")
    fig.savefig(path, dpi=100)
    return path


def render_markdown(report: dict[str, Any], png: Path) -> str:
    try:
        image = png.resolve().relative_to(REPO).as_posix()
    except ValueError:
        image = png.name
    u = report["setup"]
    title = u.get("title", "Fashion-MNIST")
    if Path(u.get("recipes", "configs/fashion_mnist")).name != u.get("dataset", "fashion_mnist"):
        title += f", {u['teacher']} -> {u['student']}"  # a second setting on the same data (fashion_mnist_wide)
    # The file's name ends the title (as tune.py's do): two tables of one setting keep distinct titles.
    return section(f"Accuracy ({title}; {png.stem})", [
        setup_line(report), markdown_table(*table(report)), place_line(report), *heads_lines(report),
        f"![accuracy per method]({image})",
        f"Machine: {machine_line(report['machine'])}; {report['minutes']:.0f} min in all. "
        + reproduce_line(report["invocations"])])


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipes", metavar="DIR", help="folder of the recipes: DIR/teacher.yaml and DIR/<method>.yaml "
                   "(default configs/fashion_mnist)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2 3 4)")
    p.add_argument("--methods", nargs="+", metavar="NAME", help="student recipes DIR/NAME.yaml to run (default: "
                   "all of DIR's; ce gives the baseline)")
    p.add_argument("--epochs", type=int, help="students' epochs (default: the recipes'; the teacher keeps its own)")
    p.add_argument("--train-subset", type=int, help="train on this many samples, 0 = all (default: the recipes')")
    p.add_argument("--val", type=int, nargs="?", const=10000, default=0, metavar="N",
                   help="evaluate on N samples held out from the training set (default N 10000), not the test split")
    p.add_argument("--device", help="train.device of every run (default: the recipes' auto)")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side, each on cores/jobs torch threads "
                   "(default 1; 2 finishes the small CPU models sooner, with the same results up to the "
                   "processor's arithmetic)")
    p.add_argument("--append", action="store_true", help="keep the runs already in --out for other methods or seeds "
                   "(same teacher and overrides) and report all of them")
    p.add_argument("--from-runs", action="store_true", help="train nothing: report the finished runs already in "
                   "the run folders beside --out (a run stopped at a deadline, say), with the given settings")
    p.add_argument("--resume", action="store_true", help="train only what is missing: a run in the run folders "
                   "beside --out with today's recipe is reused if it finished and continued from its last "
                   "checkpoint if not (a benchmark stopped by a deadline goes on where it stopped)")
    p.add_argument("--render", action="store_true", help="train nothing: only rewrite the .md and .png from the "
                   "JSON in --out (after a change to the report's format)")
    p.add_argument("--quick", action="store_true", help="tiny subset, 1 epoch, 1 seed, ce and blockkd: the smoke test")
    p.add_argument("--out", default="results/accuracy.json", help="JSON output; .png and .md go beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    s = {**DEFAULTS, **(QUICK if args.quick else {}), **given, "val": args.val, "device": args.device}
    out = Path(args.out)
    if args.render:
        report = json.loads(out.read_text())
        png = plot(report, out.with_suffix(".png"))
        print(f"{write_text(out.with_suffix('.md'), render_markdown(report, png))}, {png}")
        return 0
    runs_dir = runs_beside(out)
    started = time.perf_counter()
    try:
        folder = recipe_folder(args.recipes)
        if args.methods is None and not args.quick:  # every student recipe of the folder
            s["methods"] = entries_in(folder)
        missing = [m for m in s["methods"] if not (folder / f"{m}.yaml").is_file()]
        if missing or not s["methods"]:
            raise BlockKDError(f"{shown(folder)} has no recipe for {', '.join(missing) or 'any method'} "
                               f"(expected {shown(folder)}/<method>.yaml)")
        teacher_extra, extra = overrides(s, args.quick)
        teacher_dir, teacher = train_or_reuse_teacher(folder, teacher_extra)
        before = json.loads(out.read_text()) if args.append and out.is_file() else None
        if before and (not same_teacher(before["teacher"], teacher_dir) or before["setup"]["overrides"] != extra
                       or before["setup"].get("recipes", "configs/fashion_mnist") != shown(folder)):
            raise BlockKDError(f"--append: {out} was made with another teacher, other overrides or other recipes")
        # Side-by-side runs print one line per epoch, no live bars (not a setting: --append mixes both).
        quiet = ["output.progress=false"] if args.jobs > 1 else []
        recipes: dict[str, dict[str, Any]] = {}
        results = []
        calls = [(folder, method, seed, extra + quiet, teacher_dir, runs_dir, None, args.resume)
                 for seed in s["seeds"] for method in s["methods"]]
        if args.from_runs:
            done = [(c, finished_run(runs_dir, c[1], c[2])) for c in calls]
            calls, outcomes = [c for c, r in done if r], [r for _, r in done if r]
            if not calls:
                raise BlockKDError(f"--from-runs: no finished run in {runs_dir} for these methods and seeds")
            s["methods"] = ordered({c[1] for c in calls})
            s["seeds"] = sorted({c[2] for c in calls})
        else:
            outcomes = side_by_side(run_student, calls, args.jobs)
        for (_, method, *_), (cfg, result) in zip(calls, outcomes):
            result["fingerprint"] = config.fingerprint(cfg, ignore=RUN_KEYS)
            recipes.setdefault(method, {"file": shown(folder / f"{method}.yaml"),
                                        "fingerprint": result["fingerprint"], "config": cfg})
            results.append(result)
    except BlockKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - started) / 60
    if args.from_runs:  # the runs' own time: their wall-clock summed, over the runs side by side
        minutes = sum(r["wall_time_s"] for r in results) / 60 / max(1, args.jobs)
    invocations = [{"command": command_line("accuracy.py", sys.argv[1:] if argv is None else argv),
                    "minutes": minutes}]
    machine = machine_info(runtime.resolve_device(next(iter(recipes.values()))["config"]["train"]["device"]),
                           jobs=args.jobs)
    teacher_now = teacher_record(teacher_dir, teacher, list(s["seeds"]), machine["cpu"])
    for r in results:  # which weights taught it: an --append elsewhere may have retrained the teacher
        r["teacher_sha256"] = teacher_now["weights_sha256"]
    if before:  # keep the earlier runs of other (method, seed) pairs
        results, invocations = append_runs(before, results, invocations, key=lambda r: (r["method"], r["seed"]))
        recipes = {**before["recipes"], **recipes}
        s["methods"] = ordered(recipes)
        s["seeds"] = sorted({r["seed"] for r in results})
    first = next(iter(recipes.values()))["config"]
    report: dict[str, Any] = {
        "machine": machine,
        "invocations": invocations,
        "setup": {**setup_of(first, teacher, s), "recipes": shown(folder), "overrides": extra,
                  "teacher_overrides": teacher_extra},
        "teacher": teachers_of(before, teacher_now),
        "recipes": recipes, "methods": aggregate(results, s["methods"]), "runs": results,
        "minutes": sum(i["minutes"] for i in invocations),
    }
    write_json(out, report)
    png = plot(report, out.with_suffix(".png"))
    md = write_text(out.with_suffix(".md"), render_markdown(report, png))
    print("\n" + setup_line(report) + "\n\n" + text_table(*table(report)))
    print(f"\n{out}, {png}, {md} ({report['minutes']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
