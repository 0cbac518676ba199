"""Which term of a run's objective makes its first epoch blow up? Step by step, the first epoch of a run's
recipe under Block-KD and under KD with several weightings of its two terms.

    python benchmarks/first_epoch.py RUN [--steps 78] [--out results/first_epoch.json]

RUN is a Block-KD run folder (its config.yaml: the pair, data, teacher checkpoint, optimizer and schedule).
Each variant trains RUN's student from the same initialisation and data order for --steps optimizer steps
(the recipe's lr schedule, the trainer's own step, ``engine.train_step``) and records, per step, the student's
cross-entropy on the batch, the per-sample std of its logits and the norm of the gradient into the student.
The variants: Block-KD as RUN's recipe trains with today's code; KD with the weights of RUN's KD recipe (CE 0.1,
KD 0.9); KD with CE 1 and KD 1 (the student's own terms in Block-KD before its task term joined the warm-up,
α = β = 1, without the stepping-stones: they ramp in from 0); KD with CE 0 and KD 1 (the student's terms in
Block-KD at step 1 today); and CE alone. Writes the JSON and a markdown table beside it. Measures; asserts
nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, markdown_table, write_json, write_text  # noqa: E402

from blockkd import config, data as data_lib  # noqa: E402
from blockkd.engine import runtime, train_step  # noqa: E402
from blockkd.engine.build import build_distiller  # noqa: E402
from blockkd.optim import build_optimizer, build_scheduler  # noqa: E402

KD = {"temperature": 4.0}
VARIANTS = {  # name -> method section (None: RUN's own)
    "blockkd (RUN's)": None,
    "kd, CE 0.1 + KD 0.9": {"name": "kd", "options": {**KD, "ce_weight": 0.1, "kd_weight": 0.9}},
    "kd, CE 1 + KD 1": {"name": "kd", "options": {**KD, "ce_weight": 1.0, "kd_weight": 1.0}},
    "kd, CE 0 + KD 1": {"name": "kd", "options": {**KD, "ce_weight": 0.0, "kd_weight": 1.0}},
    "ce": {"name": "ce", "options": {}},
}
WINDOW = 10  # steps per row of the report


def first_steps(raw: dict, method: dict | None, steps: int) -> list[dict]:
    """Per-step records of ``steps`` optimizer steps of the recipe ``raw`` (with ``method`` instead of its own)."""
    raw = {**raw, "method": method or raw["method"]}
    cfg = config.validate(raw)
    runtime.seed_everything(cfg.train.seed)
    rt = runtime.resolve(cfg.train.device, cfg.train.amp, cfg.train.channels_last)
    data = data_lib.build(cfg.data, device=rt.device, seed=cfg.train.seed)
    distiller = build_distiller(cfg, data, rt.device)
    if rt.channels_last:
        distiller.to(memory_format=torch.channels_last)
    params = list(distiller.trainable_parameters())
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, steps_per_epoch=len(data.train), epochs=cfg.train.epochs)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
    distiller.train()
    data.train.set_epoch(0)
    rows = []
    for k, (x, y) in enumerate(data.train):
        if k >= steps:
            break
        logits, _, _ = train_step(distiller, x, y, epoch=k / len(data.train), optimizer=optimizer, scaler=scaler,
                                  rt=rt, params=params, grad_clip=cfg.train.grad_clip)
        grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
        scheduler.step()
        with torch.no_grad():
            z = logits.float()
            rows.append({"step": k + 1, "ce": F.cross_entropy(z, y).item(), "logit_std": z.std(1).mean().item(),
                         "top1": 100 * (z.argmax(1) == y).float().mean().item(),
                         "grad_norm": torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()})
    return rows


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def window_ce(rows: list[dict]) -> list[float]:
    """The student's mean CE over each ``WINDOW`` steps."""
    return [mean([q["ce"] for q in rows[i:i + WINDOW]]) for i in range(0, len(rows), WINDOW)]


def report_md(report: dict) -> str:
    header = ["variant", "grad norm, step 1", *(f"CE, steps {i + 1}-{min(i + WINDOW, report['steps'])}"
                                                for i in range(0, report["steps"], WINDOW)),
              "peak logit std", "train top-1, last 20 steps"]
    rows = [[name, f"{r[0]['grad_norm']:.1f}", *(f"{v:.2f}" for v in window_ce(r)),
             f"{max(q['logit_std'] for q in r):.1f}", f"{mean([q['top1'] for q in r[-20:]]):.1f}"]
            for name, r in report["variants"].items()]
    return "\n".join([
        f"### First epoch, step by step ({report['run']})", "",
        f"The first {report['steps']} optimizer steps of the recipe of `{report['run']}` (student, teacher, data, "
        f"optimizer, lr schedule, seed), per variant: the student's cross-entropy on its training batches (mean "
        f"per {WINDOW} steps), the largest per-sample std of its logits, the norm of the gradient into the "
        f"student at step 1, the training top-1 over the last 20 steps. Same initialisation and data order for "
        f"every variant.", "",
        markdown_table(header, rows), "",
        f"Machine: {machine_line(report['machine'])}; {report['minutes']:.0f} min in all. Reproduce: "
        f"`python benchmarks/first_epoch.py {report['run']} --steps {report['steps']}`.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a Block-KD run folder")
    p.add_argument("--steps", type=int, default=78, help="optimizer steps per variant (default 78: one epoch of "
                                                          "the Fashion-MNIST recipes)")
    p.add_argument("--out", type=Path, default=Path("results/first_epoch.json"))
    args = p.parse_args()
    raw = yaml.safe_load((args.run / "config.yaml").read_text())
    started = time.perf_counter()
    variants = {}
    for name, method in VARIANTS.items():
        variants[name] = first_steps(raw, method, args.steps)
        print(f"{name}: CE per {WINDOW} steps", [round(v, 2) for v in window_ce(variants[name])], flush=True)
    report = {"run": str(args.run), "steps": args.steps, "variants": variants,
              "machine": machine_info(raw["train"]["device"] if raw["train"]["device"] != "auto" else None),
              "minutes": (time.perf_counter() - started) / 60}
    write_json(args.out, report)
    write_text(args.out.with_suffix(".md"), report_md(report))
    print(report_md(report))


if __name__ == "__main__":
    main()
