"""blockkd.data: on-device augmentation semantics, determinism, DDP shards, and every dataset reader."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockkd import data
from blockkd.data import cifar, fashion_mnist
from blockkd.data.common import Normalize
from blockkd.data.device_loader import DeviceLoader
from blockkd.errors import BlockKDError

CPU = torch.device("cpu")


def synth(**kw) -> dict:
    return {"name": "synthetic", "train_size": 96, "test_size": 40, "image_size": 8, "batch_size": 16,
            "eval_batch_size": 16, **kw}


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def id_loader(n: int, *, shuffle: bool, batch_size: int, rank: int = 0, world_size: int = 1,
              drop_last: bool = False, seed: int = 0) -> DeviceLoader:
    """A loader whose 1x1x2 images spell their own index; identity normalisation returns raw pixels."""
    idx = torch.arange(n)
    x = torch.stack([idx // 256, idx % 256], 1).view(n, 1, 1, 2).to(torch.uint8)
    return DeviceLoader(x, idx, batch_size=batch_size, normalize=Normalize((0.0,), (1 / 255,), CPU),
                        shuffle=shuffle, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size)


def ids(loader: DeviceLoader) -> list[list[int]]:
    """Sample ids of every batch; also checks that labels travel with their images."""
    out = []
    for x, y in loader:
        i = (x[:, 0, 0, 0] * 256 + x[:, 0, 0, 1]).round().long()
        assert torch.equal(i, y)
        out.append(i.tolist())
    assert len(out) == len(loader)
    return out


# ---------------------------------------------------------------- augmentation semantics

def test_crop_flip_equals_padded_slice_per_sample():
    x = torch.randint(0, 256, (64, 3, 7, 9), dtype=torch.uint8)
    top, left, flip = data.sample_crop_flip(64, 2, True, torch.Generator().manual_seed(1))
    out = data.crop_flip(x, 2, top, left, flip)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(64):
        t, l = int(top[i]), int(left[i])
        ref = padded[i, :, t:t + 7, l:l + 9]
        assert torch.equal(out[i], ref.flip(-1) if flip[i] else ref)
    # the draws cover the whole range of offsets and both flip states
    assert set(top.tolist()) == set(range(5)) and set(left.tolist()) == set(range(5))
    assert 0 < int(flip.sum()) < 64
    assert not data.sample_crop_flip(64, 2, False, torch.Generator())[2].any()


def test_loader_outputs_are_crops_of_their_own_image():
    """Every augmented sample is some (offset, flip) variant of the image its label belongs to."""
    n, pad = 24, 1
    x = torch.randint(0, 256, (n, 2, 5, 5), dtype=torch.uint8)
    norm = Normalize((0.3, 0.6), (0.2, 0.25), CPU)
    loader = DeviceLoader(x, torch.arange(n), batch_size=5, normalize=norm, shuffle=True, padding=pad,
                          flip=True, augment=True, seed=3)
    ones = torch.ones(n, dtype=torch.long)
    variants = torch.stack([norm(data.crop_flip(x, pad, t * ones, l * ones, torch.full((n,), f)))
                            for t in range(3) for l in range(3) for f in (False, True)], 1)  # (n, 18, C, H, W)
    out, y = collect(loader)
    assert sorted(y.tolist()) == list(range(n))  # drop_last=False: one epoch is every sample once
    which = [int(torch.nonzero((variants[j] - o).abs().amax((1, 2, 3)) < 1e-6)[0]) for o, j in zip(out, y.tolist())]
    assert len(set(which)) > 6  # offsets and flips really vary between samples


def test_without_augmentation_images_are_normalised_originals():
    bundle = data.build(synth(augment=False), device=CPU)
    raw = data.arrays(synth())
    mean, std = torch.tensor(bundle.mean).view(1, -1, 1, 1), torch.tensor(bundle.std).view(1, -1, 1, 1)
    ref_test = (raw.test_x.float() / 255 - mean) / std
    tx, ty = collect(bundle.test)
    assert tx.dtype == torch.float32 and ty.dtype == torch.int64
    assert torch.allclose(tx, ref_test, atol=1e-5) and torch.equal(ty, raw.test_y)
    ref_train = (raw.train_x.float() / 255 - mean) / std
    out, y = collect(bundle.train)
    for o, label in zip(out, y):
        j = int(torch.nonzero((ref_train - o).abs().amax((1, 2, 3)) < 1e-5)[0])
        assert raw.train_y[j] == label


def test_synthetic_is_deterministic_and_normalised():
    a = data.arrays(synth())
    b = data.arrays(synth())
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape == (96, 3, 8, 8)
    assert sorted(a.train_y.unique().tolist()) == list(range(10))
    tx, _ = collect(data.build(synth(augment=False), device=CPU).train)
    assert tx.mean((0, 2, 3)).abs().max() < 0.1 and (tx.std((0, 2, 3)) - 1).abs().max() < 0.1
    # learnable: nearest class template (train mean per class) classifies the test set well
    centroids = torch.stack([a.train_x[a.train_y == k].float().mean(0) for k in range(10)])
    pred = torch.cdist(a.test_x.float().flatten(1), centroids.flatten(1)).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.9


# ---------------------------------------------------------------- determinism and sharding

def test_same_seed_and_epoch_give_identical_batches():
    a, b = (data.build(synth(), device=CPU, seed=5) for _ in range(2))
    xa, ya = collect(a.train)
    xb, yb = collect(b.train)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    x1, y1 = collect(a.train)
    assert not torch.equal(y1, ya) and not torch.equal(x1, xa)
    a.set_epoch(0)
    assert torch.equal(collect(a.train)[0], xa)  # resuming epoch 0 replays it exactly
    other = data.build(synth(), device=CPU, seed=6)
    assert not torch.equal(collect(other.train)[1], ya)


@pytest.mark.parametrize("drop_last", [True, False])
def test_train_shards_are_disjoint_and_cover_the_epoch(drop_last):
    n, per_rank = 37, 4
    shards = [ids(id_loader(n, shuffle=True, batch_size=per_rank, rank=r, world_size=2, drop_last=drop_last))
              for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # same number of steps on every rank
    flat = [sum(s, []) for s in shards]
    assert not set(flat[0]) & set(flat[1])
    covered = sorted(flat[0] + flat[1])
    assert covered == (sorted(covered) if drop_last else list(range(n)))
    assert len(covered) == (32 if drop_last else 37) and len(set(covered)) == len(covered)
    assert all(len(b) == per_rank for s in shards for b in s[:4])  # 4 full global batches of 8
    if not drop_last:  # the 5 left over are split 3 + 2, so both ranks take a 5th step
        assert [len(s[4]) for s in shards] == [3, 2]
    # rank r holds the r-th half of each global batch of the shared permutation
    single = ids(id_loader(n, shuffle=True, batch_size=2 * per_rank, drop_last=True))
    for k, batch in enumerate(single):
        assert shards[0][k] == batch[:per_rank] and shards[1][k] == batch[per_rank:]


def test_eval_shards_cover_every_sample_once():
    n = 23
    shards = [ids(id_loader(n, shuffle=False, batch_size=4, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(n))
    assert ids(id_loader(n, shuffle=False, batch_size=4)) == [list(range(i, min(i + 4, n))) for i in range(0, n, 4)]


def test_build_with_world_size_splits_the_global_batch():
    bundles = [data.build(synth(batch_size=16), device=CPU, rank=r, world_size=2) for r in range(2)]
    assert [len(b.train) for b in bundles] == [6, 6]
    assert next(iter(bundles[0].train))[0].shape[0] == 8
    assert sum(len(collect(b.test)[1]) for b in bundles) == 40
    with pytest.raises(BlockKDError, match="global batch size"):
        data.build(synth(batch_size=15), device=CPU, rank=0, world_size=2)
    with pytest.raises(BlockKDError, match="rank"):
        data.build(synth(), device=CPU, rank=2, world_size=2)


def test_subset_and_val_split_sizes():
    b = data.build(synth(train_subset=40), device=CPU)
    assert (b.train_size, b.test_size, len(b.train)) == (40, 40, 2)
    v = data.build(synth(val_split=30, augment=False, drop_last=False), device=CPU)
    assert (v.train_size, v.test_size, len(v.train), len(v.test)) == (66, 30, 5, 2)
    held, _ = collect(v.test)
    train, _ = collect(v.train)
    assert torch.cdist(held.flatten(1), train.flatten(1)).min() > 0  # held-out images never trained on
    both = data.build(synth(val_split=30, train_subset=20), device=CPU)
    assert (both.train_size, both.test_size) == (20, 30)
    # the held-out split does not depend on the training seed
    assert torch.equal(collect(data.build(synth(val_split=30), device=CPU, seed=9).test)[0], held)
    for bad in ({"val_split": 96}, {"train_subset": 97}, {"train_subset": 0}):
        with pytest.raises(BlockKDError):
            data.build(synth(**bad), device=CPU)
    with pytest.raises(BlockKDError, match="fewer than one batch"):
        data.build(synth(train_subset=10), device=CPU)


def test_config_errors_and_defaults():
    section = data.parse({"name": "cifar100"})  # only the keys that apply to the dataset
    assert set(section.flat()) == {"name", "root", "batch_size", "eval_batch_size", "augment", "train_subset",
                                   "val_split", "download", "drop_last"}
    own = {"image_size", "num_workers", "skip_unreadable"}
    assert set(data.parse({"name": "imagefolder"}).flat()) - set(section.flat()) == own
    with pytest.raises(BlockKDError, match=r"data.train_size \(set in the data config\) does not apply to dataset "
                                           r"'cifar100'"):
        data.parse({"name": "cifar100", "train_size": 10})
    with pytest.raises(BlockKDError, match="did you mean 'cifar100'"):
        data.build({"name": "cifar-100"}, device=CPU)
    with pytest.raises(BlockKDError, match="did you mean 'data.batch_size'"):
        data.build({"name": "synthetic", "batchsize": 3}, device=CPU)


# ---------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    blob = header + array.astype(np.uint8).tobytes()
    if gz:
        blob = gzip.compress(blob)
    path.write_bytes(blob)


def fake_fashion(folder: Path, n_train: int = 20, n_test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28)), "train_y": np.arange(n_train) % 10,
              "test_x": rng.integers(0, 256, (n_test, 28, 28)), "test_y": np.arange(n_test)[::-1] % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in fashion_mnist.FILES.items():
        gz = key != "test_y"  # both compressed and raw files are accepted
        write_idx(folder / (stem + ".gz" if gz else stem), arrays[key], gz)
    return arrays


def test_fashion_mnist_real_files():
    b = data.build({"name": "fashion_mnist", "augment": False, "eval_batch_size": 2000}, device=CPU)
    assert (b.train_size, b.test_size, b.num_classes, b.input_shape) == (60000, 10000, 10, (1, 28, 28))
    x, y = collect(b.test)
    assert x.shape == (10000, 1, 28, 28) and sorted(y.unique().tolist()) == list(range(10))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # the standard mean/std fit


def test_fashion_mnist_from_root(tmp_path):
    arrays = fake_fashion(tmp_path / "fashion-mnist")
    raw = data.arrays({"name": "fashion_mnist", "root": str(tmp_path)})
    assert torch.equal(raw.train_x[:, 0], torch.from_numpy(arrays["train_x"].astype(np.uint8)))
    assert raw.test_y.tolist() == arrays["test_y"].tolist() and raw.test_y.dtype == torch.int64
    b = data.build({"name": "fashion_mnist", "root": str(tmp_path), "batch_size": 8}, device=CPU)
    assert (b.train_size, b.test_size, len(b.train), len(b.test)) == (20, 12, 2, 1)
    x, y = next(iter(b.train))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32


def test_fashion_mnist_corrupt_and_missing(tmp_path, monkeypatch):
    fake_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(100)))  # 1-d where 3-d is expected
    with pytest.raises(BlockKDError, match="train-images-idx3-ubyte.gz.*magic"):
        data.build({"name": "fashion_mnist", "root": str(tmp_path)}, device=CPU)
    bad.write_bytes(gzip.compress(bytes(200))[:30])  # truncated gzip stream
    with pytest.raises(BlockKDError, match="corrupt Fashion-MNIST file .*train-images"):
        data.build({"name": "fashion_mnist", "root": str(tmp_path)}, device=CPU)
    write_idx(bad, np.zeros((5, 28, 28)))  # 5 images, 20 labels
    with pytest.raises(BlockKDError, match="do not match"):
        data.build({"name": "fashion_mnist", "root": str(tmp_path)}, device=CPU)
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BLOCKKD_DATA", raising=False)
    with pytest.raises(BlockKDError, match=r"not found \(looked in: .*empty.*nowhere.*apt-get install"):
        data.build({"name": "fashion_mnist", "root": str(tmp_path / "empty")}, device=CPU)


# ---------------------------------------------------------------- CIFAR

def fake_cifar(root: Path, num_classes: int, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """A tiny CIFAR folder in torchvision's pickle format."""
    rng = np.random.default_rng(num_classes)
    folder = root / cifar.torchvision_class(num_classes).base_folder
    folder.mkdir(parents=True)
    out = {"train_x": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
           "train_y": rng.integers(0, num_classes, n_train),
           "test_x": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
           "test_y": rng.integers(0, num_classes, n_test)}
    key = "labels" if num_classes == 10 else "fine_labels"
    cls = cifar.torchvision_class(num_classes)
    train_files = [name for name, _ in cls.train_list]
    parts = np.array_split(np.arange(n_train), len(train_files))
    for name, part in zip(train_files, parts):
        entry = {"data": out["train_x"][part], key: out["train_y"][part].tolist()}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / cls.test_list[0][0]).write_bytes(pickle.dumps({"data": out["test_x"], key: out["test_y"].tolist()}))
    meta = {cls.meta["key"]: [f"c{i}" for i in range(num_classes)]}
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps(meta))
    return out


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_from_fake_folder(tmp_path, num_classes):
    arrays = fake_cifar(tmp_path, num_classes)
    cfg = {"name": f"cifar{num_classes}", "root": str(tmp_path), "batch_size": 4, "augment": False}
    b = data.build(cfg, device=CPU)
    assert (b.num_classes, b.input_shape, b.train_size, b.test_size) == (num_classes, (3, 32, 32), 20, 10)
    assert b.classes[:2] == ["c0", "c1"]
    x, y = collect(b.test)
    mean, std = cifar.STATS[num_classes]
    ref = torch.from_numpy(arrays["test_x"]).view(10, 3, 32, 32).float() / 255
    ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5) and y.tolist() == arrays["test_y"].tolist()


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(BlockKDError, match=f"expected {tmp_path / 'cifar-100-python'}"):
        data.build({"name": "cifar100", "root": str(tmp_path)}, device=CPU)
    fake_cifar(tmp_path, 100)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(BlockKDError, match="cannot read CIFAR-100"):
        data.build({"name": "cifar100", "root": str(tmp_path)}, device=CPU)


