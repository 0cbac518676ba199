"""Pre-train the text benchmark's BERT teacher by masked-language modelling, as real text teachers are.

    python benchmarks/fortunes_mlm.py [--arch CONFIG.json] [--out runs/fortunes-bert-mlm] [--tokenizer FOLDER]
                                      [--epochs 30] [--quick] [--force]

Why: trained from scratch on the task's labelled texts, the teacher memorised them as the students do and
ended no better than a student trained alone (53.06 vs ce 52.41 ± 1.18, results/text-ce.md): nothing to
distil. A BERT teacher in practice has read far more text than its task. Here it reads every entry of Debian's
fortune files (~14.5k; all files, not only the task's six) except the task's test texts, so no test text is
ever seen, labelled or not. The students keep starting from random weights: what they gain over ``ce`` is what
distillation hands down.

The tokenizer is a WordPiece (BERT's) trained on the task's training texts, the one a model trained from
scratch on the task would get (``data.tokenizer: wordpiece``): a WordPiece trained on this whole corpus left the
randomly initialised students unstable (results/README.md, "Text"). It is saved in the folder and the recipes
read it from there (``data.tokenizer: <folder>``), because trained again a WordPiece need not give the same
ids (two trainings on the same texts, in two processes, did not here).

Writes one ``save_pretrained`` folder: the encoder weights (safetensors), the model config
(``configs/fortunes/models/teacher.json``'s architecture) and that tokenizer. ``configs/fortunes`` names it
twice: ``hf.<folder>`` fine-tunes it as the teacher (a fresh classifier on the pretrained encoder), and
``data.tokenizer: <folder>`` gives students and teacher the same tokens. ``pretraining.json`` beside the
weights records the corpus, the schedule and the held-out MLM loss per epoch. The folder appears whole or not
at all (written beside it, then renamed); an existing one is kept unless ``--force``. ``--arch
configs/fortunes/models/student.json --tokenizer runs/fortunes-bert-mlm --out runs/fortunes-bert-mlm-student``
pre-trains a student the same way with the teacher's tokenizer (a measurement on the recipe in
results/README.md, "Text"; the recipes' students do not use it).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from common import machine_info

from blockkd import config as bk_config
from blockkd.data.text_readers import fortune_files, load_fortunes, read_fortunes
from blockkd.data.tokenizer import load_tokenizer, trained_tokenizer
from blockkd.errors import BlockKDError

ARCH = "configs/fortunes/models/teacher.json"


def corpus(options: dict) -> tuple[list[str], int]:
    """Every fortune entry of ``options['root']`` but the task's test texts, deduplicated, in a fixed order
    (by hash, as the task's split); also how many entries were left out as test texts."""
    root = Path(options["root"]).expanduser()
    test = set(load_fortunes(options).test.texts)
    texts: set[str] = set()
    for name in fortune_files(root):
        texts.update(read_fortunes(root / name))
    kept = sorted(texts - test, key=lambda t: hashlib.sha1(t.encode()).hexdigest())
    return kept, len(texts & test)


def pretrain(args: argparse.Namespace) -> dict:
    import transformers as tf

    torch.manual_seed(args.seed)
    data = bk_config.load(args.recipe).data
    options = dataclasses.asdict(data.options)
    texts, n_test = corpus(options)
    if args.quick:
        texts = texts[:256]
    n_val = max(1, len(texts) // 20)  # 5 %: the held-out MLM loss says the pretraining learnt something
    val, train = texts[:n_val], texts[n_val:]
    # the task's training texts under the dataset's name: what data.tokenizer: wordpiece trains, same cache key
    tok = (load_tokenizer(args.tokenizer, vocab_size=options["vocab_size"], texts=[], name="fortunes-mlm")
           if args.tokenizer else
           trained_tokenizer("wordpiece", options["vocab_size"], load_fortunes(options).train.texts, data.name))
    arch = tf.AutoConfig.from_pretrained(args.arch)
    if len(tok) > arch.vocab_size:
        raise BlockKDError(f"the tokenizer has {len(tok)} tokens, more than {args.arch}'s vocab_size "
                           f"{arch.vocab_size}")
    model = tf.BertForMaskedLM(arch).to(args.device)
    collate = tf.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    length = min(options["max_length"], arch.max_position_embeddings)
    enc_train = tok(train, truncation=True, max_length=length)["input_ids"]
    enc_val = tok(val, truncation=True, max_length=length)["input_ids"]
    steps_per_epoch = len(enc_train) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = tf.get_linear_schedule_with_warmup(opt, steps_per_epoch, total)
    gen = torch.Generator().manual_seed(args.seed)

    def batch(ids: list[list[int]]) -> dict:
        b = collate([{"input_ids": x} for x in ids])
        return {k: v.to(args.device) for k, v in b.items()}

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        g = torch.get_rng_state()
        torch.manual_seed(12345)  # the same masks every epoch: losses comparable across epochs
        losses = [model(**batch(enc_val[i:i + 256])).loss.item() for i in range(0, len(enc_val), 256)]
        torch.set_rng_state(g)
        model.train()
        return sum(losses) / len(losses)

    curve, start = [], time.time()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(enc_train), generator=gen).tolist()
        total_loss = 0.0
        for s in range(steps_per_epoch):
            loss = model(**batch([enc_train[i] for i in order[s * args.batch_size:(s + 1) * args.batch_size]])).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            total_loss += loss.item()
        v = val_loss()
        curve.append([epoch, round(total_loss / max(1, steps_per_epoch), 4), round(v, 4)])
        print(f"epoch {epoch}/{args.epochs}: MLM loss {curve[-1][1]:.3f}, held-out {v:.3f} "
              f"(perplexity {math.exp(v):.1f}), {time.time() - start:.0f}s", flush=True)
    return {"model": model, "tokenizer": tok, "record": {
        "command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "recipe": args.recipe, "architecture": args.arch,
        "tokenizer": args.tokenizer or "wordpiece trained on the task's training texts",
        "texts": len(train), "held_out_texts": len(val),
        "test_texts_left_out": n_test, "tokens": len(tok), "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "curve": curve, "minutes": round((time.time() - start) / 60, 1),
        "machine": machine_info(args.device)}}


def save(out: Path, result: dict) -> None:
    """The folder whole or not at all: written beside ``out``, then renamed onto it."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    result["model"].save_pretrained(tmp, safe_serialization=True)
    result["tokenizer"].save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps(result["record"], indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="configs/fortunes/teacher.yaml", help="the text task's recipe: its data "
                   "section says the fortune files and the test split to leave out")
    p.add_argument("--arch", default=ARCH, help="the teacher's architecture, a Hugging Face BERT config.json")
    p.add_argument("--out", default="runs/fortunes-bert-mlm", help="the save_pretrained folder to write")
    p.add_argument("--tokenizer", help="reuse this folder's tokenizer instead of training one (a student "
                   "pre-trained beside the teacher must share its token ids)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--force", action="store_true", help="pretrain again even if --out holds a finished folder")
    p.add_argument("--quick", action="store_true", help="256 texts: the smoke test")
    args = p.parse_args()
    out = Path(args.out)
    if (out / "pretraining.json").is_file() and not args.force:
        print(f"{out}: already pretrained ({out / 'pretraining.json'}); --force to pretrain again")
        return 0
    try:
        result = pretrain(args)
    except BlockKDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
