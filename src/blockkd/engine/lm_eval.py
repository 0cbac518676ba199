"""Evaluation of causal LMs on held-out text: perplexity, token accuracy, and a few generated samples.

Why its own module: a language model's "classes" are its vocabulary and its samples are tokens; evaluation
(:func:`blockkd.engine.evaluation.evaluate`) hands loaders of next-token data (``causal_lm``) here. The numbers
fill the same keys as a classifier's so the trainer, the metrics files and the summary need nothing new:
``top1``/``top5`` are the token accuracies (%), ``loss`` the mean next-token cross-entropy (nats per token)
and ``perplexity`` its exponential; each further head of a distiller (Block-KD's stones) adds ``top1_<head>``
and ``perplexity_<head>``. Every counted token (label != -100) weighs the same, over all ranks.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..inputs import call_model
from ..errors import BlockKDError
from ..utils import eval_mode
from . import runtime

IGNORE = -100


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader, rt, *, heads: bool = False) -> dict[str, Any]:
    """Token accuracy (top-1/top-5, %), mean cross-entropy and perplexity of ``model`` on ``loader``."""
    if callable(getattr(model, "eval_logits", None)):  # a distiller: its heads, or its student alone
        forward = model.eval_logits if heads else (lambda x: {"student": model.student_logits(x)})  # noqa: E731
    else:
        forward = (lambda x: {"student": call_model(model, {**x, "use_cache": False})})  # noqa: E731
    sums: dict[str, torch.Tensor] = {}
    n = 0
    start = time.perf_counter()
    with eval_mode(model):
        for x, y in loader:
            with rt.autocast():
                outputs = forward(rt.prepare(x))
            keep = y != IGNORE
            target = y[keep]
            for name, logits in outputs.items():
                z = logits[keep].float()
                hits = z.topk(min(5, z.shape[-1]), dim=-1).indices == target[:, None]
                row = torch.stack([hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(z, target, reduction="sum")])
                sums[name] = sums[name] + row.double() if name in sums else row.double()
            n += int(keep.sum())
    names = list(sums)
    stacked = torch.cat([sums[k] for k in names]) if names else torch.zeros(0, device=rt.device, dtype=torch.float64)
    totals = runtime.all_reduce_sum(torch.cat([stacked, stacked.new_tensor([n])])).tolist()
    tokens = totals[-1]
    if tokens == 0:
        raise BlockKDError("the test split has no token to evaluate (every label is -100)")
    per = {k: totals[3 * i: 3 * i + 3] for i, k in enumerate(names)}
    c1, c5, loss = per["student"]
    out = {"top1": 100 * c1 / tokens, "top5": 100 * c5 / tokens, "loss": loss / tokens,
           "perplexity": math.exp(min(loss / tokens, 700.0)), "images": int(tokens),
           "images_per_s": tokens / max(time.perf_counter() - start, 1e-9)}
    for k, (a, _, lo) in per.items():
        if k != "student":
            out[f"top1_{k}"] = 100 * a / tokens
            out[f"perplexity_{k}"] = math.exp(min(lo / tokens, 700.0))
    return out


@torch.no_grad()
def write_samples(model: nn.Module, tokenizer, loader, path: Path, *, count: int = 4, prompt_tokens: int = 8,
                  new_tokens: int = 48, seed: int = 0) -> list[str]:
    """``count`` continuations (sampled, temperature 0.8, top-k 50, from ``seed``) of the first ``prompt_tokens``
    tokens of the first test sequences, written to ``path`` (markdown) by rank 0; returns them."""
    if not hasattr(model, "generate") or tokenizer is None:
        return []  # every rank generates (a sharded student gathers its layers collectively); rank 0 writes
    x, _ = next(iter(loader))
    ids = x["input_ids"][:count, :prompt_tokens]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    with eval_mode(model):
        out = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                             max_new_tokens=new_tokens, do_sample=True, temperature=0.8, top_k=50, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    texts = []
    if not runtime.is_main():
        return texts
    for prompt, full in zip(ids, out):
        texts.append(f"**{tokenizer.decode(prompt, skip_special_tokens=True)}**"
                     f"{tokenizer.decode(full[len(prompt):], skip_special_tokens=True)}")
    path.write_text("# Samples from the student\n\nPrompt (bold: the first tokens of a test sequence), then "
                    f"{new_tokens} sampled tokens (temperature 0.8, top-k 50).\n\n"
                    + "\n\n---\n\n".join(texts) + "\n", encoding="utf-8")
    return texts


__all__ = ["evaluate_lm", "write_samples"]