# ---------------------------------------------------------------- image folders

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    for split, count in (("train", 4), ("val", 2)):
        for k, color in enumerate(COLORS):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40 + 4 * i, 36), color).save(folder / f"{i}.jpg", quality=95)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_imagefolder(image_root, num_workers):
    cfg = {"name": "imagefolder", "root": str(image_root), "image_size": 32, "batch_size": 4,
           "eval_batch_size": 4, "num_workers": num_workers}
    b = data.build(cfg, device=CPU)
    assert (b.num_classes, b.input_shape, b.train_size, b.test_size) == (3, (3, 32, 32), 12, 6)
    assert b.classes == ["class0", "class1", "class2"] and len(b.train) == 3 and len(b.test) == 2
    x, y = collect(b.train)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32 and sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    tx, ty = collect(b.test)
    assert ty.tolist() == [0, 0, 1, 1, 2, 2]
    mean, std = torch.tensor(data.folder.MEAN), torch.tensor(data.folder.STD)
    for images, labels in ((tx, ty), (x, y)):  # solid colours: every pixel is the class colour, normalised
        expected = (torch.tensor(COLORS, dtype=torch.float)[labels] / 255 - mean) / std
        assert (images - expected[:, :, None, None]).abs().max() < 0.1


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory) -> Path:
    """Image folders of random noise: unlike solid colours, every crop of them is a different image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / "train" / f"c{k}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(
                root / "train" / f"c{k}" / f"{i}.png")
    return root


def test_imagefolder_epoch_replays_exactly_whatever_the_workers_did_before(noise_root):
    """Resume of an image-folder run is exact: an epoch's order and every sample's augmentation depend only on
    (seed, epoch, index), not on the (persistent) workers' history, so a fresh loader that starts at epoch 1
    (a resumed run) delivers what a loader that went through epoch 0 first delivers."""
    cfg = {"name": "imagefolder", "root": str(noise_root), "image_size": 16, "batch_size": 4, "num_workers": 2,
           "val_split": 2}
    ran = data.build(cfg, device=CPU, seed=3)
    ran.set_epoch(0)
    first = collect(ran.train)
    ran.set_epoch(1)
    after = collect(ran.train)
    resumed = data.build(cfg, device=CPU, seed=3)
    resumed.set_epoch(1)
    fresh = collect(resumed.train)
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])
    assert not torch.equal(first[0], after[0])  # the epochs themselves differ (shuffle and crops)
    inline = data.build({**cfg, "num_workers": 0}, device=CPU, seed=3)  # and the workers change nothing
    inline.set_epoch(1)
    assert torch.equal(collect(inline.train)[0], fresh[0])


def test_imagefolder_val_split_shards_and_missing(image_root, tmp_path):
    cfg = {"name": "imagefolder", "root": str(image_root), "image_size": 16, "batch_size": 2, "num_workers": 0}
    b = data.build({**cfg, "val_split": 3}, device=CPU)
    assert (b.train_size, b.test_size) == (9, 3)
    shards = [data.build(cfg, device=CPU, rank=r, world_size=2) for r in range(2)]
    assert [len(collect(s.test)[1]) for s in shards] == [3, 3]
    assert next(iter(shards[0].train))[0].shape == (1, 3, 16, 16)  # global batch 2 over 2 ranks
    with pytest.raises(BlockKDError, match=str(tmp_path / "train")):
        data.build({**cfg, "root": str(tmp_path)}, device=CPU)
