"""What Block-KD's stepping-stones cost at a real vocabulary: FLOPs and peak tensor memory of one training step
(forward + backward) of ``lm-kd`` and ``lm-blockkd`` variants for Qwen2.5-1.5B -> Qwen2.5-0.5B (their published
shapes: 28 layers of width 1536 -> 24 of width 896, vocabulary 151,936), counted on PyTorch's ``meta`` device.

    python benchmarks/lm_stones.py [--batch 4] [--seq 1024] [--blocks 4] [--out results/lm_stones.md]

Why counted and not timed: the models run on the ``meta`` device (shapes only, no data), so a 2B-parameter step
costs nothing here, and the numbers are exact and machine-independent: FLOPs from ``torch.utils.flop_counter``
(matmuls and attention, 2 per multiply-add), memory from :class:`lm_memory.LiveTensors` (bytes of the tensors
the step allocates, alive at once, beyond the weights). Wall-clock time on a GPU follows the FLOPs closely for
these matmul-bound models, but it is not measured here. Two things differ from a real run, neither changing the
counts: the causal masks are not materialised (``create_causal_mask`` returns None, so SDPA takes its causal
path: the same FLOPs), and the nonzero positions of the labels are assumed to be all positions (every token
counts, as with packed text).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import write_lines  # noqa: E402
from lm_memory import LiveTensors  # noqa: E402

from blockkd import methods  # noqa: E402
from blockkd.blocks import text_input  # noqa: E402

QWEN = {"teacher": (28, 1536, 8960, 12), "student": (24, 896, 4864, 14)}  # layers, width, MLP, heads (2 KV heads)


def qwen(role: str):
    import transformers

    layers, width, mlp, heads = QWEN[role]
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=width, intermediate_size=mlp,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                                   max_position_embeddings=32768, tie_word_embeddings=True)
    with torch.device("meta"):
        return transformers.Qwen2ForCausalLM(cfg)


def step_cost(method: str, options: dict, batch: int, seq: int) -> tuple[float, float]:
    """(TFLOPs, peak GiB) of one forward + backward of ``method`` on ``batch`` x ``seq`` tokens."""
    student, teacher = qwen("student"), qwen("teacher")
    d = methods.create(method, student, teacher, text_input(seq), **options).to("meta").train()
    x = {"input_ids": torch.zeros(batch, seq, dtype=torch.long, device="meta")}
    y = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as flops, LiveTensors() as mem:
        _, losses = d(x, y, epoch=1.0)
        sum(losses.values()).backward()
        del losses
    return flops.get_total_flops() / 1e12, mem.peak / 2 ** 30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=4, help="Block-KD's num_blocks (of the 24 student layers)")
    p.add_argument("--out", default="results/lm_stones.md")
    a = p.parse_args(argv)
    import transformers.models.qwen2.modeling_qwen2 as modeling

    modeling.create_causal_mask = lambda **kwargs: None  # see the module docstring
    fx_config.meta_nonzero_assume_all_nonzero = True
    n = a.batch * a.seq
    runs = [("lm-kd (forward KL)", "lm-kd", {}),
            (f"lm-blockkd, {a.blocks} blocks, stones on all {n} tokens", "lm-blockkd",
             {"num_blocks": a.blocks, "stone_tokens": None}),
            (f"lm-blockkd, {a.blocks} blocks, stones on 1024 tokens (default)", "lm-blockkd",
             {"num_blocks": a.blocks}),
            (f"lm-blockkd-lite, {a.blocks} blocks (2 deepest stones, 512 tokens)", "lm-blockkd-lite",
             {"num_blocks": a.blocks})]
    lines = ["# What Block-KD's stones cost at a real vocabulary", "",
             f"Qwen2.5-1.5B -> Qwen2.5-0.5B shapes (vocabulary 151,936), one training step on {a.batch} x {a.seq} "
             f"tokens, forward + backward, float32, counted on the meta device (`python benchmarks/lm_stones.py "
             f"--batch {a.batch} --seq {a.seq} --blocks {a.blocks}`; what is counted: the script's docstring).", "",
             "| method | TFLOPs / step | x lm-kd | peak GiB beyond weights |", "|---|---:|---:|---:|"]
    base = None
    for label, method, options in runs:
        tf, gib = step_cost(method, options, a.batch, a.seq)
        base = base or tf
        lines.append(f"| {label} | {tf:.1f} | {tf / base:.2f} | {gib:.1f} |")
        print(lines[-1], flush=True)
    return write_lines(a.out, lines)


if __name__ == "__main__":
    sys.exit(main())
