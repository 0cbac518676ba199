"""Token-level distillation of decoder-only causal LMs: ``lm-ce`` (the student alone) and ``lm-kd`` (forward KL,
reverse KL, generalised JSD, skew KL / skew reverse KL, TVD), the losses of TRL's GKD, DistiLLM and torchtune.

Data (:mod:`blockkd.data.lm`): ``x = {"input_ids", "attention_mask"}`` and labels ``y`` of shape ``(B, L)``
already shifted, ``y[b, t]`` the token that position ``t`` must predict, ``-100`` where nothing counts (padding,
the prompt of prompt/response pairs, the last position). Every loss is a mean over the tokens that count.

Why chunks: at a real vocabulary the logits are the largest tensor of a step (Qwen2.5: 152k floats per token,
2.4 GB for one 4096-token sequence in fp32, twice with the teacher's). The models run up to their final norm
only (the block views of :mod:`blockkd.blocks.hf_lm`); the hidden states of the counted tokens are then cut
into chunks of ``chunk`` tokens, and each chunk's LM heads, softmaxes and loss run under activation
checkpointing, so that only one chunk's logits exist at a time, in the forward and in the backward pass (the
backward recomputes them, one extra head matmul per chunk). Peak memory grows with chunk × vocabulary, not
with tokens × vocabulary (``benchmarks/lm_memory.py`` measures it).

The divergences (``loss``), with p the teacher's and q the student's softmax at temperature T, per token,
times T² (1 at the default T = 1):

    forward_kl  KL(p ‖ q)                                   (Hinton's KD per token; torchtune)
    reverse_kl  KL(q ‖ p)                                   (MiniLLM's objective, without its policy gradient)
    jsd         β·KL(p ‖ m) + (1-β)·KL(q ‖ m), m = β·p + (1-β)·q   (TRL GKD's generalised JSD; β = 0 is
                forward KL and β = 1 reverse KL, its limits as TRL defines them)
    skew_kl     KL(p ‖ α·p + (1-α)·q)                       (DistiLLM's α-skew KL)
    skew_rkl    KL(q ‖ α·q + (1-α)·p)                       (DistiLLM's α-skew reverse KL)
    tvd         ½·Σ|p - q|                                  (total variation distance)

Teacher and student must share the vocabulary (the data's one tokenizer feeds both). Vocabularies of other
sizes are refused unless ``token_mapping`` says which ids correspond: ``shared`` (the ids below the smaller
size: the same tokenizer with padded embedding tables) or a JSON file of ``[student_id, teacher_id]`` pairs;
the divergence is then taken between the two distributions renormalised over the mapped ids.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..blocks import split
from ..blocks.core import Blocks
from ..errors import BlockKDError
from ..schema import STRING, choice, integer, list_of, number, option, optional
from .registry import parse_options, register
from .base import Distiller

IGNORE = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd")
CHUNK = option(256, integer(1), "tokens whose logits are computed at once (peak memory ∝ chunk × vocabulary; "
               "benchmarks/lm_memory.py)")


# ----------------------------------------------------------------------------------------- divergences
def token_divergence(kind: str, s: torch.Tensor, t: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5,
                     skew: float = 0.1) -> torch.Tensor:
    """Per-token divergence ``(N,)`` between teacher logits ``t`` and student logits ``s`` ``(N, V)``, in float32
    (float64 stays float64), times T² (see the module docstring for the formulas)."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    ls = F.log_softmax(s.to(dtype) / temperature, -1)
    lt = F.log_softmax(t.to(dtype) / temperature, -1)

    def kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:  # KL(a ‖ b) from log-probabilities
        return (la.exp() * (la - lb)).sum(-1)

    def mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:  # log(w·a + (1-w)·b)
        return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))

    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        d = kl(lt, ls)
    elif kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        d = kl(ls, lt)
    elif kind == "jsd":
        m = mix(lt, ls, beta)
        d = beta * kl(lt, m) + (1 - beta) * kl(ls, m)
    elif kind == "skew_kl":
        d = kl(lt, mix(lt, ls, skew)) if skew < 1 else torch.zeros_like(lt[..., 0])
    elif kind == "skew_rkl":
        d = kl(ls, mix(ls, lt, skew)) if skew < 1 else torch.zeros_like(ls[..., 0])
    elif kind == "tvd":
        d = 0.5 * (ls.exp() - lt.exp()).abs().sum(-1)
    else:
        raise BlockKDError(f"unknown token loss {kind!r}; choose from {', '.join(LOSSES)}")
    return d * temperature ** 2


