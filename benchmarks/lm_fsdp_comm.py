"""What FSDP2 gathers in one training step of each language-model distiller: the all-gathers (calls) and the
parameter bytes they bring together, relative to the teacher's size, on the fortunes recipes' models
(configs/lm_fortunes/models: teacher 4 layers x 128, student 2 x 64) sharded as ``train.fsdp`` shards them.

    torchrun --standalone --nproc_per_node=2 benchmarks/lm_fsdp_comm.py [--out results/lm_fsdp_comm.md]

Why count, not time: on a shared CPU with gloo the time says little; what Block-KD's stones add is how often the
teacher's layers are gathered (a stone runs teacher layers forward and, for the gradient to its connector and the
student, backward, each pass gathering the layer again). Counted by wrapping FSDP2's internal
``foreach_all_gather`` (torch's private API: a measurement, not library code). One step after a warm-up step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

from blockkd import methods
from blockkd.blocks import text_input
from blockkd.engine import fsdp

MODELS = Path("configs/lm_fortunes/models")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/lm_fsdp_comm.md")
    p.add_argument("--seq-len", type=int, default=128)
    a = p.parse_args()
    dist.init_process_group("gloo")
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group

    counts = {"calls": 0, "bytes": 0}
    gather = group.foreach_all_gather

    def counting(params, *args, **kwargs):
        counts["calls"] += 1
        counts["bytes"] += sum(fp._orig_size.numel() * 4 for fp in params)  # float32 parameters
        return gather(params, *args, **kwargs)

    group.foreach_all_gather = counting

    def model(role: str, seed: int):
        torch.manual_seed(seed)
        return transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(str(MODELS / f"{role}.json")))

    lines = ["# FSDP2 all-gathers per training step", "",
             f"`torchrun --standalone --nproc_per_node={dist.get_world_size()} benchmarks/lm_fsdp_comm.py`: one "
             f"step of 2 sequences x {a.seq_len} tokens per rank, configs/lm_fortunes models, float32.", "",
             "| method | all-gathers | MiB gathered | x teacher size |", "|---|---:|---:|---:|"]
    for method in ("lm-kd", "lm-blockkd", "lm-blockkd-lite"):
        student, teacher = model("student", 0), model("teacher", 1)
        d = methods.create(method, student, teacher, text_input(a.seq_len)).train()
        size = sum(q.numel() * 4 for q in teacher.parameters())
        fsdp.shard(d, None)
        vocab = student.config.vocab_size
        ids = torch.randint(0, vocab, (2, a.seq_len), generator=torch.Generator().manual_seed(dist.get_rank()))
        x, y = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.roll(ids, -1, 1)
        for _ in range(2):  # a warm-up step (FSDP lazy init), then the counted one
            counts.update(calls=0, bytes=0)
            _, losses = d(x, y)
            sum(losses.values()).backward()
        lines.append(f"| {method} | {counts['calls']} | {counts['bytes'] / 2 ** 20:.2f} | "
                     f"{counts['bytes'] / size:.2f} |")
    lines += ["", "lm-kd gathers every teacher layer once (forward only, no gradient) and every student unit for its "
              "forward and again for its backward; Block-KD's stones gather the teacher layers they cross again, "
              "in their forward and their backward."]
    if dist.get_rank() == 0:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
