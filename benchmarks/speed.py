"""Speed of every method, side by side: train-step throughput, peak memory, FLOPs, extra parameters, input pipeline.

    python benchmarks/speed.py [--device cpu|cuda] [--steps N] [--warmup N] [--windows N] [--quick]
                               [--pairs resnet32x4:resnet8x4 ...] [--variants fp32 bf16+cl ...] [--profile]
                               [--out results/speed.json]

What is measured, and why this way:
- Train step = the real distiller forward + backward + SGD step (the trainer's step minus its bookkeeping),
  on random-init models and one random batch already on the device, so only the method's cost is timed.
  Throughput is the median of ``--windows`` timed windows of ``--steps`` steps after ``--warmup`` steps;
  methods whose cost varies per step (a Block-KD with shares draws them each step) report the mean over all timed steps
  instead, with at least 20 of them. Each case runs in a fresh process (forked from a server that has
  only imported the modules), so peak memory (CUDA: ``max_memory_allocated``; CPU: peak RSS) belongs to
  that method alone and no allocator or autotuner state leaks from one method into the next.
- Every registered method for classifiers is timed (``blockkd.methods.names()`` but the ``lm-*`` ones;
  ``--methods`` picks some); those that keep per-sample state (CRD: ``needs_index``) get the batch's sample
  indices through ``train_step(index=...)``, those that compare a second view (MLKD: ``needs_strong_view``) a
  second random batch through ``train_step(x_strong=...)``.
  Beside the time: each method's extra trainable parameters (outside the student) and extra buffers
  (outside the student and teacher: memory banks, connectors' BN statistics).
- FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (shapes only, no
  arithmetic), for each method's step and for the parts of a blockkd step, so results/README.md can derive the
  cost floor of Block-KD relative to KD from counted FLOPs and compare it with the measured time ratio.
- Data path: one pass of ``blockkd.data``'s on-device loader vs torchvision's DataLoader + transforms
  pipeline (``benchmarks/reference_loader.py``) over the same images.
Outputs: a table on stdout, ``--out`` (JSON: every number plus the machine) and its section of results/README.md
(markdown) beside it (``speed.md``). Benchmarks measure; they never assert timings.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import multiprocessing.forkserver
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from blockkd import data as data_lib
from blockkd import methods, models
from blockkd.data import fashion_mnist
from blockkd.engine import runtime, train_step
from blockkd.errors import BlockKDError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loader import reference_loader  # noqa: E402
from common import (fmt, machine_info, machine_line, markdown_table, peak_rss_mb, plural, section,  # noqa: E402
                    text_table, write_json, write_text)

PAIRS = ["resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2"]  # teacher:student
# every registered method for classifiers (the language-model methods: benchmarks/lm_stones.py)
METHODS = [m for m in methods.names() if getattr(methods.get(m), "task", None) != "causal_lm"]
UNBATCHED = "blockkd (unbatched)"  # blockkd with batched_stones=false: is batching the faster choice here?
LABELS = {**{m: (m, {}) for m in METHODS}, UNBATCHED: ("blockkd", {"batched_stones": False})}
GOALS = {"blockkd": 2.35, "blockkd-lite": 1.35}  # time per step relative to kd ...
GOAL_PAIR = "resnet32x4:resnet8x4"  # ... on this pair
CPU_VARIANTS = ["fp32"]
CUDA_VARIANTS = ["fp32", "bf16", "bf16+cl", "bf16+cl+compile"]
VARIANT_FLAGS = {"fp32", "bf16", "fp16", "cl", "compile"}
COMPILE_WARMUP = 20  # warm-up steps of +compile variants: compilation and any recompilation stay untimed

DEFAULTS: dict[str, Any] = {
    "pairs": PAIRS, "methods": METHODS, "batch_size": 64, "image_size": 32, "num_classes": 100,
    "warmup": 3, "steps": 5, "windows": 5,
    "data": None, "data_batch_sizes": [64, 128], "data_size": None,  # data None: Fashion-MNIST if installed
}
# --quick: the whole pipeline on tiny models and data in well under a minute (the smoke test).
QUICK: dict[str, Any] = {
    "pairs": ["resnet14:resnet8"], "batch_size": 8, "image_size": 16, "num_classes": 10,
    "warmup": 1, "steps": 1, "windows": 2,
    "data": ["synthetic"], "data_batch_sizes": [64], "data_size": 512,
}


# ----------------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration: a method (label) on a teacher:student pair under a precision variant."""

    pair: str
    label: str
    variant: str
    device: str
    batch_size: int
    image_size: int
    num_classes: int

    @property
    def method(self) -> str:
        return LABELS[self.label][0]

    @property
    def options(self) -> dict[str, Any]:
        return LABELS[self.label][1]


