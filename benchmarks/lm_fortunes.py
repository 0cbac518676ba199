"""The offline language-model benchmark: the fortunes LM task (configs/lm_fortunes), the teacher trained first,
then the student with each method over several seeds; test perplexity and token accuracy (mean ± std over seeds),
time per step relative to forward KL and peak memory.

    python benchmarks/lm_fortunes.py [--methods ce forward_kl reverse_kl jsd blockkd gkd forward_kl-cached ...]
                                     [--seeds 0 1 2] [--epochs N] [--out results/lm_fortunes.md]
                                     [--runs runs/bench-lm] [--quick] [--render]

Every run is ``blockkd.config.load(configs/lm_fortunes/<method>.yaml)`` plus overrides (the output folder, the
seed, ``--epochs``), trained by ``blockkd.engine.train``: the numbers are what the recipes give. The teacher
(``teacher.yaml``) is trained once, with seed 0, and read by every student (``teacher.checkpoint``); for each seed
every method gets the same ``train.seed``, hence the same initialisation and data order. Run it from the
repository root (the recipes name their model configs by relative paths). ``gkd`` is on-policy (λ = 0.5).
``forward_kl-cached`` reads the teacher's top-32 log-probabilities, ``forward_kl-cached-k8`` (any ``-kN``) its
top-8, each cached once per benchmark (``blockkd cache-logits``, in a process of its own) into
``RUNS/cache-k<N>``; the table gives the teacher's mean probability mass inside the cached top k.

Each run trains in a fresh process, so its peak memory is its own: CUDA's peak allocation on a GPU, the process's
peak resident set (RSS, Python and PyTorch included) on the CPU. The table is rewritten after every run (an
interrupted benchmark leaves the runs done so far). ``--quick``: two fortune files, sequences of 32 tokens, one
epoch of at most 3 steps: a smoke run of the whole pipeline (tests), no result. ``--render``: train nothing, write
the table again from the JSON report beside ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, peak_rss_mb, write_json, write_text  # noqa: E402

RECIPES = Path("configs/lm_fortunes")
CACHED = re.compile(r"^(?P<recipe>.+-cached)(?:-k(?P<k>\d+))?$")  # forward_kl-cached[-kN]: top-N cache (32)
QUICK = ["data.categories=[pets, paradoxum]", "data.vocab_size=300", "data.seq_len=32", "data.batch_size=4",
         "data.eval_batch_size=16", "train.max_steps=3", "train.epochs=1"]


def recipe_and_k(method: str) -> tuple[str, int | None]:
    """The recipe a method row trains and the top-k of its logit cache (None: the live teacher)."""
    m = CACHED.match(method)
    return (m["recipe"], int(m["k"] or 32)) if m else (method, None)


def peak_memory_mib() -> tuple[float, str]:
    """This process's peak memory (MiB) and what it is: CUDA's peak allocation, else the peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20, "CUDA"
    return peak_rss_mb(), "RSS"


def _train(recipe: str, overrides: list[str]) -> dict:
    from blockkd import config
    from blockkd.engine import train

    summary = train(config.load(RECIPES / f"{recipe}.yaml", overrides), overwrite=True)
    summary["peak_mib"], summary["peak_kind"] = peak_memory_mib()
    return summary


