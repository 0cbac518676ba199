"""How hard each Block-KD stepping-stone pulls on the student, per student family (docs/blockkd.md,
"Across architecture families").

    python benchmarks/stone_pull.py [--teacher runs/fashion_mnist-teacher] [--students resnet8 ShuffleV1 MobileNetV2]

For the Fashion-MNIST teacher (resnet20, a run folder) and each student (fresh, seed 0), on the first 128
training images, with the Fashion-MNIST recipe's Block-KD options and the stones fully ramped in: the matched
blocks, the deepest connector's weights, the rms of the student's feature at each stone's block, the norm of
the gradient the student's own terms and each stone send into that feature (unbounded), and each part's
gradient norm in the student's parameters (``diagnostics``) without and with ``stone_grad_cap`` 1. Measures;
asserts nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from blockkd import methods
from blockkd.data.fashion_mnist import MEAN, STD, find, read_idx
from blockkd.engine.checkpoint import WEIGHTS
from blockkd.methods.losses import cross_entropy
from blockkd.models import create, read_state_dict

RECIPE = {"alpha": 1.0, "beta": 1.0, "connector": "conv3x3_bn"}  # configs/fashion_mnist/blockkd.yaml


def teacher_from(run: Path) -> torch.nn.Module:
    sd = read_state_dict(run / "last" / WEIGHTS)
    t = create("resnet20", 10, 1)
    t.load_state_dict({k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")})
    return t.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="runs/fashion_mnist-teacher", help="run folder of the resnet20 teacher")
    p.add_argument("--students", nargs="+", default=["resnet8", "ShuffleV1", "MobileNetV2"])
    args = p.parse_args()
    files = find(None)
    x = torch.tensor(read_idx(files["train_x"], 3)[:128], dtype=torch.float32)[:, None] / 255
    x = (x - MEAN[0]) / STD[0]
    y = torch.tensor(read_idx(files["train_y"], 1)[:128]).long()
    for name in args.students:
        parts = {}
        for cap in (None, 1.0):
            torch.manual_seed(0)
            d = methods.create("blockkd", create(name, 10, 1), teacher_from(Path(args.teacher)),
                               input_shape=(1, 28, 28), epochs=8, stone_grad_cap=cap, **RECIPE).train()
            parts[cap] = d.diagnostics(x, y, epoch=1e9)
        feats, logits = d._views[0].features(x)
        t_logits = d.teacher_logits(x)
        stones = d.run_stones(feats, d.stone_ids, x)
        ce, dist = cross_entropy(logits, y), d.d(logits, t_logits)
        terms = [(cross_entropy(z, y), d.d(z, t_logits)) for z in stones]
        shapes = [tuple(f.shape[1:]) for f in feats]
        print(f"{name}: {d.num_blocks} blocks {shapes}; deepest connector "
              f"{sum(p.numel() for p in d.connectors[-1].parameters())} weights")
        for k, (i, w) in enumerate(zip(d.stone_ids, d.stone_weights)):
            own = torch.autograd.grad(d.opts.alpha * ce + d.opts.beta * dist, feats[i], retain_graph=True)[0]
            stone = torch.autograd.grad(w * (d.opts.alpha * terms[k][0] + d.opts.beta * terms[k][1]), feats[i],
                                        retain_graph=True)[0]
            print(f"  stone{i + 1} at block {i + 1}: feature rms {feats[i].pow(2).mean().sqrt():.3f}; gradient "
                  f"into it: own terms {own.norm():.4f}, stone {stone.norm():.4f} ({stone.norm() / own.norm():.1f}x)")
        for cap, norms in parts.items():
            print(f"  parameters, stone_grad_cap {cap}: " + ", ".join(f"{k[10:]} {v:.2f}" for k, v in norms.items()))


if __name__ == "__main__":
    main()
