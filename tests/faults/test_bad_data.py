"""Bad data is an input error: a truncated or corrupt image, or a damaged text file, stops the run with exit 2
and one line naming the file, not with a DataLoader traceback; ``data.skip_unreadable`` skips unreadable images
with a warning and a count instead."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from faultlib import one_error_line, write_recipe
from helpers import rows
from PIL import Image

from blockkd import data
from blockkd.data.folder import UnreadableImage
from blockkd.data.text_readers import load_textfile
from blockkd.errors import BlockKDError

CPU = torch.device("cpu")


def image_folder(root: Path) -> Path:
    """2 classes x 6 PNGs of noise (train), 2 x 2 (val); train/c1/3.png truncated, val/c0/1.png not an image."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for k in range(2):
            (root / split / f"c{k}").mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{k}" / f"{i}.png")
    truncated = root / "train" / "c1" / "3.png"
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "val" / "c0" / "1.png").write_bytes(b"these are not the pixels you are looking for")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("bad-images"))


def cfg(root: Path, **extra) -> dict:
    return {"name": "imagefolder", "root": str(root), "image_size": 16, "batch_size": 4, "eval_batch_size": 4,
            "drop_last": False, **extra}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_unreadable_image_is_one_line_naming_it(images, num_workers):
    bundle = data.build(cfg(images, num_workers=num_workers), device=CPU)
    with pytest.raises(UnreadableImage) as e:
        for _ in bundle.train:
            pass
    message = str(e.value)
    assert message.startswith(f"cannot read image {images / 'train' / 'c1' / '3.png'} (OSError: ")
    assert "truncated" in message and "data.skip_unreadable=true" in message and "\n" not in message
    with pytest.raises(BlockKDError, match=f"cannot read image {images / 'val' / 'c0' / '1.png'} "
                                           r"\(UnidentifiedImageError: "):
        for _ in bundle.test:
            pass


def test_skip_unreadable_skips_with_a_warning_and_a_count(images, caplog):
    bundle = data.build(cfg(images, num_workers=2, skip_unreadable=True), device=CPU)
    with caplog.at_level(logging.WARNING, logger="blockkd.engine"):
        for epoch in range(2):
            bundle.set_epoch(epoch)
            labels = torch.cat([y for _, y in bundle.train])
            assert sorted(labels.tolist()) == [0] * 6 + [1] * 5  # 12 images, one unreadable
        assert len(torch.cat([y for _, y in bundle.test])) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # each file once, whatever the epochs
    assert warnings[0].startswith(f"skipping unreadable image {images / 'train' / 'c1' / '3.png'} (OSError: ")
    assert warnings[0].endswith("; 1 skipped so far")
    assert warnings[1].startswith(f"skipping unreadable image {images / 'val' / 'c0' / '1.png'} ")
    assert warnings[1].endswith("; 2 skipped so far")


def test_train_on_a_corrupt_image_exits_2_in_one_line(tmp_path, commands):
    image_folder(tmp_path / "images")
    write_recipe(tmp_path / "r.yaml", method={"name": "ce"}, teacher={},
                 data={"name": "imagefolder", "root": "images", "image_size": 16, "batch_size": 4,
                       "eval_batch_size": 4, "num_workers": 2}, train__epochs=1)
    line = one_error_line(commands.run(["train", "r.yaml"], tmp_path))
    assert line.startswith("error: cannot read image images/train/c1/3.png (OSError: ")
    skipped = commands.run(["train", "r.yaml", "--overwrite", "data.skip_unreadable=true"], tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert "warning: skipping unreadable image images/train/c1/3.png" in skipped.stderr
    assert [r["epoch"] for r in rows(tmp_path / "runs" / "r")] == [1]
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["classes"] == ["c0", "c1"]  # the class folders' names, recorded with the run


TEXT = {"test": None, "val_split": 1, "text_column": "text", "text_pair_column": None, "label_column": "label"}


@pytest.mark.parametrize("name, content, error", [
    ("latin1.csv", b"text,label\ncaf\xe9 au lait,food\nbye,other\n",
     r"cannot read {path}: not UTF-8 text \(byte 14: invalid continuation byte\); save it as UTF-8"),
    ("gzipped.csv", b"\x1f\x8b\x08\x00binary", r"cannot read {path}: not UTF-8 text \(byte 1: invalid start byte\)"),
    ("fields.csv", b"text,label\nhello, world,pos\n", r"{path}, line 2: 3 fields, but the header has 2 "
                                                      r"\(an unquoted comma in a text\?\)"),
    ("tabs.tsv", b"text\tlabel\nhello\tworld\tpos\n", r"{path}, line 2: 3 fields, .*an unquoted tab"),
    ("nested.jsonl", b'{"text": "hi", "label": {"name": "pos"}}\n',
     r"{path}: record 1's 'label' \(label_column\) is a JSON object; expected a string or a number"),
    ("cut.jsonl", b'{"text": "hi", "label": "pos"}\n{"text": "b', r"{path}, line 2: not a JSON object"),
])
def test_damaged_text_files_are_one_line_naming_them(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BlockKDError, match="^" + error.format(path=path)) as e:
        load_textfile({"train": str(path), **TEXT})
    assert "\n" not in str(e.value)
