"""Text readers: the raw texts and labels of each text dataset (your CSV/TSV/JSONL files, GLUE through the
datasets library, Debian's fortune files), before any tokenisation.

Why a module of their own: reading is where bad input shows up (a missing column, an unknown label, a file
that is not UTF-8), so every check here names the file and what to do, and nothing here needs a tokenizer.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import BlockKDError
from ..registry import closest
from .tokenizer import NLP_INSTALL

# GLUE: task -> (text column, pair column, classes, extra metrics, test split). Test labels are hidden, so the
# validation split is the test split (MNLI: the matched one), as in every KD paper's GLUE dev results.
GLUE = {
    "cola": ("sentence", None, 2, ("matthews",), "validation"),
    "sst2": ("sentence", None, 2, (), "validation"),
    "mrpc": ("sentence1", "sentence2", 2, ("f1",), "validation"),
    "qqp": ("question1", "question2", 2, ("f1",), "validation"),
    "mnli": ("premise", "hypothesis", 3, (), "validation_matched"),
    "qnli": ("question", "sentence", 2, (), "validation"),
    "rte": ("sentence1", "sentence2", 2, (), "validation"),
    "wnli": ("sentence1", "sentence2", 2, (), "validation"),
}
REGRESSION = {"stsb": "a similarity score from 0 to 5"}

FORTUNES_ROOT = "/usr/share/games/fortunes"
FORTUNE_CATEGORIES = ["computers", "food", "law", "literature", "science", "sports"]

@dataclasses.dataclass
class Split:
    """Texts (and second texts of pairs), and labels as class indices."""

    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray

    def take(self, idx: torch.Tensor | None) -> "Split":
        if idx is None:
            return self
        i = idx.tolist()
        return Split([self.texts[k] for k in i], None if self.pairs is None else [self.pairs[k] for k in i],
                     self.labels[i])


@dataclasses.dataclass
class RawText:
    train: Split
    test: Split | None  # None: held out from train by val_split
    classes: list[str]
    metric_names: tuple[str, ...] = ()
    name: str | None = None  # shown in logs and summaries (glue: glue-<task>); None: data.name


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a CSV/TSV/JSONL file and its column names."""
    if not path.is_file():
        raise BlockKDError(f"text file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = []
                for row in reader:
                    if None in row:  # more fields than the header: a damaged or misquoted line
                        raise BlockKDError(f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} "
                                           f"fields, but the header has {len(reader.fieldnames)} (an unquoted "
                                           f"{'tab' if suffix == '.tsv' else 'comma'} in a text?)")
                    rows.append(row)
                return rows, list(reader.fieldnames or [])
        if suffix in (".jsonl", ".json"):
            rows, columns = [], {}
            with path.open(encoding="utf-8") as f:
                for number_, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BlockKDError(f"{path}, line {number_}: not a JSON object ({e.msg}); JSONL files hold "
                                           f"one object per line") from None
                    if not isinstance(row, dict):
                        raise BlockKDError(f"{path}, line {number_}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
                    columns.update(dict.fromkeys(row))
            return rows, list(columns)
    except UnicodeDecodeError as e:
        raise BlockKDError(f"cannot read {path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
                           ) from None
    except (OSError, csv.Error) as e:
        raise BlockKDError(f"cannot read {path}: {e}") from None
    raise BlockKDError(f"text file {path} must end in .csv, .tsv or .jsonl")


def _column(rows: list[dict], columns: list[str], key: str, name: str, path: Path) -> list:
    if name not in columns:
        hint = closest(name, columns)
        tip = f"; did you mean {hint!r}?" if hint else ""
        raise BlockKDError(f"data.{key}={name!r} is not a column of {path} (its columns: {', '.join(columns)}){tip}")
    values = [row.get(name) for row in rows]
    missing = next((i for i, v in enumerate(values) if v is None), None)
    if missing is not None:
        raise BlockKDError(f"{path}: record {missing + 1} has no {name!r} ({key})")
    nested = next((i for i, v in enumerate(values) if isinstance(v, (dict, list))), None)
    if nested is not None:
        raise BlockKDError(f"{path}: record {nested + 1}'s {name!r} ({key}) is a JSON "
                           f"{'object' if isinstance(values[nested], dict) else 'list'}; expected a string or a number")
    return values


def _label_classes(labels: list) -> list[str]:
    """Class names in index order: integer labels sorted numerically (0..K-1 stay themselves), else sorted."""
    names = sorted({str(v) for v in labels})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    return names


def _to_indices(labels: list, classes: list[str], path: Path, key: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    unknown = next((str(v) for v in labels if str(v) not in index), None)
    if unknown is not None:
        raise BlockKDError(f"{path}: label {unknown!r} ({key}) does not occur in the training file "
                           f"(its labels: {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    return np.array([index[str(v)] for v in labels], dtype=np.int64)


def load_textfile(cfg: dict) -> RawText:
    def read(path: Path) -> tuple[list[str], list[str] | None, list]:
        rows, columns = _read_rows(path)
        if not rows:
            raise BlockKDError(f"text file {path} holds no records")
        texts = [str(v) for v in _column(rows, columns, "text_column", cfg["text_column"], path)]
        pairs = None
        if cfg["text_pair_column"]:
            pairs = [str(v) for v in _column(rows, columns, "text_pair_column", cfg["text_pair_column"], path)]
        return texts, pairs, _column(rows, columns, "label_column", cfg["label_column"], path)

    train_path = Path(cfg["train"]).expanduser()
    texts, pairs, labels = read(train_path)
    classes = _label_classes(labels)
    train = Split(texts, pairs, _to_indices(labels, classes, train_path, "label_column"))
    test = None
    if cfg["test"]:
        test_path = Path(cfg["test"]).expanduser()
        t_texts, t_pairs, t_labels = read(test_path)
        test = Split(t_texts, t_pairs, _to_indices(t_labels, classes, test_path, "label_column"))
    elif not cfg["val_split"]:
        raise BlockKDError("data.test is not set: name a test file, or hold out training samples with data.val_split=N")
    return RawText(train, test, classes)


def load_glue(cfg: dict) -> RawText:
    task = cfg["task"]
    text_col, pair_col, num_classes, metric_names, test_split = GLUE[task]
    try:
        import datasets
    except ImportError:
        raise BlockKDError(f"GLUE needs the datasets package: {NLP_INSTALL} (or pip install datasets)") from None
    try:
        ds = datasets.load_dataset(cfg["root"], task)
    except Exception as e:  # no connection, no cache, a bad local copy: one line, with what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BlockKDError(f"cannot load GLUE {task} from {cfg['root']!r} ({type(e).__name__}: {first}); offline, "
                           f"run `hf download nyu-mll/glue --repo-type dataset --local-dir data/glue` "
                           f"on a connected machine and set data.root=data/glue") from None

    def split(name: str) -> Split:
        part = ds[name]
        labels = np.asarray(list(part["label"]), dtype=np.int64)  # datasets 4: a Column, not a list
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise BlockKDError(f"GLUE {task} {name}: labels outside 0..{num_classes - 1} (hidden test labels?)")
        return Split([str(t) for t in part[text_col]],
                     None if pair_col is None else [str(t) for t in part[pair_col]], labels)

    names = getattr(ds["train"].features.get("label"), "names", None) or [str(i) for i in range(num_classes)]
    return RawText(split("train"), split(test_split), list(names), metric_names, f"glue-{task}")


def read_fortunes(path: Path) -> list[str]:
    """The entries of one fortune file (separated by lines holding ``%``), overstriking removed."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise BlockKDError(f"cannot read fortune file {path}: {e.strerror}") from None
    text = re.sub(r".\x08", "", text)  # "x\bx" bold / "_\bx" underline of old terminals
    return [e.strip() for e in re.split(r"^%\s*$", text, flags=re.M) if e.strip()]


def fortune_files(root: Path) -> list[str]:
    """The names of the fortune files in ``root``, sorted (the ``.dat`` indexes and ``.u8`` links left out)."""
    return sorted(p.name for p in root.glob("*") if p.is_file() and "." not in p.name) if root.is_dir() else []


def load_fortunes(cfg: dict) -> RawText:
    """Each category file is a class. Entries are ordered by the hash of their text (independent of the file's
    order and of the seed), entries found in several categories dropped, the first ``max_per_class`` kept, and
    the first ``test_fraction`` of those are the test split: the same split on every machine."""
    root = Path(cfg["root"]).expanduser()
    categories = list(cfg["categories"])
    if len(set(categories)) != len(categories):
        raise BlockKDError(f"data.categories lists a category twice: {categories}")
    available = fortune_files(root)
    entries = {}
    for name in categories:
        if name not in available:
            if not available:
                raise BlockKDError(f"no fortune files in {root}: install Debian's fortunes package "
                                   f"(apt-get install fortunes) or set data.root")
            hint = closest(name, available)
            tip = f"did you mean {hint!r}?" if hint else f"choose from: {', '.join(available)}"
            raise BlockKDError(f"fortune category {name!r} (data.categories) is not a file of {root}; {tip}")
        entries[name] = read_fortunes(root / name)
    seen: dict[str, int] = {}
    for items in entries.values():
        for t in set(items):
            seen[t] = seen.get(t, 0) + 1
    key = lambda t: hashlib.sha1(t.encode()).hexdigest()  # noqa: E731
    train, test = Split([], None, np.zeros(0, np.int64)), Split([], None, np.zeros(0, np.int64))
    train_labels, test_labels = [], []
    for label, name in enumerate(categories):
        items = sorted({t for t in entries[name] if seen[t] == 1}, key=key)[: cfg["max_per_class"]]
        n_test = max(1, round(cfg["test_fraction"] * len(items)))
        if len(items) - n_test < 1:
            raise BlockKDError(f"fortune category {name!r} has only {len(items)} usable entries")
        test.texts += items[:n_test]
        train.texts += items[n_test:]
        test_labels += [label] * n_test
        train_labels += [label] * (len(items) - n_test)
    train.labels, test.labels = np.array(train_labels, np.int64), np.array(test_labels, np.int64)
    return RawText(train, test, categories)
