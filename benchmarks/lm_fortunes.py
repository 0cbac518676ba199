"""The offline language-model benchmark: the fortunes LM task (configs/lm_fortunes), the teacher trained first,
then the student with each method over several seeds; test perplexity and token accuracy (mean ± std over seeds)
and time per step relative to forward KL.

    python benchmarks/lm_fortunes.py [--methods ce forward_kl reverse_kl jsd blockkd gkd forward_kl-cached]
                                     [--seeds 0 1 2]
                                     [--epochs N] [--out results/lm_fortunes.md] [--runs runs/bench-lm] [--quick]

Every run is ``blockkd.config.load(configs/lm_fortunes/<method>.yaml)`` plus overrides (the output folder, the
seed, ``--epochs``), trained by ``blockkd.engine.train``: the numbers are what the recipes give. The teacher
(``teacher.yaml``) is trained once, with seed 0, and read by every student (``teacher.checkpoint``); for each seed
every method gets the same ``train.seed``, hence the same initialisation and data order. Run it from the
repository root (the recipes name their model configs by relative paths). ``gkd`` is on-policy (λ = 0.5);
``forward_kl-cached`` reads the teacher's top-32 log-probabilities, cached once per benchmark
(``blockkd cache-logits``) into ``RUNS/cache-forward_kl-cached``. Peak memory is CUDA's (not measured on the
CPU). ``--quick``: two fortune files, sequences of 32 tokens, one epoch of at most 3 steps: a smoke run of the
whole pipeline (tests), no result.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from blockkd import config
from blockkd.engine import train

RECIPES = Path("configs/lm_fortunes")
CACHE_K = {"forward_kl-cached": 32}  # recipes read from a logit cache: its k (built into {runs}/cache-<recipe>)
QUICK = ["data.categories=[pets, paradoxum]", "data.vocab_size=300", "data.seq_len=32", "data.batch_size=4",
         "data.eval_batch_size=16", "train.max_steps=3", "train.epochs=1"]


def run(recipe: str, overrides: list[str]) -> dict:
    cfg = config.load(RECIPES / f"{recipe}.yaml", overrides)
    if cfg.teacher.cache is not None and cfg.needs_teacher:  # the teacher's top-k logits first (issue 34)
        from blockkd.engine.cache_logits import cache_logits

        cache_logits(cfg, k=CACHE_K.get(recipe, 32))
        peak_memory_mib()  # the training's peak, not the caching's
    return train(cfg, overwrite=True)


def peak_memory_mib() -> float | None:
    """The peak CUDA memory of the last run (MiB), reset for the next one; None on the CPU (not measured)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    torch.cuda.reset_peak_memory_stats()
    return peak


def train_seconds(run_dir: str) -> float:
    """Seconds spent in the training steps of a run (its epochs' train_time_s: no evaluation, no saving)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["train_time_s"] for line in lines if line.strip())


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["ce", "forward_kl", "reverse_kl", "jsd", "blockkd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="students' epochs (default: the recipes')")
    p.add_argument("--runs", default="runs/bench-lm", help="folder of the run folders")
    p.add_argument("--out", default="results/lm_fortunes.md")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    common = [f"output.dir={a.runs}", "output.progress=false", "output.tensorboard=false", "output.plot=false"]
    common += QUICK if a.quick else []
    teacher = run("teacher", common + ["train.seed=0"])
    rows: dict[str, list[dict]] = {m: [] for m in a.methods}
    for seed in a.seeds:
        for m in a.methods:
            extra = [f"train.seed={seed}", f"output.name=lm-fortunes-{m}-s{seed}",
                     f"teacher.checkpoint={teacher['run_dir']}"]
            if m in CACHE_K:  # one cache per teacher run, reused by every seed
                extra.append(f"teacher.cache={Path(a.runs) / f'cache-{m}'}")
            if a.epochs and not a.quick:
                extra.append(f"train.epochs={a.epochs}")
            s = run(m, common + extra)
            rows[m].append({"perplexity": s["last"]["test_perplexity"], "accuracy": s["last"]["test_top1"],
                            "step_s": train_seconds(s["run_dir"]) / max(s["steps"], 1), "steps": s["steps"],
                            "peak_mib": peak_memory_mib()})
            print(f"{m} seed {seed}: perplexity {rows[m][-1]['perplexity']:.2f}", flush=True)
    ref = statistics.mean(r["step_s"] for r in rows.get("forward_kl", [])) if "forward_kl" in rows else None
    lines = ["# Fortunes LM benchmark", "",
             f"`python benchmarks/lm_fortunes.py --methods {' '.join(a.methods)} --seeds "
             f"{' '.join(map(str, a.seeds))}{' --quick' if a.quick else ''}`: configs/lm_fortunes, test perplexity "
             f"and token accuracy of the last epoch, mean ± std over {len(a.seeds)} seeds. Teacher: perplexity "
             f"{teacher['last']['test_perplexity']:.2f}, token accuracy {teacher['last']['test_top1']:.2f}%.", "",
             "| method | test perplexity | token accuracy % | s / training step | x forward_kl | peak MiB (CUDA) |",
             "|---|---:|---:|---:|---:|---:|"]
    order = sorted(a.methods, key=lambda m: statistics.mean(r["perplexity"] for r in rows[m]))
    for m in order:
        step = statistics.mean(r["step_s"] for r in rows[m])
        rel = f"{step / ref:.2f}" if ref else ""
        peaks = [r["peak_mib"] for r in rows[m] if r.get("peak_mib") is not None]
        peak = f"{max(peaks):.0f}" if peaks else "n/a (CPU)"
        lines.append(f"| {m} | {mean_std([r['perplexity'] for r in rows[m]])} | "
                     f"{mean_std([r['accuracy'] for r in rows[m]])} | {step:.3f} | {rel} | {peak} |")
    lines += ["", "Ranked by mean test perplexity (lower is better); Block-KD's rank is the row it lands in."]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"teacher": teacher["last"], "runs": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