def parse_variant(variant: str) -> dict[str, Any]:
    """``bf16+cl+compile`` -> train-section settings: amp bf16, channels_last, torch.compile."""
    flags = set(variant.split("+"))
    if not flags <= VARIANT_FLAGS or len(flags & {"fp32", "bf16", "fp16"}) != 1:
        raise BlockKDError(f"variant {variant!r}: join one of fp32, bf16, fp16 with optional cl and compile by '+'")
    amp = next(f for f in ("bf16", "fp16") if f in flags) if flags & {"bf16", "fp16"} else "off"
    return {"amp": amp, "channels_last": "cl" in flags, "compile": "compile" in flags}


def build_step(case: Case, device: str | torch.device | None = None
               ) -> tuple[Callable[[], None], methods.Distiller, runtime.Runtime]:
    """The training step of ``case``: forward under autocast, loss, backward, SGD (as the trainer does it)."""
    v = parse_variant(case.variant)
    rt = runtime.resolve(device or case.device, v["amp"], v["channels_last"])
    teacher_name, student_name = case.pair.split(":")
    shape = (3, case.image_size, case.image_size)
    torch.manual_seed(0)  # same weights, data and (blockkd-lite) stone draws in every run
    with rt.device:  # built in place: on "meta" (FLOP counting) nothing is ever computed
        student = models.create(student_name, case.num_classes)
        teacher = models.create(teacher_name, case.num_classes) if methods.needs_teacher(case.method) else None
        # epochs: a training length for the schedules that follow it (Block-KD's stone ramp, CTKD's curriculum);
        # a step costs the same at any point of them
        distiller = methods.create(case.method, student, teacher, shape, epochs=1, **case.options)
    if rt.channels_last:
        distiller.to(memory_format=torch.channels_last)
    distiller.train()
    model = torch.compile(distiller) if v["compile"] else distiller
    optimizer = torch.optim.SGD(list(distiller.trainable_parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
    x = rt.prepare(torch.randn(case.batch_size, *shape, device=rt.device))
    y = torch.randint(0, case.num_classes, (case.batch_size,), device=rt.device)
    # Methods with per-sample state (CRD's memory banks) get the batch's dataset indices, as from the loader.
    index = torch.arange(case.batch_size, device=rt.device) if getattr(distiller, "needs_index", False) else None
    # Methods that compare a strongly augmented second view (MLKD) get one (its on-device augmentation, a data
    # cost, is not timed here).
    x_strong = (rt.prepare(torch.randn(case.batch_size, *shape, device=rt.device))
                if getattr(distiller, "needs_strong_view", False) else None)

    def step() -> None:  # the trainer's own step
        train_step(model, x, y, epoch=1.0, optimizer=optimizer, scaler=scaler, rt=rt, index=index, x_strong=x_strong)

    return step, distiller, rt


def extra_sizes(distiller: methods.Distiller) -> dict[str, int]:
    """What a method adds to the student: trainable parameters outside it (connectors, regressors,
    embeddings) and buffers outside the student and the teacher (memory banks, BN statistics of connectors);
    and the parameters the deployed model has outside the student (SimKD: its projector and the teacher's head)."""
    student = {id(p) for p in distiller.student.parameters()}
    models_ = [m for m in (distiller.student, distiller.teacher) if m is not None]
    own_buffers = {id(b) for m in models_ for b in m.buffers()}
    return {"extra_params": sum(p.numel() for p in distiller.trainable_parameters() if id(p) not in student),
            "extra_buffers": sum(b.numel() for b in distiller.buffers() if id(b) not in own_buffers),
            "extra_inference_params": sum(p.numel() for p in distiller.deployed_model().parameters()
                                          if id(p) not in student)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, warmup: int, steps: int, windows: int) -> dict[str, Any]:
    """Throughput and peak memory of ``case`` (meant to run alone in its own process)."""
    rss_start = peak_rss_mb()
    cuda = torch.device(case.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(case.device)
    step, _, rt = build_step(case)
    if parse_variant(case.variant)["compile"]:  # compilation (and any recompilation) before the timed windows
        warmup = max(warmup, COMPILE_WARMUP)
    seconds = []
    with runtime.reproducibility(False):  # cudnn autotuning on, as in a training run
        for _ in range(warmup):
            step()
        synchronize(rt.device)
        for _ in range(windows):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(rt.device)
            seconds.append(time.perf_counter() - start)
    per_window = [steps * case.batch_size / s for s in seconds]
    images_per_s = statistics.median(per_window)
    return {
        "images_per_s": images_per_s,
        "statistic": f"median of {windows} windows",
        "window_images_per_s": per_window, "steps_per_window": steps, "warmup_steps": warmup,
        "step_ms": 1000 * case.batch_size / images_per_s, "runtime": rt.describe(),
        "peak_memory_mb": torch.cuda.max_memory_allocated(case.device) / 2**20 if cuda else peak_rss_mb(),
        "memory_kind": "torch.cuda.max_memory_allocated" if cuda else "peak RSS (process)",
        "rss_at_start_mb": rss_start,
    }


def _child(conn, case: dict[str, Any], options: dict[str, int]) -> None:
    try:
        conn.send(measure(Case(**case), **options))
    except BaseException as e:  # noqa: BLE001 - reported as the case's result, the benchmark goes on
        conn.send({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"})
    finally:
        conn.close()


def start_workers() -> multiprocessing.context.BaseContext:
    """The server every case is forked from: it only imports the modules, so each case starts from the same
    clean state (memory, allocator, autotuner) without paying the imports again. Started early, its imports
    overlap the FLOP counting."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "blockkd.methods", "blockkd.engine.runtime"])
    multiprocessing.forkserver.ensure_running()
    return ctx


def run_case(ctx: multiprocessing.context.BaseContext, case: Case, settings: dict[str, Any]) -> dict[str, Any]:
    """``measure`` in a fresh process forked from ``start_workers``'s server."""
    recv, send = ctx.Pipe(duplex=False)
    options = {k: settings[k] for k in ("warmup", "steps", "windows")}
    proc = ctx.Process(target=_child, args=(send, dataclasses.asdict(case), options))  # not daemonic: inductor may fork
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        proc.join()
        result = {"error": f"the worker process died (exit code {proc.exitcode})"}
    proc.join()
    return result


# ----------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops(pair: str, labels: list[str], batch_size: int, image_size: int, num_classes: int) -> dict[str, Any]:
    """FLOPs per training step of each method, and of each part of a blockkd step (on ``meta``: shapes only);
    each method's extra parameters and buffers (:func:`extra_sizes`). A method whose step needs real values
    (a data-dependent op such as ``nonzero``, CRD's sampling of negatives) is counted in one real step on
    the CPU instead (``counted_on_cpu``); where that fails too, it has no count (``uncounted``)."""
    def build(label: str, device: str = "meta") -> tuple[Callable[[], None], methods.Distiller]:
        step, distiller, _ = build_step(Case(pair, label, "fp32", device, batch_size, image_size, num_classes))
        return step, distiller

    per_step, uncounted, on_cpu, extra = {}, {}, [], {}
    for label in labels:
        step, distiller = build(label)
        extra[label] = extra_sizes(distiller)
        if label == "blockkd-lite":  # its expected cost, from the parts below
            continue
        try:
            per_step[label] = count_flops(step)
        except Exception:  # noqa: BLE001 - a data-dependent op: count a real step
            try:
                per_step[label] = count_flops(build(label, "cpu")[0])
                on_cpu.append(label)
            except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
                uncounted[label] = (f"{type(e).__name__}: "
                                    f"{str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}")
    d = build("blockkd")[1]
    x = torch.empty(batch_size, 3, image_size, image_size, device="meta")
    parts: dict[str, int] = {}
    parts["student forward"] = count_flops(lambda: d.student(x))
    logits = d.student(x)
    parts["student backward"] = count_flops(lambda: logits.sum().backward())
    parts["teacher forward"] = count_flops(lambda: d.teacher_logits(x))
    feats = [f.detach().requires_grad_() for f in d.student_features(x)[0]]
    stones = []
    for i in range(d.num_blocks):
        out: list[torch.Tensor] = []
        parts[f"stone {i + 1} forward"] = count_flops(lambda: out.extend(d.run_stones(feats, [i])))
        parts[f"stone {i + 1} backward"] = count_flops(lambda: out[0].sum().backward())
        stones.append(parts[f"stone {i + 1} forward"] + parts[f"stone {i + 1} backward"])
    kd = parts["student forward"] + parts["student backward"] + parts["teacher forward"]
    w = d.stone_weights
    # blockkd-lite: each of its stones (num_stones: the deepest ones) runs on its share of m_i samples (FLOPs are
    # linear in the batch), or on the whole batch for its whole_batch_stones (blockkd.methods.stones).
    lite_d = build("blockkd-lite")[1]
    shares = lite_d.plan.batch_sizes(batch_size)
    lite = kd + sum(m / batch_size * stones[i] for i, m in zip(lite_d.stone_ids, shares))
    if "blockkd-lite" in labels:
        per_step["blockkd-lite"] = round(lite)
    ref = per_step.get("kd", kd)
    return {"per_step": per_step, "ratio_vs_kd": {k: v / ref for k, v in per_step.items()}, "uncounted": uncounted,
            "counted_on_cpu": on_cpu, "extra": extra, "parts": parts,
            "num_blocks": d.num_blocks, "stone_weights": w, "kd_from_parts": kd, "blockkd_from_parts": kd + sum(stones),
            "blockkd_lite_expected": lite, "floor_blockkd": (kd + sum(stones)) / kd, "floor_blockkd_lite": lite / kd}


# ----------------------------------------------------------------------------------------- profile
def profile(case: Case, steps: int = 2) -> str:
    """Top ops by self time of ``steps`` training steps of ``case`` (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, _, rt = build_step(case)
    cuda = rt.device.type == "cuda"
    with runtime.reproducibility(False):
        for _ in range(2):
            step()
        synchronize(rt.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            synchronize(rt.device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


# ----------------------------------------------------------------------------------------- data path
def time_pass(loader, device: torch.device) -> tuple[int, float]:
    """(images, seconds) of one full pass over ``loader``, after a few warm-up batches (workers started)."""
    for _, _batch in zip(range(3), loader):
        pass
    synchronize(device)
    images, start = 0, time.perf_counter()
    for _, y in loader:
        images += y.shape[0]
    synchronize(device)
    return images, time.perf_counter() - start


def data_path(names: list[str], batch_sizes: list[int], num_workers: int, device: torch.device,
              size: int | None) -> list[dict[str, Any]]:
    """Images/s of the on-device loader and of torchvision's DataLoader pipeline, per dataset and batch size."""
    rows = []
    for name in names:
        # synthetic: CIFAR-shaped (3x32x32 uint8, 100 classes, 50000 images unless --data-size).
        extra = ({"image_size": 32, "channels": 3, "num_classes": 100, "train_size": size or 50000, "test_size": 1}
                 if name == "synthetic" else {"train_subset": size} if size else {})
        for bs in batch_sizes:
            cfg = {"name": name, "batch_size": bs, "augment": True, **extra}
            row: dict[str, Any] = {"dataset": name, "batch_size": bs, "num_workers": num_workers}
            try:
                ours = time_pass(data_lib.build(cfg, device=device).train, device)
                ref = time_pass(reference_loader(cfg, device=device, num_workers=num_workers), device)
            except BlockKDError as e:
                rows.append({**row, "error": str(e)})
                continue
            row.update(images=ours[0], device_images_per_s=ours[0] / ours[1], torchvision_images_per_s=ref[0] / ref[1])
            row["speedup"] = row["device_images_per_s"] / row["torchvision_images_per_s"]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- report
def add_ratios(rows: list[dict[str, Any]], flop_table: dict[str, dict]) -> None:
    """Cost of each row relative to kd's on the same pair and variant (time), FLOPs and goals."""
    kd = {(r["pair"], r["variant"]): r.get("images_per_s") for r in rows if r["label"] == "kd"}
    for r in rows:
        base = kd.get((r["pair"], r["variant"]))
        ok = base and r.get("images_per_s")
        r["cost_vs_kd"] = base / r["images_per_s"] if ok else None
        per_step = flop_table.get(r["pair"], {}).get("per_step", {})
        r["flops_per_step"] = per_step.get(r["label"])
        r["flops_vs_kd"] = flop_table[r["pair"]]["ratio_vs_kd"].get(r["label"]) if r["pair"] in flop_table else None
        r.update(flop_table.get(r["pair"], {}).get("extra", {}).get(r["label"], {}))
        goal = GOALS.get(r["label"]) if r["pair"] == GOAL_PAIR else None
        r["goal_vs_kd"] = goal
        r["meets_goal"] = None if goal is None or r["cost_vs_kd"] is None else r["cost_vs_kd"] <= goal


def batched_comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """blockkd with batched stones vs without, per pair and variant."""
    by = {(r["pair"], r["variant"], r["label"]): r.get("images_per_s") for r in rows}
    out = []
    for (pair, variant, label), ips in by.items():
        other = by.get((pair, variant, UNBATCHED))
        if label == "blockkd" and ips and other:
            out.append({"pair": pair, "variant": variant, "batched_images_per_s": ips, "unbatched_images_per_s": other,
                        "speedup": ips / other, "faster": "batched" if ips >= other else "unbatched"})
    return out


def step_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["pair (teacher:student)", "variant", "method", "images/s", "ms/step", "time vs kd", "GFLOP/step",
              "FLOPs vs kd", "extra params", "extra buffers", "extra inference params", "peak MB", "goal"]
    body = []
    for r in rows:
        goal = "" if r.get("goal_vs_kd") is None else f"<= {r['goal_vs_kd']}" + (
            "" if r.get("meets_goal") is None else (" ok" if r["meets_goal"] else " MISSED"))
        gflop = r["flops_per_step"] / 1e9 if r.get("flops_per_step") else None
        body.append([r["pair"], r["variant"], r["label"], fmt(r.get("images_per_s"), ".1f"),
                     fmt(r.get("step_ms"), ".1f"),
                     fmt(r.get("cost_vs_kd"), ".2f") + ("x" if r.get("cost_vs_kd") else ""),
                     fmt(gflop, ".2f"), fmt(r.get("flops_vs_kd"), ".2f") + ("x" if r.get("flops_vs_kd") else ""),
                     count(r.get("extra_params")), count(r.get("extra_buffers")),
                     count(r.get("extra_inference_params")), fmt(r.get("peak_memory_mb"), ".0f"),
                     r.get("error") and f"error: {r['error']}" or goal])
    return header, body


def count(n: int | None) -> str:
    """A parameter count for a table cell: 0, 980, 48.6K, 12.8M."""
    if n is None:
        return ""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def flop_table(flop_info: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["pair", "part", "GFLOP per batch"]
    body = []
    for pair, f in flop_info.items():
        body += [[pair, part, fmt(v / 1e9, ".4g")] for part, v in f["parts"].items()]
        body.append([pair, "kd step = student fwd + bwd + teacher fwd", fmt(f["kd_from_parts"] / 1e9, ".4g")])
        body.append([pair, f"blockkd step = kd step + all {f['num_blocks']} stones",
                     fmt(f["blockkd_from_parts"] / 1e9, ".4g")])
        body.append([pair, "blockkd-lite step = kd step + each of its stones on its share of the batch",
                     fmt(f["blockkd_lite_expected"] / 1e9, ".4g")])
    return header, body


def data_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["dataset", "batch", "workers", "on-device images/s", "torchvision images/s", "speed-up"]
    return header, [[r["dataset"], r["batch_size"], r["num_workers"], fmt(r.get("device_images_per_s"), ".0f"),
                     fmt(r.get("torchvision_images_per_s"), ".0f"),
                     fmt(r.get("speedup"), ".1f") + "x" if r.get("speedup") else r.get("error", "")] for r in rows]


def floor_lines(report: dict[str, Any]) -> list[str]:
    """Per pair: the FLOP floor of blockkd(-lite) vs kd; per variant: the measured time ratio beside it."""
    lines = []
    for pair, f in report["flops"].items():
        kd, bk, lite = (f[k] / 1e9 for k in ("kd_from_parts", "blockkd_from_parts", "blockkd_lite_expected"))
        lines.append(f"- {pair}: FLOP floor of blockkd vs kd = {bk:.4g} / {kd:.4g} = {f['floor_blockkd']:.3f}x; "
                     f"of blockkd-lite = {lite:.4g} / {kd:.4g} = {f['floor_blockkd_lite']:.3f}x")
        kd_rows = {r["variant"]: r for r in report["train_step"] if r["pair"] == pair and r["label"] == "kd"}
        for r in report["train_step"]:
            if r["pair"] == pair and r["label"] in ("blockkd", "blockkd-lite") and r.get("cost_vs_kd"):
                floor = f["floor_blockkd"] if r["label"] == "blockkd" else f["floor_blockkd_lite"]
                line = (f"  - {r['variant']}, {r['label']}: measured time ratio {r['cost_vs_kd']:.2f}x "
                        f"vs FLOP ratio {floor:.2f}x")
                kd_row = kd_rows.get(r["variant"])
                added_ms = r["step_ms"] - kd_row["step_ms"] if kd_row else 0
                if added_ms > 0:  # where the ratios differ: the FLOP rate of kd's step vs that of the added work
                    added = (bk if r["label"] == "blockkd" else lite) - kd
                    line += (f"; kd's step runs at {kd / (kd_row['step_ms'] / 1000):.0f} GFLOP/s, the added stone work "
                             f"({added:.4g} GFLOP in {added_ms:.0f} ms) at {added / (added_ms / 1000):.0f} GFLOP/s")
                lines.append(line)
    return lines


def uncounted_note(flop_info: dict[str, dict]) -> str:
    """Which methods were counted in a real CPU step (their step needs values, not only shapes), which not."""
    on_cpu = list(dict.fromkeys(label for f in flop_info.values() for label in f.get("counted_on_cpu", [])))
    why = {label: reason for f in flop_info.values() for label, reason in f.get("uncounted", {}).items()}
    note = (f" GFLOP/step counts convolutions and matrix products (`FlopCounterMode`) on the `meta` device, for "
            f"{', '.join(on_cpu)} (data-dependent ops) in a real CPU step." if on_cpu else "")
    if why:
        note += (" No FLOP count for "
                 + ", ".join(f"{label} ({reason.split(':')[0]})" for label, reason in why.items()) + ".")
    return note


def render_markdown(report: dict[str, Any], stem: str = "speed") -> str:
    """The report's section; titled by the output's stem where it is not the main table (one title each)."""
    s = report["settings"]
    f0 = next(iter(report["flops"].values()), None)
    floor = ""
    if f0:
        floor = (f"The floor follows from the counted FLOPs: a kd step costs S_fwd + S_bwd + T_fwd; a blockkd step "
                 f"adds, for each of the n stones, the forward and the input-gradient backward of the teacher's "
                 f"suffix (frozen: no weight gradients). Counted with `FlopCounterMode` at batch {s['batch_size']}:")
    paragraphs = [
        f"Machine: {machine_line(report['machine'])}.",
        f"Train step (forward + backward + SGD step), batch {s['batch_size']}, {s['image_size']}x{s['image_size']} "
        f"inputs, {s['num_classes']} classes, random-init models and data on the device; throughput is the median "
        f"of {plural(s['windows'], 'window')} of {plural(s['steps'], 'step')} "
        f"after {plural(s['warmup'], 'warm-up step')}; each case runs in its own process; peak MB is "
        f"{'max_memory_allocated' if s['device'].startswith('cuda') else 'the peak RSS of that process'}. "
        f"Time vs kd is kd's images/s "
        f"over the method's; the goals are stated for {GOAL_PAIR}. Extra params: what the method trains besides the "
        f"student (connectors, regressors, embeddings); extra buffers: its untrained state (CRD's memory banks, "
        f"connectors' BN statistics); extra inference params: what the deployed model has besides the student "
        f"(SimKD: its projector and the teacher's classifier; its own classifier then goes unused)."
        f"{uncounted_note(report['flops'])} Reproduce: `{report['command']}`.",
        markdown_table(*step_table(report["train_step"])),
    ]
    if report["batched_stones"]:
        paragraphs.append("`batched_stones`: " + "; ".join(
            f"{b['pair']} {b['variant']}: batched {b['speedup']:.2f}x the unbatched speed ({b['faster']} is faster)"
            for b in report["batched_stones"]) + ".")
    if f0:
        paragraphs += [floor, markdown_table(*flop_table(report["flops"])), "\n".join(floor_lines(report))]
    if report["data_path"]:
        paragraphs += [f"Input pipeline: one pass over the training images (after 3 warm-up batches), random crop + "
                       f"flip + normalise, delivered on `{s['device']}`: `blockkd.data`'s on-device loader vs "
                       f"torchvision's DataLoader + PIL transforms with the given workers.",
                       markdown_table(*data_table(report["data_path"]))]
    return section("Speed" if stem == "speed" else f"Speed ({stem})", paragraphs)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--steps", type=int, help=f"timed steps per window (default {DEFAULTS['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {DEFAULTS['warmup']})")
    p.add_argument("--windows", type=int, help=f"timed windows; the median is reported (default {DEFAULTS['windows']})")
    p.add_argument("--pairs", nargs="+", help=f"teacher:student pairs (default {' '.join(PAIRS)})")
    p.add_argument("--methods", nargs="+", choices=METHODS, help="methods to time (default all)")
    p.add_argument("--variants", nargs="+", help="fp32|bf16|fp16 joined with +cl (channels_last) and/or +compile "
                                                 f"(default CPU: {' '.join(CPU_VARIANTS)}; "
                                                 f"CUDA: {' '.join(CUDA_VARIANTS)})")
    p.add_argument("--batch-size", type=int, help="train-step batch size (default 64)")
    p.add_argument("--data", nargs="*", help="datasets for the input-pipeline benchmark: fashion_mnist, synthetic "
                                             "(CIFAR-shaped) (default: fashion_mnist if installed, else synthetic); "
                                             "--data alone skips it")
    p.add_argument("--data-size", type=int, help="images per data-path pass (default: the whole training set)")
    p.add_argument("--num-workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="DataLoader workers of the torchvision pipeline (default: the CPU count, at most 8)")
    p.add_argument("--no-unbatched", action="store_true", help="skip blockkd with batched_stones=false")
    p.add_argument("--profile", nargs="?", const="missed", choices=("missed", "all"),
                   help="print a profiler summary of the steps whose cost vs kd misses its goal (or of all of them)")
    p.add_argument("--quick", action="store_true", help="tiny models and data, a few steps: the smoke test")
    p.add_argument("--out", default="results/speed.json", help="JSON output; the markdown goes beside it (.md)")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """DEFAULTS, then QUICK with --quick, then whatever was given on the command line."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}
    s = {**DEFAULTS, **(QUICK if args.quick else {}), **given}
    device = runtime.resolve_device(args.device or "auto")
    s["device"] = str(device)
    s["variants"] = args.variants or (CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS)
    for v in s["variants"]:
        parse_variant(v)
    s["labels"] = list(s["methods"]) + ([UNBATCHED] if "blockkd" in s["methods"] and not args.no_unbatched else [])
    s["num_workers"] = args.num_workers
    if s["data"] is None:
        s["data"] = ["fashion_mnist" if fashion_mnist.find(None) else "synthetic"]
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        s = settings_of(args)
    except BlockKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(s["device"])
    report: dict[str, Any] = {"machine": machine_info(device), "command": "python benchmarks/speed.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "settings": s, "train_step": [], "flops": {}, "profiles": {}}
    started = time.perf_counter()
    ctx = start_workers()
    for pair in s["pairs"]:
        print(f"FLOPs: {pair}", file=sys.stderr)
        report["flops"][pair] = flops(pair, s["labels"], s["batch_size"], s["image_size"], s["num_classes"])
        for variant in s["variants"]:
            for label in s["labels"]:
                case = Case(pair, label, variant, s["device"], s["batch_size"], s["image_size"], s["num_classes"])
                print(f"train step: {pair} {variant} {label}", file=sys.stderr, flush=True)
                report["train_step"].append({"pair": pair, "variant": variant, "label": label, "method": case.method,
                                             "options": case.options, **run_case(ctx, case, s)})
    add_ratios(report["train_step"], report["flops"])
    report["batched_stones"] = batched_comparison(report["train_step"])
    if args.profile:
        for r in report["train_step"]:
            if (r["meets_goal"] is False or args.profile == "all") and "error" not in r:
                case = Case(r["pair"], r["label"], r["variant"], s["device"], s["batch_size"], s["image_size"],
                            s["num_classes"])
                table = profile(case)
                report["profiles"][f"{r['pair']} {r['variant']} {r['label']}"] = table
                print(f"\nprofile of {r['label']} ({r['pair']}, {r['variant']}): {r['cost_vs_kd']:.2f}x kd, goal "
                      f"{r['goal_vs_kd']}x\n{table}")
    print("data path", file=sys.stderr, flush=True)
    report["data_path"] = data_path(s["data"], s["data_batch_sizes"], s["num_workers"], device, s["data_size"])
    report["seconds"] = time.perf_counter() - started

    out = Path(args.out)
    write_json(out, report)
    md = write_text(out.with_suffix(".md"), render_markdown(report, out.stem))
    print("\n" + text_table(*step_table(report["train_step"])))
    for b in report["batched_stones"]:
        print(f"batched_stones on {b['pair']} {b['variant']}: {b['speedup']:.2f}x ({b['faster']} is faster)")
    print("\n" + "\n".join(floor_lines(report)))
    if report["data_path"]:
        print("\n" + text_table(*data_table(report["data_path"])))
    print(f"\n{out}, {md} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
