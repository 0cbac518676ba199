"""Evaluation: top-1/top-5 and loss of a model (or of every head a distiller exposes) on a loader.

Why heads: a distiller such as Block-KD holds several complete classifiers besides the student (its
stepping-stones and their ensemble); reporting each beside the student shows whether they learn and
help. ``Distiller.eval_logits(x)`` returns ``{"student": logits, ...}``; a plain model is one head.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import config, methods
from .. import data as data_lib
from ..config.paths import short
from ..inputs import call_model
from ..errors import BlockKDError
from ..utils import eval_mode
from . import runtime
from .build import build_distiller, build_model, check_fits
from .checkpoint import checkpoint_dir, load_checkpoint, read_meta, saved_tokenizer
from .guards import oom_advice
from .lm_eval import evaluate_lm
from .logger import progress_bar
from .metrics import compute_metrics
from .runtime import Runtime


def heads_of(model: nn.Module) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``x -> {head name: logits}``: a distiller's ``eval_logits`` where it has one, else the model itself."""
    eval_logits = getattr(model, "eval_logits", None)
    return eval_logits if callable(eval_logits) else (lambda x: {"student": call_model(model, x)})


def metrics_of(data) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None:
    """The extra metrics evaluation reports for ``data``: its own ``metrics``, else those its
    ``metric_names`` name (``engine.metrics``: GLUE's F1, Matthews correlation)."""
    if data.metrics is not None:
        return data.metrics
    return functools.partial(compute_metrics, tuple(data.metric_names)) if data.metric_names else None


