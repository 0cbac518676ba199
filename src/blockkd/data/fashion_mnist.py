"""Fashion-MNIST from the four standard idx files, parsed with numpy.

Why not torchvision's FashionMNIST class: it only reads its own ``FashionMNIST/raw`` layout, while the
files usually already exist elsewhere (Debian's ``dataset-fashion-mnist`` package, a shared data folder),
and the demo must work offline. Downloading is the last resort.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import BlockKDError
from ..utils import cache_home
from .device_loader import ArrayData

FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
         "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian/Ubuntu: apt-get install dataset-fashion-mnist
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def search_dirs(root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in, in order: data.root, $BLOCKKD_DATA, the user cache, the system package."""
    bases = [Path(root).expanduser()] if root else []
    if os.environ.get("BLOCKKD_DATA"):
        bases.append(Path(os.environ["BLOCKKD_DATA"]).expanduser())
    dirs = [d for b in bases for d in (b, b / "fashion_mnist", b / "fashion-mnist")]
    cache = cache_home() / "fashion_mnist"
    return dirs + [cache, cache / "FashionMNIST" / "raw", SYSTEM_DIR]  # FashionMNIST/raw: torchvision's download


def _file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def find(root: str | os.PathLike | None) -> dict[str, Path] | None:
    """The four files from the first folder that holds all of them, or None."""
    for folder in search_dirs(root):
        files = {k: _file(folder, stem) for k, stem in FILES.items()}
        if all(files.values()):
            return files  # type: ignore[return-value]
    return None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx-format uint8 array (gzip or raw); any malformation is a BlockKDError naming the file."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise BlockKDError(f"corrupt Fashion-MNIST file {path}: {e}") from None
    # Magic number: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise BlockKDError(f"corrupt Fashion-MNIST file {path}: bad magic number (expected 0x0000080{ndim})")
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BlockKDError(f"corrupt Fashion-MNIST file {path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(tuple(int(d) for d in dims))


def _download() -> None:
    from torchvision.datasets import FashionMNIST  # only needed here

    try:
        FashionMNIST(cache_home() / "fashion_mnist", download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise BlockKDError(f"downloading Fashion-MNIST into {cache_home() / 'fashion_mnist'} failed: {e}") from None


def load(cfg: dict) -> ArrayData:
    """Fashion-MNIST as uint8 (N, 1, 28, 28) tensors; searches ``search_dirs`` and downloads if allowed."""
    files = find(cfg.get("root"))
    if files is None and cfg.get("download"):
        _download()
        files = find(cfg.get("root"))
    if files is None:
        looked = ", ".join(str(d) for d in search_dirs(cfg.get("root")))
        raise BlockKDError(f"Fashion-MNIST not found (looked in: {looked}); install it with "
                           f"`sudo apt-get install dataset-fashion-mnist` or set data.download=true")
    arrays = {k: read_idx(p, 3 if k.endswith("x") else 1) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if len(x) != len(y) or x.shape[1:] != (28, 28) or (len(y) and y.max() >= len(CLASSES)):
            raise BlockKDError(f"Fashion-MNIST files {files[split + '_x']} and {files[split + '_y']} do not match: "
                               f"images {x.shape}, {len(y)} labels (max {y.max() if len(y) else None})")
    images = {k: torch.from_numpy(v.copy()).unsqueeze(1) for k, v in arrays.items() if k.endswith("x")}
    labels = {k: torch.from_numpy(v.astype(np.int64)) for k, v in arrays.items() if k.endswith("y")}
    return ArrayData(images["train_x"], labels["train_y"], images["test_x"], labels["test_y"],
                     num_classes=len(CLASSES), mean=MEAN, std=STD, padding=2, flip=True, classes=list(CLASSES))
