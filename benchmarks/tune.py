"""Block-KD's open choices on a validation split (weights, temperature, connector, warm-up, stones)
and each baseline's distillation weight (``DISTILL_WEIGHT``: the recipe's value, half and twice it).

    python benchmarks/tune.py [--variants NAME ...] [--seeds 0] [--jobs 2] [--val 10000] [--resume] [--quick]
                              [--recipes configs/fashion_mnist] [--out results/tuning.json]

Why: the accuracy benchmark's goal is Block-KD above KD and DKD; where it is not, the choices the paper
leaves open (docs/blockkd.md) are the place to look, and they must be tuned without looking at the test
split. Every run here is ``accuracy.py``'s (``students.run_student``): the recipe of the method
(``--recipes``, default ``configs/fashion_mnist``) plus the variant's ``method.options``, trained by
``blockkd.engine.train`` on the recipes' training subset and evaluated on ``--val`` images held out from the
training set (``data.val_split``; the teacher is trained without them too). The baselines ce, kd and dkd run
in the same setting. ``--jobs`` runs that many trainings side by side, each on cores/jobs threads (the small
CPU models use two cores poorly).
Outputs: a table on stdout (sorted by last-epoch val top-1), ``--out`` (JSON) and ``.md`` beside it; there,
a baseline whose three weights all ran (``--weights-of``) gets a row of its own in a sweep table: each
weight's val top-1 and the chosen one, which its recipe then takes.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import students  # noqa: E402
from blockkd import config, methods  # noqa: E402
from blockkd.engine import runtime  # noqa: E402
from blockkd.errors import BlockKDError  # noqa: E402
from common import (append_runs, command_line, machine_info, machine_line, markdown_table, mean_std,  # noqa: E402
                    reproduce_line, runs_beside, section, text_table, threads_per_job, write_json, write_text)

# name -> (method, method.options): the baselines, then one Block-KD choice changed at a time. The variants of
# rounds 1-15 ran from the method's defaults of then (FORMER_DEFAULTS below, pinned so that their reproduce lines
# hold); "blockkd defaults" is today's. Variants of options removed since (docs/blockkd.md, "Removed options")
# are dropped: git keeps them.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "dkd": ("dkd", {}),
    "blockkd defaults": ("blockkd", {}),
    "blockkd": ("blockkd", {}),  # the defaults of rounds 1-6: alpha = beta = 0.35, gamma = 0.05, T = 4, conv1x1_bn
    "blockkd unit weights": ("blockkd", {"alpha": 1.0, "beta": 1.0, "gamma": 1.0}),  # the paper's L with α=β=γ=1
    "blockkd kd weights": ("blockkd", {"alpha": 0.1, "beta": 0.9, "gamma": 0.05}),  # KD's CE/KL split
    "blockkd gamma 0": ("blockkd", {"gamma": 0.0}),
    "blockkd gamma 0.35": ("blockkd", {"gamma": 0.35}),
    "blockkd T 2": ("blockkd", {"temperature": 2.0}),
    "blockkd conv3x3_bn": ("blockkd", {"connector": "conv3x3_bn"}),
    "blockkd conv1x1_bn_relu": ("blockkd", {"connector": "conv1x1_bn_relu"}),
    # Round 2, after round 1 found the 3x3 connector the one change that helped (docs/blockkd.md).
    "blockkd conv3x3_bn gamma 0": ("blockkd", {"connector": "conv3x3_bn", "gamma": 0.0}),
    "blockkd conv3x3_bn kd weights": ("blockkd", {"connector": "conv3x3_bn", "alpha": 0.1, "beta": 0.9, "gamma": 0.05}),
    "blockkd conv3x3_bn unit weights": ("blockkd", {"connector": "conv3x3_bn",
                                                    "alpha": 1.0, "beta": 1.0, "gamma": 1.0}),
    # (round 5's stone_warmup 2 of the recipes' 8 epochs: stone_warmup_fraction 0.25)
    "blockkd conv3x3_bn stone_warmup 2": ("blockkd", {"connector": "conv3x3_bn", "stone_warmup_fraction": 0.25}),
    "blockkd conv3x3_bn_relu_conv1x1_bn": ("blockkd", {"connector": "conv3x3_bn_relu_conv1x1_bn"}),
    "blockkd conv3x3_bn_relu_conv1x1_bn kd weights": ("blockkd", {"connector": "conv3x3_bn_relu_conv1x1_bn",
                                                                   "alpha": 0.1, "beta": 0.9, "gamma": 0.05}),
    # Round 6: a longer warm-up.
    "blockkd conv3x3_bn stone_warmup 4": ("blockkd", {"connector": "conv3x3_bn", "stone_warmup_fraction": 0.5}),
    # Rounds 7 and 8: the weights once the warm-up is in (scaling α and β scales the student's and stones'
    # gradients, much like a larger learning rate for them), and a stronger pull towards the ensemble (γ 0.2).
    **{f"blockkd conv3x3_bn stone_warmup 2 {name}": ("blockkd", {"connector": "conv3x3_bn",
                                                                  "stone_warmup_fraction": 0.25, **extra})
       for name, extra in {"gamma 0.2": {"gamma": 0.2},
                           "alpha beta 0.5": {"alpha": 0.5, "beta": 0.5},
                           "alpha beta 0.7": {"alpha": 0.7, "beta": 0.7},
                           "alpha beta 1": {"alpha": 1.0, "beta": 1.0},
                           "alpha beta 1.5": {"alpha": 1.5, "beta": 1.5}}.items()},
    # Round 15: issue 11's "only the deepest, cheapest stones" (num_stones: 2; stone 1 carries nearly the whole
    # teacher, twice stone 2's cost). Lite: stone 2 on half the batch, stone 3 (nearly free) on all of it, 1.24x
    # kd's FLOPs on resnet32x4 -> resnet8x4 (speed table's FLOP parts); full Block-KD without stone 1 says what
    # that stone adds at all
    "blockkd-lite num_stones 2 split equal whole 1 conv3x3_bn stone_warmup 2 alpha beta 1": ("blockkd-lite", {
        "num_stones": 2, "whole_batch_stones": 1, "connector": "conv3x3_bn", "stone_warmup_fraction": 0.25,
        "alpha": 1.0, "beta": 1.0}),
    "blockkd num_stones 2 conv3x3_bn stone_warmup 2 alpha beta 1": ("blockkd", {
        "num_stones": 2, "connector": "conv3x3_bn", "stone_warmup_fraction": 0.25, "alpha": 1.0, "beta": 1.0}),
    "kd ls": ("kd", {"logit_standardization": True, "temperature": 2.0, "kd_weight": 9.0}),
    "dkd ls": ("dkd", {"logit_standardization": True}),
}
# The method's defaults of rounds 1-15, under every Block-KD variant but "blockkd defaults" (blockkd 0.2 changed
# the defaults; the variants above record only what they change).
FORMER_DEFAULTS = {"alpha": 0.35, "beta": 0.35, "gamma": 0.05, "connector": "conv1x1_bn", "stone_warmup_fraction": 0.0,
                   "stone_grad_cap": None}
# The baselines' one hyper-parameter each (issue 12: every method's chosen on the validation split, as
# Block-KD's were): the weight of its distillation term, at the recipe's value (the published one) and at half
# and twice it. Variant "<method>" is the recipe as it is; "<method> <key> x0.5" / "x2" change that one key.
DISTILL_WEIGHT = {"dist": "beta", "fitnet": "feat_weight", "at": "feat_weight", "sp": "feat_weight",
                  "rkd": "feat_weight", "pkt": "feat_weight", "nst": "feat_weight", "kdsvd": "feat_weight",
                  "vid": "weight", "crd": "weight", "ofd": "feat_weight", "reviewkd": "weight",
                  # issue 32's recent methods: each one's main distillation weight
                  "nkd": "gamma", "wttm": "beta", "ctkd": "kd_weight", "sdd": "weight", "simkd": "feat_weight",
                  "fcfd": "l2_weight", "mlkd": "kd_weight"}


def weight_variants() -> dict[str, tuple[str, dict[str, Any]]]:
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for method, key in DISTILL_WEIGHT.items():
        value = getattr(config.load(students.recipes_dir() / f"{method}.yaml").method.options, key)
        out[method] = (method, {})
        out.update({f"{method} {key} x{f:g}": (method, {key: value * f}) for f in (0.5, 2.0)})
    return out


VARIANTS.update(weight_variants())
QUICK: dict[str, Any] = {"variants": ["kd", "blockkd", "blockkd T 2"], "seeds": [0], "val": 300}


def option_overrides(options: dict[str, Any]) -> list[str]:
    return [f"method.options.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
            for k, v in options.items()]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def run_variant(name: str, seed: int, extra: list[str], teacher_dir: str, runs: str, folder: str,
                resume: bool = False) -> dict[str, Any]:
    """One training (in a worker process): the variant's recipe of ``folder`` with ``seed``; its per-run result.
    ``resume``: ``students.run_student``'s (a finished run of the same recipe reused, an interrupted one
    continued)."""
    method, options = VARIANTS[name]
    if method.startswith("blockkd"):  # relative to the method's defaults, not to the recipe's overrides
        options = {**methods.defaults(method), **({} if name == "blockkd defaults" else FORMER_DEFAULTS), **options}
    _, result = students.run_student(Path(folder), method, seed, extra + option_overrides(options),
                                     Path(teacher_dir), Path(runs), name=slug(name), resume=resume)
    return {**result, "variant": name, "options": VARIANTS[name][1]}


def finished_variant(name: str, seed: int, runs: Path) -> dict[str, Any] | None:
    """A finished run of the variant (``--from-runs``) as :func:`run_variant` reports it, or None; its options are
    read from the run's own config (a weight variant's value follows its recipe, which may have changed since)."""
    done = students.finished_run(runs, slug(name), seed)
    if done is None:
        return None
    cfg, result = done
    method, options = VARIANTS[name]
    ran = {k: cfg["method"]["options"][k] for k in options}
    return {**result, "method": method, "variant": name, "options": ran}


def summarise(results: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per variant: mean ± std of last/best val top-1 and the gains over ce, kd and dkd (last epoch).

    A variant's options are those its runs recorded, not today's ``VARIANTS``: a weight variant is defined from
    its recipe's value, which changes once the recipe takes the chosen weight."""
    out = {}
    for name in names:
        mine = [r for r in results if r["variant"] == name]
        options = mine[0].get("options", VARIANTS[name][1]) if mine else VARIANTS[name][1]
        out[name] = {"method": VARIANTS[name][0], "options": options, "seeds": [r["seed"] for r in mine],
                     "last_top1": mean_std([r["last_top1"] for r in mine]),
                     "best_top1": mean_std([r["best_top1"] for r in mine]),
                     "wall_time_s": mean_std([r["wall_time_s"] for r in mine])}
    for v in out.values():
        for base in ("ce", "kd", "dkd"):
            ref = out.get(base)
            v[f"gain_vs_{base}"] = None if ref is None else v["last_top1"]["mean"] - ref["last_top1"]["mean"]
    return out


