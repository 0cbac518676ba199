"""Helpers shared by ``speed.py`` and ``accuracy.py``: machine description, JSON output, tables.

Why here: both benchmarks must describe the machine the same way (numbers without their machine are
meaningless), write their JSON the same way (atomically, so an interrupted run never leaves half a
file) and render the same table both as aligned text (stdout) and as markdown (a section of results/README.md).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from blockkd.utils import atomic_write

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name (Linux: /proc/cpuinfo), else whatever the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when files changed), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def runs_beside(out: Path) -> Path:
    """The folder of a report's training runs: ``<out stem>-runs`` beside it (``--resume`` and ``--from-runs``
    find them there)."""
    return out.with_name(out.stem + "-runs")


def threads_per_job(jobs: int) -> int:
    """The torch threads of each of ``jobs`` trainings run side by side: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def machine_info(device: torch.device | str | None = None, *, jobs: int = 1,
                 threads: int | None = None) -> dict[str, Any]:
    """Date, hardware and software versions; deliberately no hostname or user name. ``jobs`` trainings run
    side by side on ``threads`` torch threads each (default: the cores shared out) are recorded as such: the
    numbers came from those workers, not from this process's thread count."""
    import torchvision

    import blockkd

    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads or (threads_per_job(jobs) if jobs > 1 else torch.get_num_threads()),
        **({"jobs": jobs} if jobs > 1 else {}),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "blockkd": getattr(blockkd, "__version__", None),
        "git": git_commit(),
        "device": str(device) if device is not None else None,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "cuda": torch.version.cuda if cuda else None,
    }


def machine_line(info: dict[str, Any]) -> str:
    """One markdown line naming the machine and software behind a set of numbers."""
    dev = "CPU" if info.get("cuda") is None else f"{info['device_name']} (CUDA {info['cuda']})"
    threads = f"{info['torch_threads']} torch threads"
    if info.get("jobs", 1) > 1:
        threads += f" per run, {info['jobs']} runs side by side"
    return (f"{info['date'][:10]}; device {dev}; CPU {info['cpu']} ({info['cpu_cores']} cores, {threads}); "
            f"torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}, {info['os']}"
            + (f"; blockkd {info['git']}" if info.get("git") else ""))


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (``blockkd.utils.atomic_write``)."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, text)


def write_lines(path: str | Path, lines: Sequence[str]) -> int:
    """Write a benchmark's markdown ``lines`` to ``path``, say where, and return the exit status (0)."""
    written = write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {written}")
    return 0


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values themselves."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def append_runs(before: dict[str, Any], runs: list[dict], invocations: list[dict], key: Callable[[dict], Any]
                ) -> tuple[list[dict], list[dict]]:
    """``--append``: an earlier report's runs first, minus those redone now (same ``key``), then ``runs``;
    and every invocation in order (a report from before invocations were kept counts as one). The same command
    run again right after itself (``--resume`` going on after a stop) is one invocation, its minutes summed:
    reproducing needs it once."""
    done = {key(r) for r in runs}
    merged = [dict(i) for i in before.get("invocations", [{k: before.get(k) for k in ("command", "minutes")}])]
    for inv in invocations:
        if merged and merged[-1]["command"] == inv["command"]:
            merged[-1]["minutes"] = (merged[-1].get("minutes") or 0) + (inv.get("minutes") or 0)
        else:
            merged.append(dict(inv))
    return [r for r in before["runs"] if key(r) not in done] + runs, merged


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command a report records for an invocation of ``benchmarks/<script>`` with ``argv``: as run, except
    that ``--from-runs`` (which trains nothing, so reproduces nothing where the runs are not) is written as
    ``--resume``, which trains the runs that are missing and reports those already finished."""
    recorded: list[str] = []
    for a in argv:
        a = "--resume" if a == "--from-runs" else a
        if not (a == "--resume" and a in recorded):
            recorded.append(a)
    return shlex.join(["python", f"benchmarks/{script}", *recorded])


def reproduce_line(invocations: list[dict]) -> str:
    """"Reproduce: `cmd`." or, after --append, "Reproduce, in order: `cmd1`; `cmd2`."."""
    return ("Reproduce" + (", in order: " if len(invocations) > 1 else ": ")
            + "; ".join(f"`{i['command']}`" for i in invocations) + ".")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def fmt(value: Any, spec: str = ".2f") -> str:
    """A table cell: numbers formatted with ``spec``, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with spaces, for the terminal."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (``|`` inside cells escaped)."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in rows])


def section(title: str, paragraphs: Sequence[str]) -> str:
    """A section of results/README.md: a level-3 heading then paragraphs (tables included) separated by blank lines."""
    return "\n\n".join([f"### {title}", *[p.strip() for p in paragraphs if p and p.strip()]]) + "\n"


@torch.no_grad()
def make_confident(model, loader, target_std: float) -> tuple[float, float]:
    """Scale ``model``'s last Linear so its mean per-sample logit std on ``loader`` is ``target_std``.

    The argmax (hence the accuracy) is unchanged: a stand-in for a teacher trained to high confidence.
    Returns the std before and after.
    """
    def std() -> float:
        model.eval()
        return torch.cat([model(x).float().std(dim=1) for x, _ in loader]).mean().item()

    before = std()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.mul_(target_std / before)
    head.bias.mul_(target_std / before)
    return before, std()
