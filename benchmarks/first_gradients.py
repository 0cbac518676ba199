"""Block-KD's first gradients into the student against KD's, on a confident pair (seconds on a CPU).

What makes Block-KD's first phase harsh, and which default damps it: the ratio of the student's gradient norm
under Block-KD to KD's on the first batch (at the progress the trainer passes for step 1 of 8 epochs of 8
steps), for blockkd 0.1's defaults (alpha = beta = 0.35, conv1x1_bn, no warm-up, no cap), each of today's defaults
added alone, and today's defaults. The pair (tests/test_stability.py uses it too): a resnet14 teacher whose head is
scaled to a logit std of 20, a resnet8 student, 64 random 16x16 images, three initialisations.

    python benchmarks/first_gradients.py [--student MobileNetV2]

``--student``: another student of the CIFAR zoo (MobileNetV2, ShuffleV1: a pair of two families, issue 35).
"""
from __future__ import annotations

import argparse

import torch

import blockkd

FORMER = dict(alpha=0.35, beta=0.35, connector="conv1x1_bn", stone_warmup_fraction=0.0, stone_grad_cap=None)
VARIANTS = {"blockkd 0.1 defaults": FORMER, "+ stone_warmup_fraction 0.25": {**FORMER, "stone_warmup_fraction": 0.25},
            "+ stone_grad_cap 1": {**FORMER, "stone_grad_cap": 1.0},
            "+ conv3x3_bn": {**FORMER, "connector": "conv3x3_bn"}, "+ alpha = beta = 1": {**FORMER, "alpha": 1.0,
                                                                                        "beta": 1.0},
            "today's defaults": {}}


def confident_pair(seed: int, student: str = "resnet8", std: float = 20.0):
    """``student`` (resnet8 by default), a resnet14 teacher whose head is scaled to a mean per-sample logit std of
    ``std`` on the batch (a stand-in for a teacher trained to high confidence), and the batch; the same for the
    same seed. tests/test_stability.py uses it too."""
    torch.manual_seed(seed)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    student = blockkd.models.create(student, num_classes=10)
    teacher = blockkd.models.create("resnet14", num_classes=10).eval()
    with torch.no_grad():
        head = [m for m in teacher.modules() if isinstance(m, torch.nn.Linear)][-1]
        scale = std / teacher(x).std(dim=1).mean().item()
        head.weight.mul_(scale), head.bias.mul_(scale)
    return student, teacher, x, y


def student_grad_norm(distiller, x, y, epoch: float) -> float:
    """The norm of the gradient of the distiller's total loss on (x, y) into the student's parameters."""
    _, losses = distiller(x, y, epoch=epoch)
    grads = torch.autograd.grad(sum(losses.values()), list(distiller.student.parameters()))
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()


def grad_norm(method: str, seed: int, student: str, **options) -> float:
    student, teacher, x, y = confident_pair(seed, student)
    d = blockkd.methods.create(method, student, teacher, input_shape=(3, 16, 16), epochs=8, **options).train()
    return student_grad_norm(d, x, y, epoch=1 / 8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", default="resnet8", help="the student (default resnet8; the teacher is resnet14)")
    args = p.parse_args()
    seeds = range(3)
    kd = [grad_norm("kd", s, args.student) for s in seeds]
    print(f"| Block-KD, resnet14 -> {args.student} | first-batch gradient norm / KD's, seeds 0, 1, 2 |\n|---|---|")
    for name, options in VARIANTS.items():
        ratios = [grad_norm("blockkd", s, args.student, **options) / k for s, k in zip(seeds, kd)]
        print(f"| {name} | {', '.join(f'{r:.2f}' for r in ratios)} |")


if __name__ == "__main__":
    main()
