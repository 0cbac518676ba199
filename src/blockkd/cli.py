"""Command line: ``blockkd train|eval|cache-logits|models|methods|demo``.

Why so thin: the CLI only parses arguments and calls the library, so everything it does is also
available (and tested) from Python. Its one job of its own is to turn a user mistake
(:class:`BlockKDError`) into one ``error:`` line and exit status 2, while bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .errors import BlockKDError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away


def _train(args: argparse.Namespace) -> int:
    from . import config

    cfg = config.load(args.config, args.overrides)
    if args.print_config:
        print(config.dump(cfg), end="")
        return 0
    from . import engine
    from .engine.runtime import dist_env

    summary = engine.train(cfg, resume=args.resume, overwrite=args.overwrite)
    if dist_env()[0] != 0:  # under torchrun the summary is printed once, by rank 0
        return 0
    for key, value in summary.items():
        if isinstance(value, dict):
            value = " ".join(f"{k}={_short(v)}" for k, v in value.items() if not isinstance(v, (dict, list)))
        if not isinstance(value, list):
            print(f"{key}: {_short(value)}")
    return 0


def _cache_logits(args: argparse.Namespace) -> int:
    from . import config
    from .engine.cache_logits import cache_logits

    cfg = config.load(args.config, args.overrides)
    m = cache_logits(cfg, out=args.out, k=args.top_k, shard_size=args.shard_size, batch_size=args.batch_size)
    print(f"cache: {args.out or cfg.teacher.cache}  top-{m['k']} of {m['vocab']} tokens, {m['sequences']} sequences "
          f"of {m['seq_len']} in {m['shards']} shard(s)")
    return 0


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _eval(args: argparse.Namespace) -> int:
    from . import config

    config.data_overrides(args.data)  # bad --data before a checkpoint is read
    if args.device is not None:
        config.check("train.device", args.device, "--device")
    from . import engine

    m = engine.evaluate_checkpoint(args.checkpoint, args.data, device=args.device)
    what = f"{m.get('model', 'student')} ({m.get('method', '?')}, epoch {m.get('epoch', '?')}) on {m.get('data', '?')}"
    extra = "".join(f"  {k} {m[k]:.2f}" for k in m.get("metric_names", ()))  # the task's: F1, Matthews ...
    print(f"{what}: top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%{extra}  loss {m['loss']:.4f}  "
          f"{m['images_per_s']:.0f} images/s")
    heads = {k.removeprefix("top1_"): v for k, v in m.items() if k.startswith("top1_")}
    if heads:  # a distiller's further classifiers: Block-KD's stepping-stones and their ensemble
        print("heads: " + "  ".join(f"{k} top-1 {v:.2f}%" for k, v in heads.items()))
    if m.get("note"):
        print(f"note: {m['note']}", file=sys.stderr)
    return 0


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> None:
    width = max(len(r[0]) for r in [header, *rows])
    for name, rest in [header, *rows]:
        print(f"{name:<{width}}  {rest}")


def _models(args: argparse.Namespace) -> int:
    import torch

    from . import models

    rows = []
    for name in models.names():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = models.create(name, num_classes=100)
        rows.append((name, f"{models.num_params(model) / 1e6:7.2f}"))
    what = {"torchvision.": "any torchvision classification model", "timm.": "any timm model",
            "hf.": "a Hugging Face sequence classifier (hub id or folder)",
            "hf-config.": "one built from a config.json (random init)"}
    rows += [(f"{prefix}<name>", f"{'-':>7}  {what.get(prefix, '')}") for prefix in models.prefixes()]
    _table(rows, ("model", "params (M, 100 classes)"))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from . import methods

    if args.name is not None:
        return _method_help(args.name)
    rows = []
    for name in methods.names():
        cls = methods.get(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        teacher = "needs a teacher" if cls.needs_teacher else "no teacher"
        rows += [(name, doc[0] if doc else ""), ("", f"{teacher}; {cls.paper}" if cls.paper else teacher)]
        rows += [("", f"  {key} = {default}: {help_}") for key, default, _, help_ in methods.describe(name)]
    _table(rows, ("method", "description and options (method.options.<key>); blockkd methods NAME: one in full"))
    return 0


def _method_help(name: str) -> int:
    """``blockkd methods NAME``: the method's whole docstring, its paper and every option (expected values too)."""
    import inspect

    from . import methods

    cls = methods.get(name)  # an unknown name: one line with the closest method
    print(f"{name}: {inspect.cleandoc(cls.__doc__ or '').strip()}")
    print(f"teacher: {'needed (teacher.name, teacher.checkpoint)' if cls.needs_teacher else 'none'}")
    if cls.paper:
        print(f"paper: {cls.paper}")
    rows = methods.describe(name)
    print("options (method.options.<key>):" if rows else "options: none")
    for key, default, expected, help_ in rows:
        print(f"  {key} = {default}  ({expected}): {help_}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return int(demo.run(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    # ``--debug`` is accepted before and after the subcommand: the subcommands' copy has no default,
    # so it cannot reset a ``--debug`` given before them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="blockkd", description="Block-wise Logit Distillation and a knowledge-distillation toolkit.",
        epilog="Recipes and their keys: docs/config.md. Example: blockkd train "
               "configs/cifar100/resnet32x4_resnet8x4/blockkd.yaml optim.lr=0.1")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"blockkd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", parents=[common], help="train from a YAML recipe",
                       description="Train from a YAML recipe; key=value arguments override its keys.")
    p.add_argument("config", help="recipe file (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.1 train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved recipe (all defaults filled in) and exit")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint's student",
                       description="Top-1/top-5 accuracy, loss and throughput of a checkpoint's student.")
    p.add_argument("checkpoint", help="run folder, its best/ or last/ folder")
    p.add_argument("--data", nargs="+", action="extend", default=[], metavar="key=value",
                   help="data keys to change, e.g. root=/data eval_batch_size=512")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("cache-logits", parents=[common], help="store a language-model teacher's top-k logits",
                       description="Run the recipe's teacher once over its training sequences and store the top-k "
                       "log-probabilities per position (teacher.cache, or --out); run again to finish a killed run.")
    p.add_argument("config", help="recipe file (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. teacher.cache=cache/fortunes-k32")
    p.add_argument("--out", default=None, metavar="DIR", help="cache folder (default: the recipe's teacher.cache)")
    p.add_argument("--top-k", type=int, default=32, help="log-probabilities kept per position (default 32)")
    p.add_argument("--shard-size", type=int, default=256, help="sequences per shard file (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch (default: data.eval_batch_size)")
    p.set_defaults(func=_cache_logits)

    p = sub.add_parser("models", parents=[common], help="list the model zoo")
    p.set_defaults(func=_models)
    p = sub.add_parser("methods", parents=[common], help="list the distillation methods and their options",
                       description="List the methods, or with NAME one method's description, paper and options.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="one method, e.g. blockkd")
    p.set_defaults(func=_methods)

    p = sub.add_parser("demo", parents=[common], help="the Fashion-MNIST demo (teacher, KD, DKD, Block-KD)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' number of epochs")
    p.set_defaults(func=_demo)
    return parser


def _split_extras(parser: argparse.ArgumentParser, args: argparse.Namespace, extras: list[str]) -> None:
    """``blockkd train CFG --resume optim.lr=0.1``: argparse leaves ``optim.lr=0.1`` over; it is an override."""
    if extras and args.command in ("train", "cache-logits") and not any(e.startswith("-") for e in extras):
        args.overrides += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit:  # --help, --version, a usage error: `blockkd --help | head -1` must end quietly too
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _silence_stdout()
        raise
    _split_extras(parser, args, extras)
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, rather than at exit
        return status
    except BrokenPipeError:  # `blockkd methods | head`: the reader has all it wanted; leave quietly
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except BlockKDError as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resume = "; run the same command with --resume to continue from the last checkpoint"
        print("interrupted" + (resume if args.command == "train" else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def _version() -> str:
    from . import __version__

    return __version__


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not raise about the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (a test's capture): nothing to flush later
        pass


def _one_line(e: Any) -> str:
    return " ".join(str(e).split()) or type(e).__name__
