"""``blockkd cache-logits RECIPE``: the recipe's teacher run once over its training sequences, its top-k
log-probabilities stored in ``teacher.cache`` (or ``--out``) for the token distillers to read
(:mod:`blockkd.data.lm_cache`). Resumable: running it again completes an unfinished cache."""
from __future__ import annotations

import dataclasses

from .. import data as data_lib
from ..config import _check_teacher
from ..data.lm_cache import build_cache
from ..methods.lm import lm_view
from ..errors import BlockKDError
from . import runtime
from .build import build_model
from .checkpoint import teacher_tokenizer


def cache_logits(cfg, *, out: str | None = None, k: int = 32, shard_size: int = 256, batch_size: int | None = None,
                 log=print) -> dict:
    """Build (or complete) the logit cache of ``cfg``'s teacher and training data; returns its manifest."""
    folder = out or cfg.teacher.cache
    if folder is None:
        raise BlockKDError(f"where should the cache go? set teacher.cache in {cfg.source} or pass --out DIR")
    if k < 1 or shard_size < 1 or (batch_size is not None and batch_size < 1):
        raise BlockKDError("--top-k, --shard-size and --batch-size must be positive")
    if cfg.teacher.name is None:
        raise BlockKDError(f"cache-logits runs the teacher: set teacher.name in {cfg.source}")
    _check_teacher(cfg.replace(teacher=dataclasses.replace(cfg.teacher, cache=None)))
    runtime.seed_everything(cfg.train.seed)
    device = runtime.resolve_device(cfg.train.device)
    data = data_lib.build(cfg.data, device="cpu", seed=cfg.train.seed,
                          tokenizer_file=teacher_tokenizer(cfg.teacher.checkpoint, cfg.data.flat()))
    if getattr(data, "task", None) != "causal_lm":
        raise BlockKDError(f"cache-logits caches a language model's token distributions; data.name={data.name} is "
                           f"not language-model data (lm_*)")
    teacher = build_model(cfg.teacher.name, data, checkpoint=cfg.teacher.checkpoint, role="teacher",
                          kwargs=cfg.teacher.kwargs).to(device)
    describe = {"teacher": cfg.teacher.name, "checkpoint": cfg.teacher.checkpoint, "data_name": cfg.data.name}
    return build_cache(folder, teacher_view=lm_view(teacher, "teacher"), seqs=data.train.data,
                       tokenizer=data.tokenizer, k=k, shard_size=shard_size,
                       batch_size=batch_size or cfg.data.eval_batch_size, device=device, describe=describe, log=log)