def _gather(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank, concatenated in rank order (``t`` itself for one process)."""
    if not runtime.is_distributed():
        return t
    parts: list = [None] * runtime.world_size()
    torch.distributed.all_gather_object(parts, t.cpu())
    return torch.cat(parts)


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime | None = None, *, heads: bool = False,
             metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]] | None = None,
             progress: bool = False) -> dict[str, float]:
    """Top-1/top-5 (%), mean cross-entropy and images/s of ``model`` on ``loader`` (summed over ranks).

    ``heads=True``: ``model`` is a distiller and each further head of ``eval_logits`` adds ``top1_<head>``.
    ``metrics``: the data's extra metrics (``DataBundle.metrics``), computed from the student's predictions
    and the labels of the whole test split (gathered from every rank only when asked for).
    ``progress``: a bar over the batches, on a terminal (a large test set takes minutes).
    """
    if rt is None:
        param = next(model.parameters(), None)
        rt = Runtime(param.device if param is not None else torch.device("cpu"), None, False)
    if getattr(loader, "causal_lm", False):  # next-token data: perplexity and token accuracy
        return evaluate_lm(model, loader, rt, heads=heads)
    forward = heads_of(model) if heads else (lambda x: {"student": call_model(model, x)})
    sums: dict[str, torch.Tensor] = {}
    predictions: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n = 0
    start = time.perf_counter()
    with eval_mode(model), progress_bar(loader, enabled=progress and runtime.is_main(), desc="eval",
                                        unit="batch") as batches:
        for x, y in batches:
            with rt.autocast():
                outputs = forward(rt.prepare(x))
            for name, logits in outputs.items():
                logits = logits.float()
                hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
                row = torch.stack([hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")])
                sums[name] = sums[name] + row if name in sums else row.double()
                if metrics is not None and name == "student":
                    predictions.append(logits.argmax(1))
                    labels.append(y)
            n += y.shape[0]
    names = list(sums)  # the order of eval_logits: the same on every rank
    stacked = torch.cat([sums[k] for k in names]) if names else torch.zeros(0, device=rt.device, dtype=torch.float64)
    totals = runtime.all_reduce_sum(torch.cat([stacked, stacked.new_tensor([n])])).tolist()
    seconds = time.perf_counter() - start
    n_all = totals[-1]
    if n_all == 0:
        raise BlockKDError("the test split is empty")
    per = {k: totals[3 * i: 3 * i + 3] for i, k in enumerate(names)}
    c1, c5, loss = per["student"]
    out = {"top1": 100 * c1 / n_all, "top5": 100 * c5 / n_all, "loss": loss / n_all, "images": int(n_all),
           "images_per_s": n_all / max(seconds, 1e-9)}
    out.update({f"top1_{k}": 100 * v[0] / n_all for k, v in per.items() if k != "student"})
    if metrics is not None:
        cat = lambda ts: torch.cat(ts).cpu() if ts else torch.zeros(0, dtype=torch.long)  # noqa: E731
        out.update(metrics(_gather(cat(predictions)), _gather(cat(labels))))
    return out


def evaluate_checkpoint(path: str | Path, data_overrides: list[str] | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Rebuild the student of a run (or checkpoint folder) from its meta.json and evaluate it on the test split.

    For a method with heads of its own (Block-KD: each stepping-stone and their ensemble) the distiller is
    rebuilt too, from the run's teacher checkpoint and the saved connectors, and every head is reported
    (``top1_stone1`` ...); where the teacher's checkpoint is gone, the student alone, with a ``note``."""
    folder = checkpoint_dir(path)
    saved = read_meta(folder)["config"]
    data_cfg = config.parse_data_overrides(data_overrides or [], saved["data"])  # bad --data before any tensor
    ckpt = load_checkpoint(folder, with_state=False)
    train = saved["train"]
    rt = runtime.resolve(device or train["device"], train["amp"], train["channels_last"])
    data = data_lib.build(data_cfg, device=rt.device, seed=train["seed"], tokenizer_file=saved_tokenizer(folder))
    model = _deployed_of_run(saved, ckpt, data, rt)
    if model is None:
        model = build_model(saved["model"]["name"], data, kwargs=saved["model"].get("kwargs"))
        weights = ckpt.student_weights()
        check_fits(model, weights, role="evaluated", path=ckpt.path, data=data)
        model.load_state_dict(weights)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    with oom_advice("data.eval_batch_size", data_cfg["eval_batch_size"]):
        result = evaluate(model, data.test, rt, metrics=metrics_of(data), progress=True)
        heads, note = _heads_of_run(saved, ckpt, data, rt)
        if heads is not None:
            result.update({k: v for k, v in evaluate(heads, data.test, rt, heads=True).items()
                           if k.startswith("top1_")})
    note = "; ".join(n for n in (_picked(Path(path), folder, ckpt.meta), note) if n)
    return {"checkpoint": str(ckpt.path), "epoch": ckpt.meta.get("epoch"), "model": short(saved["model"]["name"]),
            "method": saved["method"]["name"], "data": data_cfg["name"], "metric_names": list(data.metric_names),
            **result, **({"note": note} if note else {})}


def _picked(path: Path, folder: Path, meta: dict) -> str | None:
    """For a run folder whose best/ is not its last epoch: which epoch was picked and why (the earliest of
    tied best epochs), and that ``last/`` holds the final student."""
    if folder != path / "best":
        return None
    try:
        last = read_meta(path / "last")
    except BlockKDError:
        return None
    epoch, final = meta.get("epoch"), last.get("epoch")
    if epoch == final:
        return None
    rows = last.get("history") or []
    top = next((r.get("test_top1") for r in rows if r.get("epoch") == epoch), None)
    tied = [r["epoch"] for r in rows if top is not None and r.get("test_top1") == top]
    why = (f"the earliest of the epochs tied at the best test top-1 ({', '.join(map(str, tied))})" if len(tied) > 1
           else "the best test top-1")
    return f"evaluated {folder} (epoch {epoch}, {why}); {path / 'last'} holds the final student (epoch {final})"


def _deployed_of_run(saved: dict, ckpt, data, rt: Runtime):
    """The deployed classifier of a run whose method deploys more than the student (SimKD: projector and the
    teacher's head, both saved in the checkpoint), rebuilt with its distiller; None for the other methods."""
    name = saved["method"]["name"]
    if name not in methods.names() or methods.get(name).deployed_model is methods.Distiller.deployed_model:
        return None
    cfg = config.validate({**saved, "model": {**saved["model"], "checkpoint": None}})
    distiller = build_distiller(cfg, data, rt.device)
    distiller.load_train_state_dict(ckpt.weights)
    return distiller.eval().deployed_model()


def _heads_of_run(saved: dict, ckpt, data, rt: Runtime):
    """(the run's distiller with its trained extra modules, None) when its method reports heads beyond the
    student; (None, why not) when it cannot be rebuilt; (None, None) for the other methods."""
    name = saved["method"]["name"]
    if name not in methods.names() or methods.get(name).eval_logits is methods.Distiller.eval_logits:
        return None, None
    try:
        cfg = config.validate({**saved, "model": {**saved["model"], "checkpoint": None}})
        distiller = build_distiller(cfg, data, rt.device)
        distiller.load_train_state_dict(ckpt.weights)
    except BlockKDError as e:
        return None, f"the stepping-stones are not evaluated: {e}"
    if rt.channels_last:
        distiller.to(memory_format=torch.channels_last)
    return distiller, None
