"""Block-KD term weights (α, β, γ) against a confident teacher, on the tests' synthetic data (about 30 s a run).

A resnet14 teacher is trained on synthetic 16x16 data, its classifier scaled so that its logit std is 20
(same argmax), then a resnet8 student is trained for 4 cosine epochs at SGD lr 0.05 with each setting.
This is the quick sweep behind Block-KD's default weights; benchmarks/stability.py checks the choice on
Fashion-MNIST.

    python benchmarks/weight_sweep.py [--variants kd unit norm ...] [--out results/weight_sweep.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from blockkd import config, data
from blockkd.engine import train
from blockkd.engine.build import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import make_confident, write_json  # noqa: E402

VARIANTS = {  # name -> (method, options)
    "ce": ("ce", {}),
    "kd": ("kd", {}),
    "unit": ("blockkd", dict(alpha=1.0, beta=1.0, gamma=1.0)),
    "unit, clip 5": ("blockkd", dict(alpha=1.0, beta=1.0, gamma=1.0)),
    "kd weights": ("blockkd", dict(alpha=0.1, beta=0.9, gamma=0.9)),
    "tenth": ("blockkd", dict(alpha=0.1, beta=0.1, gamma=0.1)),
    "α=β=1, γ=0": ("blockkd", dict(alpha=1.0, beta=1.0, gamma=0.0)),
    "α=β=1, γ=0.1": ("blockkd", dict(alpha=1.0, beta=1.0, gamma=0.1)),
    "normalised": ("blockkd", dict(alpha=0.36, beta=0.36, gamma=0.25)),
    "normalised, T=8": ("blockkd", dict(temperature=8.0, alpha=0.36, beta=0.36, gamma=0.25)),
    "α=β=0.36, γ=0": ("blockkd", dict(alpha=0.36, beta=0.36, gamma=0.0)),
    "defaults": ("blockkd", {}),
    "defaults, conv3x3_bn": ("blockkd", dict(connector="conv3x3_bn")),
    "defaults, stone_warmup 1": ("blockkd", dict(stone_warmup_fraction=0.25)),  # 1 of the 4 epochs
}


def recipe(out: Path, name: str, method_name: str, **extra) -> dict:
    """The sweep's setting (synthetic data, resnet8, SGD lr 0.05, 4 epochs); ``extra``: sections to merge in
    (tests/test_stability.py runs the same)."""
    cfg = {
        "model": {"name": "resnet8"}, "method": {"name": method_name},
        "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 512, "test_size": 256,
                 "batch_size": 64, "eval_batch_size": 256},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 4, "device": "cpu", "seed": 0},
        "output": {"dir": str(out), "name": name, "progress": False, "tensorboard": False, "plot": False},
    }
    for section, values in extra.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return config.validate(cfg).to_dict()


def confident_teacher(work: Path, target_std: float = 20.0) -> dict:
    train(recipe(work, "teacher", "ce", model={"name": "resnet14"}), overwrite=True)
    bundle = data.build(recipe(work, "probe", "ce")["data"], device="cpu")
    teacher = build_model("resnet14", bundle, checkpoint=str(work / "teacher"), role="teacher")
    make_confident(teacher, bundle.test, target_std)
    path = work / "confident.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return {"name": "resnet14", "checkpoint": str(path)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="student seeds (the teacher is trained once)")
    p.add_argument("--out", default="results/weight_sweep.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    work = out.parent / "weight_sweep_runs"
    work.mkdir(parents=True, exist_ok=True)
    teacher = confident_teacher(work)
    rows = []
    for seed in args.seeds:
        for name in args.variants:
            method, options = VARIANTS[name]
            extra = {"train": {"seed": seed, **({"grad_clip": 5.0} if "clip" in name else {})}}
            if method != "ce":
                extra["teacher"] = teacher
            cfg = recipe(work, name.replace(" ", "_").replace(",", "").replace("=", "") + f"-seed{seed}", method,
                         **extra)
            cfg["method"]["options"].update(options)
            s = train(cfg, overwrite=True)
            rows.append({"variant": name, "seed": seed, "method": method, "options": cfg["method"]["options"],
                         "test_top1": s["last"]["test_top1"]})
            print(f"{name:26s} seed {seed}  test top-1 {s['last']['test_top1']:6.2f}", flush=True)
    means = {n: statistics.fmean(r["test_top1"] for r in rows if r["variant"] == n) for n in args.variants}
    for name, mean in means.items():
        print(f"{name:26s} mean over {len(args.seeds)} seed(s): {mean:6.2f}")
    write_json(out, {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "seeds": args.seeds,
                     "command": "python benchmarks/weight_sweep.py " + " ".join(sys.argv[1:]),
                     "rows": rows, "mean_test_top1": means})
    return 0


if __name__ == "__main__":
    sys.exit(main())
