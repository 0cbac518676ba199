"""Is a fall of a run's test top-1 in its weights or in its BN statistics? Train the run again with
``train.precise_bn`` and compare, epoch by epoch.

    python benchmarks/precise_bn.py RUN [--batches 20] [--out results/precise_bn.json]

RUN is a finished run folder (its config.yaml). Its recipe is trained again, same seed, into a folder beside
--out, with ``train.precise_bn=BATCHES``: before each evaluation the student's (and the connectors') BN
statistics are recomputed over that many training batches under the epoch's final weights, without
touching the weights or any RNG. On the machine and thread count that trained RUN, the two runs end with the
same weights (checked), so the two curves differ only in the BN statistics the evaluation used. Writes the
JSON and a markdown table beside it. Measures; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import safetensors.torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, machine_line, markdown_table, write_json, write_text  # noqa: E402
from hetero import largest_drop  # noqa: E402
from students import history_of  # noqa: E402

from blockkd import config  # noqa: E402
from blockkd.engine import train  # noqa: E402
from blockkd.engine.checkpoint import WEIGHTS  # noqa: E402

STATS = ("running_mean", "running_var", "num_batches_tracked")


def curve(run: Path) -> list[tuple[int, float]]:
    """(epoch, test top-1) of each evaluated epoch, as the accuracy reports keep it."""
    return [(r["epoch"], r["test_top1"]) for r in history_of(run) if r.get("test_top1") is not None]


def same_weights(a: Path, b: Path) -> bool:
    """The trained tensors of two runs' last checkpoints, BN statistics aside, are bit-identical."""
    x, y = (safetensors.torch.load_file(r / "last" / WEIGHTS) for r in (a, b))
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x if not k.endswith(STATS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished run folder")
    p.add_argument("--batches", type=int, default=20, help="train.precise_bn of the second training (default 20)")
    p.add_argument("--out", type=Path, default=Path("results/precise_bn.json"))
    args = p.parse_args()
    raw = yaml.safe_load((args.run / "config.yaml").read_text())
    runs_dir = args.out.with_name(args.out.stem + "-runs")
    raw["train"]["precise_bn"] = args.batches
    raw["output"] = {**raw["output"], "dir": str(runs_dir), "name": args.run.name, "progress": False}
    started = time.perf_counter()
    again = Path(train(config.validate(raw), resume=(runs_dir / args.run.name).is_dir())["run_dir"])
    plain, precise = curve(args.run), curve(again)
    report = {"run": str(args.run), "precise_bn": args.batches, "same_weights": same_weights(args.run, again),
              "test_top1": [v for _, v in plain], "test_top1_precise_bn": [v for _, v in precise],
              "machine": machine_info(),
              "minutes": (time.perf_counter() - started) / 60,
              "command": f"python benchmarks/precise_bn.py {args.run} --batches {args.batches} --out {args.out}"}
    write_json(args.out, report)
    rows = [[e, f"{a:.2f}", f"{b:.2f}"] for (e, a), (_, b) in zip(plain, precise)]
    rows.append(["largest epoch drop", f"{largest_drop(plain):.2f}", f"{largest_drop(precise):.2f}"])
    md = "\n\n".join([
        f"### BN statistics at evaluation: {args.run.name} of {args.run.parent.name}",
        f"Test top-1 per epoch of `{args.run}` (BN running averages) and of the same recipe trained again with "
        f"`train.precise_bn={args.batches}` (statistics recomputed over {args.batches} training batches before "
        f"each evaluation). Same weights at the end, BN statistics aside: **{report['same_weights']}**.",
        markdown_table(["epoch", "running averages", f"precise_bn {args.batches}"], rows),
        f"Machine: {machine_line(report['machine'])}; {report['minutes']:.0f} min. Reproduce: `{report['command']}`"])
    print(write_text(args.out.with_suffix(".md"), md + "\n"))


if __name__ == "__main__":
    main()