# ----------------------------------------------------------------------------------------- helpers
def counted(y: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions of ``y`` ``(B, L)`` that count (label != -100)."""
    return (y.reshape(-1) != IGNORE).nonzero().squeeze(1)


def rows(h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The hidden states ``(B, L, D)`` of the flat positions ``idx`` as ``(N, D)``."""
    return h.reshape(-1, h.shape[-1]).index_select(0, idx)


def chunked(fn: Callable[..., tuple[torch.Tensor, ...]], n: int, chunk: int, *inputs: Any) -> list[torch.Tensor]:
    """Sums over chunks of ``chunk`` rows of ``fn(*row-chunks of inputs)`` (a tuple of 0-dim tensors).

    ``inputs`` are ``(n, ...)`` tensors, lists of them, or None. Under autograd each chunk runs under
    activation checkpointing: only its inputs are kept, and its logits are recomputed in the backward pass
    (no RNG state is saved: heads and losses draw no random numbers).
    """
    def cut(v: Any, a: int) -> Any:
        if isinstance(v, (list, tuple)):
            return [u[a:a + chunk] for u in v]
        return None if v is None else v[a:a + chunk]

    total: list[torch.Tensor] | None = None
    grad = torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in _flat(inputs))
    for a in range(0, max(n, 1), chunk):  # no row: one empty chunk, whose sums are zeros
        args = [cut(v, a) for v in inputs]
        part = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False) if grad else fn(*args)
        total = list(part) if total is None else [x + p for x, p in zip(total, part)]
    return total or []


def _flat(values: Any) -> list[Any]:
    out = []
    for v in values:
        out += list(v) if isinstance(v, (list, tuple)) else [v]
    return out