def _cache(recipe: str, overrides: list[str], k: int) -> float:
    """Build the top-``k`` cache of ``recipe`` (resumed if partly there); returns the teacher's mean probability
    mass inside the cached top k over every cached position."""
    from safetensors import safe_open

    from blockkd import config
    from blockkd.engine.cache_logits import cache_logits

    cfg = config.load(RECIPES / f"{recipe}.yaml", overrides)
    cache_logits(cfg, k=k, log=lambda *_: None)
    total, count = 0.0, 0
    for shard in sorted(Path(cfg.teacher.cache).glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            mass = f.get_tensor("logprobs").double().logsumexp(-1).exp()
        total, count = total + mass.sum().item(), count + mass.numel()
    return total / max(count, 1)


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new process (spawned: nothing inherited), so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def train_seconds(run_dir: str) -> float:
    """Seconds spent in the training steps of a run (its epochs' train_time_s: no evaluation, no saving)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["train_time_s"] for line in lines if line.strip())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(report: dict, command: str, name: str) -> str:
    """The markdown table; ``name`` (the output's stem) titles it, so that several tables have one section each
    in results/README.md."""
    rows, teacher, masses = report["runs"], report["teacher"], report["cache_mass"]
    done = {m: r for m, r in rows.items() if r}
    ref = statistics.mean(r["step_s"] for r in done["forward_kl"]) if "forward_kl" in done else None
    kinds = sorted({r["peak_kind"] for rs in done.values() for r in rs})
    lines = [f"### Fortunes LM benchmark ({name})", "",
             f"Generated by `{command}`: configs/lm_fortunes (a Llama-style teacher of 4 layers, width 128, trained "
             f"first; a student of 2 layers, width 64), test perplexity and token accuracy of the last epoch, mean ± "
             f"std over the seeds. Teacher (seed 0): perplexity {teacher['test_perplexity']:.2f}, token accuracy "
             f"{teacher['test_top1']:.2f}%. Time per training step (no evaluation) and its ratio to forward_kl's; "
             f"peak memory of the run's own process, here {' / '.join(kinds)} (CUDA's peak allocation on a GPU, else "
             "the peak resident set, Python and PyTorch included). Cached rows "
             "train from the teacher's top-k log-probabilities (docs/lm.md); \"top-k mass\" is the teacher's mean "
             "probability inside them.", "",
             "| rank | method | seeds | test perplexity | token accuracy % | s / step | × forward_kl | peak MiB | "
             "top-k mass |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    order = sorted(done, key=lambda m: statistics.mean(r["perplexity"] for r in done[m]))
    for rank, m in enumerate(order, 1):
        step = statistics.mean(r["step_s"] for r in done[m])
        mass = masses.get(m)
        lines.append(f"| {rank} | {m} | {len(done[m])} | {mean_std([r['perplexity'] for r in done[m]])} | "
                     f"{mean_std([r['accuracy'] for r in done[m]])} | {step:.3f} | "
                     f"{f'{step / ref:.2f}' if ref else ''} | {max(r['peak_mib'] for r in done[m]):.0f} | "
                     f"{f'{mass:.3f}' if mass is not None else ''} |")
    lines += ["", "Ranked by mean test perplexity (lower is better). Machine: " + machine_line(report["machine"]) +
              f"; {report['minutes']:.0f} min in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["ce", "forward_kl", "reverse_kl", "jsd", "blockkd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="students' epochs (default: the recipes')")
    p.add_argument("--runs", default="runs/bench-lm", help="folder of the run folders")
    p.add_argument("--out", default="results/lm_fortunes.md")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--render", action="store_true", help="only the table again, from the JSON beside --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.render:
        report = json.loads(out.with_suffix(".json").read_text())
        write_text(out, render(report, report["command"], out.stem))
        return 0
    for m in a.methods:
        if not (RECIPES / f"{recipe_and_k(m)[0]}.yaml").is_file():
            print(f"error: no recipe {RECIPES}/{recipe_and_k(m)[0]}.yaml for method {m}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    command = "python benchmarks/lm_fortunes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    common = [f"output.dir={a.runs}", "output.progress=false", "output.tensorboard=false", "output.plot=false"]
    common += QUICK if a.quick else []
    teacher = in_fresh_process(_train, "teacher", common + ["train.seed=0"])
    report = {"machine": machine_info(), "command": command, "teacher": teacher["last"], "cache_mass": {},
              "runs": {m: [] for m in a.methods}, "minutes": 0.0}
    student = [f"teacher.checkpoint={teacher['run_dir']}"] + ([f"train.epochs={a.epochs}"] if a.epochs else [])
    for seed in a.seeds:
        for m in a.methods:
            recipe, k = recipe_and_k(m)
            extra = student + [f"train.seed={seed}", f"output.name=lm-fortunes-{m}-s{seed}"]
            if k is not None:  # one cache per k, built by the teacher run above and reused by every seed
                extra.append(f"teacher.cache={Path(a.runs) / f'cache-k{k}'}")
                if m not in report["cache_mass"]:
                    report["cache_mass"][m] = in_fresh_process(_cache, recipe, common + extra, k)
            s = in_fresh_process(_train, recipe, common + extra)
            report["runs"][m].append({"seed": seed, "perplexity": s["last"]["test_perplexity"],
                                      "accuracy": s["last"]["test_top1"], "steps": s["steps"],
                                      "step_s": train_seconds(s["run_dir"]) / max(s["steps"], 1),
                                      "peak_mib": s["peak_mib"], "peak_kind": s["peak_kind"]})
            print(f"{m} seed {seed}: perplexity {s['last']['test_perplexity']:.2f}", flush=True)
            report["minutes"] = (time.perf_counter() - start) / 60
            write_json(out.with_suffix(".json"), report)
            write_text(out, render(report, command, out.stem))
    print(out.read_text())
    return 0 if all(math.isfinite(r["perplexity"]) for rs in report["runs"].values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