def table(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "options", "seeds", "val top-1, last", "val top-1, best", "vs kd", "vs dkd", "time/run"]
    rows = []
    for name, v in sorted(summary.items(), key=lambda kv: -kv[1]["last_top1"]["mean"]):
        gains = [("" if v[f"gain_vs_{b}"] is None or name == b else f"{v[f'gain_vs_{b}']:+.2f}") for b in ("kd", "dkd")]
        rows.append([name, ", ".join(f"{k}={o}" for k, o in v["options"].items()) or "defaults", len(v["seeds"]),
                     students.pm(v["last_top1"]), students.pm(v["best_top1"]), *gains,
                     f"{v['wall_time_s']['mean'] / 60:.1f} min"])
    return header, rows


FACTORS = (1.0, 0.5, 2.0)  # the recipe's weight first: it wins a tie


def sweep_names(method: str) -> dict[float, str]:
    key = DISTILL_WEIGHT[method]
    return {f: method if f == 1.0 else f"{method} {key} x{f:g}" for f in FACTORS}


def weight_sweeps(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per baseline whose three weight variants all ran: the weights tried (from the variants' recorded options,
    so the record holds after its recipe takes the chosen value) and the one with the best mean last-epoch
    val top-1, the value its recipe gets."""
    out = {}
    for method, key in DISTILL_WEIGHT.items():
        names = sweep_names(method)
        if not all(n in summary for n in names.values()):
            continue
        recipe = summary[names[0.5]]["options"][key] / 0.5
        chosen = max(FACTORS, key=lambda f: summary[names[f]]["last_top1"]["mean"])
        out[method] = {"key": key, "recipe": recipe, "chosen_factor": chosen, "chosen": recipe * chosen,
                       "tried": {f"{f:g}": {"value": recipe * f, "variant": names[f],
                                            "last_top1": summary[names[f]]["last_top1"]} for f in FACTORS}}
    return out


def sweep_table(sweeps: dict[str, dict[str, Any]],
                summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "weight", "seeds", "x0.5", "x1 (recipe)", "x2", "chosen", "time/run"]
    rows = []
    for method, w in sweeps.items():
        tried = [w["tried"][f"{f:g}"] for f in (0.5, 1.0, 2.0)]
        seeds = min(len(summary[t["variant"]]["seeds"]) for t in tried)
        minutes = statistics.fmean(summary[t["variant"]]["wall_time_s"]["mean"] for t in tried) / 60
        rows.append([method, w["key"], seeds, *(f"{t['value']:g}: {students.pm(t['last_top1'])}" for t in tried),
                     f"**{w['chosen']:g}** (x{w['chosen_factor']:g})", f"{minutes:.1f} min"])
    return header, rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                   help="variants to run (default all): " + "; ".join(VARIANTS))
    p.add_argument("--weights-of", nargs="+", choices=[*DISTILL_WEIGHT, "all"], metavar="METHOD",
                   help="add each METHOD's three distillation-weight variants (x0.5, recipe, x2); all: every "
                   "baseline of DISTILL_WEIGHT")
    p.add_argument("--recipes", metavar="DIR", help="folder of the recipes: DIR/teacher.yaml and DIR/<method>.yaml "
                   "(default configs/fashion_mnist; configs/fashion_mnist_wide: the wide teacher)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0)")
    p.add_argument("--val", type=int, help="images held out from the training set for evaluation (default 10000)")
    p.add_argument("--epochs", type=int, help="students' epochs (default: the recipes')")
    p.add_argument("--train-subset", type=int, help="train on this many images, 0 = all (default: the recipes')")
    p.add_argument("--jobs", type=int, default=2, help="trainings run side by side (default 2)")
    p.add_argument("--threads", type=int, help="torch threads per training (default: cores / jobs)")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in --out (other variants or seeds) and summarise all of them")
    p.add_argument("--resume", action="store_true", help="reuse the finished runs in the run folders beside --out "
                   "and continue the interrupted ones (a sweep that spans several sittings)")
    p.add_argument("--from-runs", action="store_true", help="train nothing: report the finished runs already in "
                   "the run folders beside --out (an invocation that stopped or failed part-way, say)")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON in --out (no training)")
    p.add_argument("--quick", action="store_true", help="tiny subset, 1 epoch, three variants: the smoke test")
    p.add_argument("--out", default="results/tuning.json", help="JSON output; the .md goes beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.render:  # only the markdown, again, from the JSON
        print(render(json.loads(out.read_text()), out)[1])
        return 0
    quick = QUICK if args.quick else {}
    weighed = [] if not args.weights_of else list(DISTILL_WEIGHT) if "all" in args.weights_of else args.weights_of
    names = [*(args.variants or []), *(n for m in weighed for n in VARIANTS if VARIANTS[n][0] == m)]
    names = names or quick.get("variants") or list(VARIANTS)
    seeds = args.seeds or quick.get("seeds") or [0]
    val = args.val or quick.get("val") or 10000
    s = {**students.DEFAULTS, **(students.QUICK if args.quick else {}), "val": val, "device": None}
    s.update({k: getattr(args, k) for k in ("epochs", "train_subset") if getattr(args, k) is not None})
    runs = runs_beside(out)
    started = time.perf_counter()
    teacher_extra, extra = students.overrides(s, args.quick)
    extra.append("output.progress=false")  # side-by-side runs: one line per epoch, no live bars
    before = json.loads(out.read_text()) if args.append and out.is_file() else None
    try:
        folder = students.recipe_folder(args.recipes)
        if before and before["setup"].get("recipes", "configs/fashion_mnist") != students.shown(folder):
            raise BlockKDError(f"--append: {out} holds runs of other recipes ({before['setup'].get('recipes')})")
        teacher_dir, teacher = students.train_or_reuse_teacher(folder, teacher_extra)
    except BlockKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = max(1, min(args.jobs, len(names) * len(seeds)))
    threads = args.threads or threads_per_job(jobs)
    if args.from_runs:
        results = [r for seed in seeds for n in names if (r := finished_variant(n, seed, runs))]
        if not results:
            print(f"error: --from-runs: no finished run in {runs} for these variants and seeds", file=sys.stderr)
            return 2
        minutes = sum(r["wall_time_s"] for r in results) / 60 / jobs  # the runs' own time, side by side
    else:
        results = students.side_by_side(run_variant, [(n, seed, extra, str(teacher_dir), str(runs), str(folder),
                                                       args.resume) for seed in seeds for n in names], jobs, threads)
        minutes = (time.perf_counter() - started) / 60
    command = command_line("tune.py", sys.argv[1:] if argv is None else argv)
    invocations = [{"command": command, "minutes": minutes, "date": machine_info()["date"], "jobs": jobs,
                    "threads_per_job": threads, "teacher_top1": teacher["last"]["test_top1"]}]
    if args.append and out.is_file():  # earlier runs first, minus those just redone
        results, invocations = append_runs(before, results, invocations, key=lambda r: (r["variant"], r["seed"]))
        for i in invocations:  # each invocation's teacher: the cache is per machine and may have been retrained
            i.setdefault("teacher_top1", before["teacher"]["last_top1"])
        seeds = sorted({r["seed"] for r in results})
    names = [n for n in VARIANTS if any(r["variant"] == n for r in results)]
    summary = summarise(results, names)
    report = {"machine": machine_info(runtime.resolve_device("auto"), jobs=jobs, threads=threads),
              "invocations": invocations,
              "setup": {"recipes": students.shown(folder), "val_split": val, "seeds": seeds, "jobs": jobs,
                        "threads_per_job": threads,
                        "overrides": extra, "teacher_overrides": teacher_extra},
              "teacher": {"model": teacher["model"], "run_dir": str(teacher_dir),
                          "last_top1": teacher["last"]["test_top1"]},
              "variants": summary, "runs": results, "minutes": sum(i["minutes"] for i in invocations)}
    write_json(out, report)
    text, md = render(report, out)
    print("\n" + text + "\n\n" + text_table(*table(summary)))
    print(f"\n{out}, {md} ({report['minutes']:.1f} min)")
    return 0


def parallelism(report: dict[str, Any]) -> str:
    """How many runs shared the machine, and with how many threads each: one phrase, or one per command when
    appended invocations differed (an invocation without the fields ran with the setup's)."""
    u = report["setup"]
    each = [(i.get("jobs", u["jobs"]), i.get("threads_per_job", u["threads_per_job"])) for i in report["invocations"]]
    phrase = lambda j, t: f"{j} runs side by side, {t} thread(s) each" if j > 1 else f"one run at a time, {t} thread(s)"  # noqa: E731
    return per_command(each, lambda jt: phrase(*jt))


def per_command(values: list[Any], phrase: Callable[[Any], str]) -> str:
    """One phrase where every invocation had the same value, else one per run of equal values, naming its
    commands ("... (commands 1–3 below); ... (command 4 below)")."""
    if len(set(values)) == 1:
        return phrase(values[0])
    parts, k = [], 1
    for v, group in itertools.groupby(values):
        n = len(list(group))
        parts.append(f"{phrase(v)} (command{'s' if n > 1 else ''} {k}{f'–{k + n - 1}' if n > 1 else ''} below)")
        k += n
    return "; ".join(parts)


def teacher_top1s(report: dict[str, Any]) -> str:
    """The teacher's test top-1, per command where the teacher was retrained between invocations (another
    machine's cache: the same recipe, other weights)."""
    tops = [i.get("teacher_top1", report["teacher"]["last_top1"]) for i in report["invocations"]]
    return per_command(tops, lambda v: f"{v:.2f}") + ("" if len(set(tops)) == 1 else
                                                       ": retrained from its recipe between invocations")


def render(report: dict[str, Any], out: Path) -> tuple[str, Path]:
    """The setup sentence, and the results/README.md section written beside ``out`` (.md), from a tuning report."""
    u, t = report["setup"], report["teacher"]
    epochs = [o.split("=", 1)[1] for o in u["overrides"] if o.startswith("train.epochs=")]
    schedule = f"{epochs[-1]} epochs" if epochs else "the recipes' schedule"
    text = (f"Validation top-1 on {u['val_split']} images held out from the Fashion-MNIST training set (the test "
            f"split is unused), {u.get('recipes', 'configs/fashion_mnist')} recipes, {schedule}, "
            f"teacher {t['model']} at "
            f"{teacher_top1s(report)}; seeds {', '.join(map(str, u['seeds']))} (the seeds column says how many each "
            f"variant ran with); {parallelism(report)}.")
    wide = "" if u.get("recipes", "configs/fashion_mnist") == "configs/fashion_mnist" else f", {u['recipes']}"
    summary = report["variants"]
    sweeps = weight_sweeps(summary)
    swept = {t["variant"] for w in sweeps.values() for t in w["tried"].values()}
    rest = {n: v for n, v in summary.items() if n not in swept}
    what = "Block-KD" if rest else "the baselines' distillation weights"
    # The file's name ends the title: several tuning rounds share the rest of it.
    title = f"Tuning {what} (validation split" + wide + (f", {epochs[-1]} epochs" if epochs else "") + f"; {out.stem})"
    chosen = ("Each baseline's distillation weight at its recipe's value (the published one), half and twice it; "
              "the chosen one (bold: the best mean last-epoch val top-1 of the three, the recipe's on a tie) is "
              "the value its recipe takes.") if sweeps else ""
    md = write_text(out.with_suffix(".md"), section(title, [
        text, chosen, sweeps and markdown_table(*sweep_table(sweeps, summary)), rest and markdown_table(*table(rest)),
        f"Machine: {machine_line(report['machine'])}; {report['minutes']:.0f} min in all. "
        + reproduce_line(report["invocations"])]))
    return text, md


if __name__ == "__main__":
    sys.exit(main())