def load_token_mapping(spec: str | None, v_student: int, v_teacher: int, device: torch.device
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(student ids, teacher ids) compared by the divergences, or None for one shared vocabulary."""
    if spec is None:
        if v_student != v_teacher:
            raise BlockKDError(f"student and teacher vocabularies differ ({v_student} vs {v_teacher} tokens): the "
                               f"token losses compare distributions over one vocabulary; set method.options."
                               f"token_mapping to shared (the ids below {min(v_student, v_teacher)}) or to a JSON "
                               f"file of [student_id, teacher_id] pairs")
        return None
    if spec == "shared":
        ids = torch.arange(min(v_student, v_teacher), device=device)
        return ids, ids
    path = Path(spec).expanduser()
    try:
        pairs = json.loads(path.read_text())
        s, t = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T.to(device)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise BlockKDError(f"cannot read method.options.token_mapping {path} as a JSON list of [student_id, "
                           f"teacher_id] pairs ({type(e).__name__}: {e})") from None
    if not len(s) or s.min() < 0 or t.min() < 0 or s.max() >= v_student or t.max() >= v_teacher:
        raise BlockKDError(f"token_mapping {path}: ids must lie in the student's {v_student} and the teacher's "
                           f"{v_teacher} tokens")
    return s, t


def vocab_of(view: Blocks) -> int:
    return int(view.head[-1].out_features)


def lm_view(model: nn.Module, what: str) -> Blocks:
    """The causal LM ``model`` as blocks (embeddings + layers, head = Sequential(final norm, LM head))."""
    view = split(model)
    head = view.head
    if not (isinstance(head, nn.Sequential) and len(head) == 2 and isinstance(head[1], nn.Linear)):
        raise BlockKDError(f"the {what} {type(model).__name__} is not a supported causal LM (GPT-2, Llama, Qwen2, "
                           f"Qwen3, Mistral *ForCausalLM); the language-model methods need one")
    return view


def hidden(view: Blocks, x: Any) -> torch.Tensor:
    """The view's last block output (before the final norm), ``(B, L, D)``."""
    h = x
    for i in range(len(view.blocks)):
        h = view.run_block(i, h, x)
    return h


def predictions(y: torch.Tensor, idx: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` predicted token ids at the counted positions, -1 elsewhere (never equal to a label): what the
    language-model methods return in training instead of logits (the trainer's token accuracy)."""
    out = torch.full_like(y, -1).reshape(-1)
    return out.index_copy(0, idx, pred).view_as(y)


# ----------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class LMCEOptions:
    chunk: int = CHUNK


class CausalLM(Distiller):
    """Shared by the language-model methods: block views of the student (and teacher), chunked heads."""

    Options = LMCEOptions
    needs_teacher = False
    task = "causal_lm"  # next-token data (blockkd.data.lm); the other methods distil classifiers

    def __init__(self, student, teacher=None, options=None, input_shape=None):
        super().__init__(student, teacher, options, input_shape if input_shape is not None else {})
        self._s_view = lm_view(student, "student")  # plain attributes: the views share the models' modules
        self._t_view = lm_view(self.teacher, "teacher") if self.teacher is not None else None

    def student_logits(self, x: Any) -> torch.Tensor:
        return self._s_view(x)

    def eval_logits(self, x: Any) -> dict[str, torch.Tensor]:
        return {"student": self._s_view(x)}

    @torch.no_grad()
    def teacher_logits(self, x: Any) -> torch.Tensor:
        return self._t_view(x)

    def forward_train(self, x, y, *, epoch):
        idx = counted(y)
        head = self._s_view.head

        def part(hs, tgt):
            logits = head(hs)
            return (F.cross_entropy(logits.float(), tgt, reduction="sum"),
                    logits.argmax(-1))

        hs = rows(hidden(self._s_view, x), idx)
        tgt = y.reshape(-1)[idx]
        ce, pred = _sum_and_cat(part, len(idx), self.opts.chunk, hs, tgt)
        return predictions(y, idx, pred), {"loss_ce": ce / max(len(idx), 1)}


def _sum_and_cat(fn, n: int, chunk: int, *inputs) -> list[torch.Tensor]:
    """:func:`chunked` for an ``fn`` whose last output is per-row (predicted ids): summed terms, concatenated ids."""
    preds: list[torch.Tensor] = []

    def wrapped(*args):
        *terms, pred = fn(*args)
        if len(preds) * chunk < max(n, 1):  # the forward pass, not the backward recomputation
            preds.append(pred.detach())
        return tuple(terms)

    terms = chunked(wrapped, n, chunk, *inputs)
    return [*terms, torch.cat(preds)]


@register("lm-ce")
class LMCE(CausalLM):
    """The causal LM alone: next-token cross-entropy on the counted tokens, in chunks (the baseline, and how
    the teacher is trained)."""

    paper = "next-token prediction"


@dataclass(frozen=True)
class LMKDOptions:
    loss: str = option("forward_kl", choice(*LOSSES), "the token divergence: forward_kl, reverse_kl, jsd (β), "
                       "skew_kl / skew_rkl (α), tvd")
    temperature: float = option(1.0, number(0, strict=True), "T of both softmaxes (divergence scaled by T²)")
    jsd_beta: float = option(0.5, number(0, hi=1), "jsd: β, the teacher's share of the mixture (0: forward KL, "
                         "1: reverse KL; TRL GKD's default 0.5)")
    skew: float = option(0.1, number(0, hi=1), "skew_kl / skew_rkl: α, the mixing weight (DistiLLM's 0.1)")
    ce_weight: float = option(0.5, number(0), "weight of the next-token cross-entropy (torchtune's 1 - kd_ratio)")
    kd_weight: float = option(0.5, number(0), "weight of the token divergence (torchtune's kd_ratio 0.5)")
    token_mapping: str | None = option(None, optional(STRING), "vocabularies of other sizes: shared (the ids below "
                                       "the smaller size) or a JSON file of [student_id, teacher_id] pairs")
    chunk: int = CHUNK
    on_policy: float = option(0.0, number(0, hi=1), "GKD's λ: the share of each batch's sequences replaced by the "
                              "student's own continuations of their prompts, scored by the teacher (no CE on them)")
    gen_temperature: float = option(1.0, number(0, strict=True), "on_policy: the student's sampling temperature")
    max_new_tokens: int = option(64, integer(1), "on_policy: tokens generated per sequence at most (and at most "
                                 "what fits in the sequence length)")
    stop_tokens: list | None = option(None, optional(list_of(integer(0))), "on_policy: token ids that end a "
                                      "generation (null: the student's eos_token_id)")
    prompt_tokens: int = option(16, integer(1), "on_policy: the shortest prompt kept; packed text, which has no "
                                "prompt, keeps its first prompt_tokens tokens and the student continues them")


@register("lm-kd")
class LMKD(CausalLM):
    """ce_weight · CE + kd_weight · D(teacher, student) per token, D = ``loss`` (see the module docstring)."""

    Options = LMKDOptions
    needs_teacher = True
    paper = "Agarwal et al. (GKD) 2024; Ko et al. (DistiLLM) 2024; Gu et al. (MiniLLM) 2024"

    reads_cache = True  # teacher.cache: the teacher's stored top-k log-probabilities stand for its logits

    def __init__(self, student, teacher, options=None, input_shape=None):
        super().__init__(student, teacher, options, input_shape)
        self._cache = None
        self._mapping = None
        if teacher is not None:
            self._mapping = load_token_mapping(self.opts.token_mapping, vocab_of(self._s_view),
                                               vocab_of(self._t_view), next(student.parameters()).device)

    @classmethod
    def from_cache(cls, student, cache, input_shape, options=None, **values) -> "LMKD":
        """The method distilling from ``cache`` (teacher.cache) with no teacher model: options as an Options
        instance or as keywords, as for :func:`blockkd.methods.create`."""
        distiller = cls(student, None, options if options is not None else parse_options("lm-kd", values),
                        input_shape)
        distiller.use_cache(cache)
        return distiller

    @property
    def needs_index(self) -> bool:  # the cache is read by training sequence index
        return self._cache is not None

    def use_cache(self, cache) -> None:
        """Distil from ``cache`` (:class:`blockkd.data.lm_cache.LogitCache`) instead of a live teacher: the
        divergence is taken between the teacher's and the student's distributions both renormalised over the
        teacher's top-k tokens of each position (exact as k -> V; the mass outside them is not compared)."""
        if self.opts.on_policy > 0:
            raise BlockKDError("method.options.on_policy > 0 needs the live teacher (the student's generations are not "
                               "in the cache); remove teacher.cache or set on_policy to 0")
        if self.opts.token_mapping is not None:
            raise BlockKDError("method.options.token_mapping does not apply to a teacher.cache (its ids are the "
                               "teacher's); remove one of them")
        if cache.vocab != vocab_of(self._s_view):
            raise BlockKDError(f"teacher.cache {cache.folder} holds a teacher of {cache.vocab} tokens, the student "
                               f"has {vocab_of(self._s_view)}: the token losses need one vocabulary")
        self._cache = cache

    def forward(self, x, y=None, *, epoch: float = 0.0, index: torch.Tensor | None = None):
        if not self.training or y is None:
            return self.student_logits(x)
        return self.forward_train(x, y, epoch=epoch, index=index)

    def divergence(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-token divergence of this method's options (on the mapped ids where a mapping is set)."""
        if self._mapping is not None:
            s, t = s[:, self._mapping[0].to(s.device)], t[:, self._mapping[1].to(t.device)]
        o = self.opts
        return token_divergence(o.loss, s, t, temperature=o.temperature, beta=o.jsd_beta, skew=o.skew)

    def forward_train(self, x, y, *, epoch, index=None):
        if self._cache is not None:
            return self._forward_cached(x, y, index)
        o = self.opts
        y_ce = y
        n_gen = round(o.on_policy * y.shape[0])
        if n_gen:
            x, y = self.on_policy_batch(x, y, n_gen)
            y_ce = y.clone()
            y_ce[:n_gen] = IGNORE  # the student's own tokens are no ground truth: divergence only
        idx = counted(y)
        s_head, t_head = self._s_view.head, self._t_view.head
        with torch.no_grad():
            ht = rows(hidden(self._t_view, x), idx)

        def part(hs, ht, tgt):
            s = s_head(hs)
            with torch.no_grad():
                t = t_head(ht)
            return (F.cross_entropy(s.float(), tgt, reduction="sum"), self.divergence(s, t).sum(), s.argmax(-1))

        hs = rows(hidden(self._s_view, x), idx)
        ce, div, pred = _sum_and_cat(part, len(idx), o.chunk, hs, ht, y_ce.reshape(-1)[idx])
        n, n_ce = max(len(idx), 1), max(int((y_ce != IGNORE).sum()), 1)
        return predictions(y, idx, pred), {"loss_ce": o.ce_weight * ce / n_ce, "loss_kd": o.kd_weight * div / n}

    @torch.no_grad()
    def on_policy_batch(self, x: dict, y: torch.Tensor, n: int) -> tuple[dict, torch.Tensor]:
        """The batch with its first ``n`` sequences replaced by the student's sampled continuations of their
        prompts (GKD's on-policy data): prompt = the tokens before the first labelled one (at least
        ``prompt_tokens``); the labels count the generated tokens only, up to and including a stop token.
        Generation runs under no_grad with the model's KV cache (``generate``), the student in eval mode,
        drawing from torch's global RNG, which the checkpoints save (an exact resume)."""
        o, model = self.opts, self.student
        ids, mask = x["input_ids"], x["attention_mask"]
        length = ids.shape[1]
        valid = mask[:n].sum(1)
        labelled = y[:n] != IGNORE
        first = torch.where(labelled.any(1), labelled.int().argmax(1), valid - 1)
        plen = torch.minimum(torch.clamp(first + 1, min=o.prompt_tokens), valid - 1).clamp(min=1).tolist()
        cfg = model.config
        stop = list(o.stop_tokens) if o.stop_tokens else [int(t) for t in torch.tensor(cfg.eos_token_id).view(-1)] \
            if cfg.eos_token_id is not None else []
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (stop[0] if stop else 0)
        p_max = max(plen)
        prompts = torch.full((n, p_max), pad, dtype=ids.dtype, device=ids.device)  # left-padded for generate
        p_mask = torch.zeros_like(prompts)
        for b, p in enumerate(plen):
            prompts[b, p_max - p:], p_mask[b, p_max - p:] = ids[b, :p], 1
        was_training = model.training
        model.eval()
        try:
            out = model.generate(input_ids=prompts, attention_mask=p_mask, do_sample=True,
                                 temperature=o.gen_temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=min(o.max_new_tokens, length + 1 - min(plen)),
                                 eos_token_id=stop or None, pad_token_id=pad, use_cache=True,
                                 synced_gpus=torch.distributed.is_initialized())  # ranks step together (FSDP)
        finally:
            model.train(was_training)
        gen = out[:, p_max:].tolist()
        ids, mask, y = ids.clone(), mask.clone(), y.clone()
        for b, p in enumerate(plen):
            g = gen[b]
            cut = next((i + 1 for i, t in enumerate(g) if t in stop), len(g))
            seq = torch.tensor(ids[b, :p].tolist() + g[:cut], dtype=ids.dtype, device=ids.device)[:length + 1]
            k = len(seq) - 1
            ids[b], mask[b], y[b] = pad, 0, IGNORE
            ids[b, :k + 1 if k < length else length] = seq[:length]
            mask[b, :min(k + 1, length)] = 1
            y[b, p - 1:k] = seq[p:]
        return {**x, "input_ids": ids, "attention_mask": mask}, y

    def _forward_cached(self, x, y, index):
        """forward_train with the teacher's cached top-k log-probabilities of the batch's sequences ``index``."""
        if index is None:
            raise BlockKDError("lm-kd with a teacher.cache needs each batch's sequence indices (forward_train(x, y, "
                               "epoch=..., index=...))")
        o = self.opts
        idx = counted(y)
        lp, ids = self._cache.topk(index, y.device)
        lp, ids = rows(lp, idx), rows(ids, idx)
        s_head = self._s_view.head

        def part(hs, lp, ids, tgt):
            s = s_head(hs)
            # the student's logits at the teacher's top-k ids; both softmaxes then renormalise over those k
            d = token_divergence(o.loss, s.gather(-1, ids), lp, temperature=o.temperature, beta=o.jsd_beta,
                                 skew=o.skew)
            return F.cross_entropy(s.float(), tgt, reduction="sum"), d.sum(), s.argmax(-1)

        hs = rows(hidden(self._s_view, x), idx)
        ce, div, pred = _sum_and_cat(part, len(idx), o.chunk, hs, lp, ids, y.reshape(-1)[idx])
        n = max(len(idx), 1)
        return predictions(y, idx, pred), {"loss_ce": o.ce_weight * ce / n, "loss_kd": o.kd_weight * div / n}


__all__ = ["token_divergence", "chunked", "counted", "rows", "hidden", "lm_view", "CausalLM", "LMKD", "LOSSES"]
