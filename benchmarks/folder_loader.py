"""Images/s of the image-folder input pipeline alone (no model): decode + RandomResizedCrop in DataLoader
workers, uint8 batches copied to the device, flip + normalisation there.

Generates N JPEGs of 256x256 (smooth random images, quality 90, ~10 classes) into a temporary folder,
then times full epochs of ``blockkd.data.build({"name": "imagefolder", ...}).train``; the first epoch
(worker start-up, cold page cache) is reported separately. Real ImageNet JPEGs are larger (~400x350 on
average), so expect fewer images/s per core there.

    python benchmarks/folder_loader.py --images 2000 --workers 2 --device auto

Without a GPU, set OMP_NUM_THREADS=1: the main process's intra-op threads (normalising on the CPU)
otherwise fight the workers for the cores (5x fewer images/s on a busy 2-core machine).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blockkd import data
from blockkd.engine.runtime import resolve_device


def make_folder(root: Path, n: int, classes: int = 10, size: int = 256, seed: int = 0) -> None:
    """``n`` JPEGs under root/train/<class>/ and a few under root/val/<class>/."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", classes)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
            noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, size, 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[min(8, os.cpu_count() or 1)])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the first")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        make_folder(Path(tmp), args.images)
        print(f"generated {args.images} JPEGs of 256x256 in {time.perf_counter() - start:.1f}s; "
              f"device {device}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
        for workers in args.workers:
            cfg = {"name": "imagefolder", "root": tmp, "batch_size": args.batch_size, "num_workers": workers,
                   "image_size": args.image_size}
            bundle = data.build(cfg, device=device)
            rates = []
            for epoch in range(1 + args.epochs):
                bundle.set_epoch(epoch)
                n, start = 0, time.perf_counter()
                for x, _ in bundle.train:
                    n += x.shape[0]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                rates.append(n / (time.perf_counter() - start))
            print(f"workers {workers}: first epoch {rates[0]:.0f} images/s, then "
                  f"{np.mean(rates[1:]):.0f} images/s ({args.image_size}px crops, batch {args.batch_size})")


if __name__ == "__main__":
    main()
