"""Peak memory of the token-distillation loss (next-token CE + forward KL, one backward), chunked vs naive, over
vocabularies of 8k-128k tokens and sequences of 512-4096 tokens.

    python benchmarks/lm_memory.py [--vocab 8192 32768 65536 131072] [--seq 512 1024 2048 4096] [--width 896]
                                   [--chunk 256 1024] [--device meta] [--out results/lm_memory.md]

What is measured: the bytes of every tensor alive at once during the forward and backward pass of the loss, from
the student's and teacher's final hidden states ``(L, width)`` (one sequence) through both LM heads to the loss
and the gradients, minus what was alive before (weights, hidden states). Every tensor an operator returns is
counted from its creation until it is freed (a ``TorchDispatchMode`` that sees each operator's outputs and a
weak-reference finaliser on each; views and in-place results share their base's storage and are not counted
again). This is exactly what the loss allocates, without the allocator's caching and rounding, so the numbers
are the same on any machine; by default the tensors live on PyTorch's ``meta`` device (shapes only, no data:
128k x 4096 costs nothing to "run"). ``--device cpu`` runs the same with real tensors (small sizes only).

Naive: both heads on every position at once, the loss on the full ``(L, V)`` logits (what a plain
``F.cross_entropy(model(x).logits ...)`` + KL does). Chunked: :func:`blockkd.methods.lm.chunked`, the path of
the ``lm-*`` methods (``chunk`` tokens at a time under activation checkpointing).
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from blockkd.methods.lm import chunked, token_divergence

sys.path.insert(0, str(Path(__file__).parent))
from common import write_lines  # noqa: E402


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of the tensors that operators return while they are alive; ``peak`` is the maximum."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views, in-place: no new storage
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def loss_peak(vocab: int, seq: int, width: int, chunk: int | None, device: str) -> int:
    """Peak bytes allocated by the loss's forward and backward pass (see the module docstring)."""
    torch.manual_seed(0)
    head_s = torch.nn.Linear(width, vocab, bias=False, device=device)
    head_t = torch.nn.Linear(width, vocab, bias=False, device=device).requires_grad_(False)
    hs = torch.randn(seq, width, device=device, requires_grad=True)
    ht = torch.randn(seq, width, device=device)
    tgt = torch.randint(0, vocab, (seq,), device=device)

    def part(h, g, y):
        s = head_s(h)
        with torch.no_grad():
            t = head_t(g)
        return F.cross_entropy(s.float(), y, reduction="sum"), token_divergence("forward_kl", s, t).sum()

    with LiveTensors() as mode:
        terms = part(hs, ht, tgt) if chunk is None else chunked(part, seq, chunk, hs, ht, tgt)
        sum(terms).backward()
        del terms
    return mode.peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--width", type=int, default=896, help="hidden size (Qwen2.5-0.5B: 896)")
    p.add_argument("--chunk", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--device", default="meta")
    p.add_argument("--out", default="results/lm_memory.md")
    a = p.parse_args(argv)
    mib = 2 ** 20
    lines = ["# Peak memory of the token loss: chunked vs naive", "",
             f"Next-token CE + forward KL over one sequence, forward and backward, hidden size {a.width}, float32; "
             f"MiB of tensors alive at once beyond the inputs (`python benchmarks/lm_memory.py "
             f"--chunk {' '.join(map(str, a.chunk))} --width {a.width} --device {a.device}`; what the numbers "
             f"count: the script's docstring). Chunked = `blockkd.methods.lm.chunked`, k tokens at a time.", "",
             "| vocabulary | tokens | naive MiB | " + " | ".join(f"chunked {k} MiB" for k in a.chunk) + " |",
             "|---:|---:|---:|" + "---:|" * len(a.chunk)]
    for v in a.vocab:
        for s in a.seq:
            naive = loss_peak(v, s, a.width, None, a.device)
            chunks = [loss_peak(v, s, a.width, k, a.device) for k in a.chunk]
            lines.append(f"| {v} | {s} | {naive / mib:.0f} | " + " | ".join(f"{c / mib:.0f}" for c in chunks) + " |")
            print(lines[-1], flush=True)
    return write_lines(a.out, lines)


if __name__ == "__main__":
    sys.exit(main())
