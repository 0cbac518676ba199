"""Smoke test of benchmarks/: both scripts run end to end with --quick and report consistent numbers.

The benchmarks measure and never assert timings; this test checks the structure of what they write and
that every derived number (ratios, means, gains, FLOP floors) is computed from the reported ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockkd import config, methods
from blockkd.data import fashion_mnist

# The benchmarks end to end: minutes; `make test-fast` (pytest -m "not slow") skips them.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
approx = pytest.approx
needs_fortunes = pytest.mark.skipif(not Path("/usr/share/games/fortunes/computers").is_file(),
                                    reason="Debian's fortune files are missing: `make data` (apt-get install fortunes)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Both scripts with --quick, side by side (one thread each), in a scratch folder with its own cache."""
    if fashion_mnist.find(None) is None:
        pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); the accuracy "
                    "benchmark needs real data")
    tmp = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp / "cache")}
    commands = {
        "speed": ["speed.py", "--quick", "--profile", "all", "--out", "out/speed.json"],
        "accuracy": ["accuracy.py", "--quick", "--val", "300", "--out", "out/accuracy.json"],
    }
    procs = {k: subprocess.Popen([sys.executable, str(BENCH / c[0]), *c[1:]], cwd=tmp, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for k, c in commands.items()}
    out = {}
    for name, proc in procs.items():
        text, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name}.py failed:\n{text[-4000:]}"
        out[name] = (tmp / "out", text)
    return out


# ----------------------------------------------------------------------------------------- speed
def test_speed_report(runs):
    folder, stdout = runs["speed"]
    report = json.loads((folder / "speed.json").read_text())
    s = report["settings"]
    assert report["machine"]["torch"] and report["machine"]["cpu_cores"] >= 1 and report["machine"]["date"]
    assert "hostname" not in json.dumps(report["machine"]).lower()
    rows = {r["label"]: r for r in report["train_step"]}
    classifiers = [m for m in methods.names() if getattr(methods.get(m), "task", None) != "causal_lm"]
    assert list(rows) == classifiers + ["blockkd (unbatched)"]  # every registered method for classifiers
    assert rows["blockkd (unbatched)"]["options"] == {"batched_stones": False}
    kd = rows["kd"]["images_per_s"]
    for r in rows.values():
        assert "error" not in r, r
        windows = r["window_images_per_s"]
        assert len(windows) == s["windows"] and all(w > 0 for w in windows)
        assert r["images_per_s"] == approx(statistics.median(windows))  # no label draws its stones per step
        assert r["step_ms"] == approx(1000 * s["batch_size"] / r["images_per_s"])
        assert r["cost_vs_kd"] == approx(kd / r["images_per_s"])
        assert r["peak_memory_mb"] >= r["rss_at_start_mb"] > 0
    assert rows["kd"]["cost_vs_kd"] == 1.0
    assert all(r["goal_vs_kd"] is None for r in rows.values())  # goals are stated for resnet32x4:resnet8x4 only

    f = report["flops"]["resnet14:resnet8"]
    per_step = f["per_step"]
    assert not f["uncounted"] and set(f["counted_on_cpu"]) <= {"rkd", "crd"}  # data-dependent ops: a real step
    for label, r in rows.items():
        assert r["flops_per_step"] == per_step[label] and r["flops_vs_kd"] == approx(per_step[label] / per_step["kd"])
        assert r["extra_params"] == f["extra"][label]["extra_params"] >= 0 and r["extra_buffers"] >= 0
    # What each method adds to the student: nothing for logit methods, connectors, CRD's two memory banks.
    assert rows["kd"]["extra_params"] == rows["kd"]["extra_buffers"] == rows["at"]["extra_params"] == 0
    assert rows["blockkd"]["extra_params"] > 0 and rows["fitnet"]["extra_params"] > 0
    crd = methods.defaults("crd")
    assert rows["crd"]["extra_buffers"] >= 2 * crd["num_data"] * crd["feat_dim"] and rows["crd"]["extra_params"] > 0
    # Only SimKD deploys more than the student: its projector (trained) and the teacher's head (frozen).
    assert {label for label, r in rows.items() if r["extra_inference_params"]} == {"simkd"}
    assert rows["simkd"]["extra_inference_params"] > rows["simkd"]["extra_params"] > 0
    # The parts add up to the counted steps, so the floor derived from them is the steps' FLOP ratio.
    assert f["kd_from_parts"] == approx(per_step["kd"], rel=1e-3)
    assert f["blockkd_from_parts"] == approx(per_step["blockkd"], rel=1e-3)
    assert per_step["blockkd (unbatched)"] == per_step["blockkd"]
    assert f["floor_blockkd"] == approx(f["blockkd_from_parts"] / f["kd_from_parts"])
    assert per_step["ce"] < per_step["kd"] < per_step["blockkd-lite"] < per_step["blockkd"]
    # blockkd-lite's defaults: stone 2 on half of the batch, stone 3 on all of it, stone 1 left out
    part = lambda i: f["parts"][f"stone {i} forward"] + f["parts"][f"stone {i} backward"]  # noqa: E731
    b = s["batch_size"]
    assert per_step["blockkd-lite"] == approx(f["kd_from_parts"] + part(2) * ((b + 1) // 2) / b + part(3), abs=1)
    stones = [f["parts"][f"stone {i} forward"] for i in range(1, f["num_blocks"] + 1)]
    assert stones == sorted(stones, reverse=True)  # deeper stones run shorter teacher suffixes

    (batched,) = report["batched_stones"]
    assert batched["speedup"] == approx(rows["blockkd"]["images_per_s"] / rows["blockkd (unbatched)"]["images_per_s"])
    (data,) = report["data_path"]
    assert data["dataset"] == "synthetic" and data["images"] == s["data_size"]  # 512 = 8 full batches of 64
    assert data["device_images_per_s"] > 0 and data["torchvision_images_per_s"] > 0
    assert data["speedup"] == approx(data["device_images_per_s"] / data["torchvision_images_per_s"])

    md = (folder / "speed.md").read_text()
    assert md.startswith("### Speed") and "| resnet14:resnet8 | fp32 | blockkd-lite |" in md
    assert "| extra params | extra buffers |" in md and "| resnet14:resnet8 | fp32 | crd |" in md
    assert "time vs kd" in stdout and "FLOP floor of blockkd vs kd" in stdout


def test_bad_variants_are_refused_before_any_timing(tmp_path):
    for bad in ("fp32+bf16", "cl", "bf16+fast"):
        proc = subprocess.run([sys.executable, str(BENCH / "speed.py"), "--quick", "--variants", bad, "--out",
                               str(tmp_path / "s.json")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and f"variant {bad!r}" in proc.stderr, proc.stderr
        assert not (tmp_path / "s.json").exists()


def test_profile_of_every_step(runs):
    _, stdout = runs["speed"]  # the smoke run asks for --profile all
    assert "profile of blockkd (" in stdout and "aten::convolution" in stdout and "Self CPU" in stdout


# ----------------------------------------------------------------------------------------- accuracy
def test_accuracy_report(runs):
    folder, stdout = runs["accuracy"]
    report = json.loads((folder / "accuracy.json").read_text())
    setup = report["setup"]
    assert setup["split"] == "val" and setup["eval_images"] == 300 and setup["train_images"] == 128
    assert setup["epochs"] == 1 and setup["seeds"] == [0] and setup["methods"] == ["ce", "blockkd"]
    assert 0 <= report["teacher"]["last_top1"] <= 100
    assert Path(report["teacher"]["run_dir"]).is_relative_to(folder.parent / "cache")  # trained once, cached
    teacher = report["teacher"]
    meta = json.loads((Path(teacher["run_dir"]) / teacher["checkpoint"] / "meta.json").read_text())
    assert teacher["checkpoint"] == "best" and teacher["seeds"] == [0] and "earlier" not in teacher
    assert {r["teacher_sha256"] for r in report["runs"]} == {teacher["weights_sha256"]}
    assert teacher["weights_sha256"] == meta["sha256"]["weights.safetensors"]
    assert teacher["cpu"] == report["machine"]["cpu"]

    runs_ = {r["method"]: r for r in report["runs"]}
    assert set(runs_) == {"ce", "blockkd"}
    for method, r in runs_.items():
        assert 0 <= r["last_top1"] <= 100 and r["last_top1"] <= r["best_top1"] <= 100 and r["wall_time_s"] > 0
        assert r["curve"][-1] == [1, r["last_top1"]]
        m = report["methods"][method]
        assert m["last_top1"]["mean"] == r["last_top1"] and m["last_top1"]["std"] == 0.0
        cfg = report["recipes"][method]["config"]
        assert cfg["method"]["name"] == method and cfg["train"]["seed"] == 0 and cfg["data"]["val_split"] == 300
        assert report["recipes"][method]["fingerprint"] == r["fingerprint"]
    assert report["methods"]["ce"]["gain_vs_ce"] is None
    assert report["methods"]["blockkd"]["gain_vs_ce"] == approx(runs_["blockkd"]["last_top1"]
                                                                - runs_["ce"]["last_top1"])

    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (folder / "accuracy.md").read_text()
    assert md.startswith("### Accuracy") and "| resnet8 | blockkd | 1 |" in md and "accuracy.png" in md
    assert "One teacher serves all students." in md
    assert "val top-1, last epoch" in stdout and "held out from the training set" in stdout
    heads = runs_["blockkd"]["last_heads"]  # the stones and their ensemble, on a line of their own
    assert set(heads) == {"stone1", "stone2", "stone3", "ensemble"} and not runs_["ce"]["last_heads"]
    line = next(x for x in md.splitlines() if x.startswith("blockkd's heads"))
    # one run: each value alone, no "± 0.00" spread that one seed cannot show
    assert f"stone 1 {heads['stone1']:.2f}," in line and f"ensemble {heads['ensemble']:.2f};" in line
    assert line.endswith(f"the student {runs_['blockkd']['last_top1']:.2f}.") and "±" not in line
    assert "ce's heads" not in md

    # --render: the .md again from the JSON alone, byte for byte
    (folder / "accuracy.md").unlink()
    subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--render", "--out", str(folder / "accuracy.json")],
                   check=True, capture_output=True)
    assert (folder / "accuracy.md").read_text() == md


def test_a_leaderboard_of_many_entries_renders_in_rank_order(runs, tmp_path):
    """Past ten entries the plot switches colours and zooms (the full leaderboard has 19): it must still
    render, and the table must rank the entries by mean last-epoch top-1."""
    folder, _ = runs["accuracy"]
    report = json.loads((folder / "accuracy.json").read_text())
    base = report["methods"]["blockkd"]
    for k in range(12):
        entry = json.loads(json.dumps(base))
        entry["last_top1"]["mean"] = entry["best_top1"]["mean"] = 50.0 + k
        entry["curve"]["mean"] = [50.0 + k] * len(entry["curve"]["mean"])
        report["methods"][f"m{k}"] = entry
    out = tmp_path / "many.json"
    out.write_text(json.dumps(report))
    subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--render", "--out", str(out)], check=True,
                   capture_output=True)
    assert (tmp_path / "many.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split(" | ")[2] for line in (tmp_path / "many.md").read_text().splitlines()
            if line.startswith("| ") and " | resnet8 | m" in line]
    assert rows == [f"m{k}" for k in reversed(range(12))]


def test_accuracy_append_adds_methods_and_refuses_other_settings(runs, tmp_path):
    """--append keeps the earlier runs and adds the new entries, in leaderboard order (kd-ls: a recipe of the kd
    method with options, an entry of its own), here two side by side; a different setting is refused."""
    folder, _ = runs["accuracy"]
    (tmp_path / "out").mkdir()
    before = json.loads((folder / "accuracy.json").read_text())
    # As if the teacher had been retrained since (another machine's cache): other weights, other scores.
    retrained = {**before, "teacher": {**before["teacher"], "weights_sha256": "0" * 64, "last_top1": 12.34},
                 "runs": [{**r, "teacher_sha256": "0" * 64} for r in before["runs"]]}
    (tmp_path / "out" / "accuracy.json").write_text(json.dumps(retrained))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(folder.parent / "cache")}  # the cached teacher
    base = [sys.executable, str(BENCH / "accuracy.py"), "--quick", "--val", "300", "--append",
            "--out", "out/accuracy.json"]
    proc = subprocess.run(base + ["--methods", "kd-ls", "kd", "--jobs", "2"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert after["setup"]["methods"] == ["ce", "kd", "kd-ls", "blockkd"]
    assert set(after["recipes"]) == {"ce", "kd", "kd-ls", "blockkd"}
    kd_ls = after["recipes"]["kd-ls"]["config"]["method"]
    assert kd_ls["name"] == "kd" and kd_ls["options"]["logit_standardization"] is True
    assert after["recipes"]["kd"]["config"]["method"]["options"]["logit_standardization"] is False
    assert [r for r in after["runs"] if r["method"] not in ("kd", "kd-ls")] == retrained["runs"]
    assert {r["teacher_sha256"] for r in after["runs"] if r["method"] in ("kd", "kd-ls")} == {
        before["teacher"]["weights_sha256"]}
    assert after["methods"]["kd"]["gain_vs_ce"] == approx(after["methods"]["kd"]["last_top1"]["mean"]
                                                           - before["methods"]["ce"]["last_top1"]["mean"])
    assert len(after["invocations"]) == 2
    earlier, = after["teacher"]["earlier"]
    assert earlier["last_top1"] == 12.34 and earlier["seeds"] == [0] and after["teacher"]["seeds"] == [0]
    assert earlier["cpu"] == before["machine"]["cpu"]
    assert after["teacher"]["weights_sha256"] == before["teacher"]["weights_sha256"]
    assert "--append --out out/accuracy.json --methods kd-ls kd --jobs 2" in after["invocations"][1]["command"]
    md = (tmp_path / "out" / "accuracy.md").read_text()
    assert "| resnet8 | kd | 1 |" in md and "| resnet8 | kd-ls | 1 |" in md
    ranks = {m: int(line.split("|")[1]) for line in md.splitlines() for m in after["methods"]
             if line.startswith("| ") and f"| resnet8 | {m} |" in line}
    assert sorted(ranks.values()) == [1, 2, 3, 4]  # ranked by mean last-epoch top-1, best first
    by_score = sorted(after["methods"], key=lambda m: (-after["methods"][m]["last_top1"]["mean"], m))  # ties: by name
    assert ranks[by_score[0]] == 1 and ranks[by_score[-1]] == 4
    assert f"**blockkd ranks {ranks['blockkd']} of 4**" in md
    assert "retrained between invocations" in md and "One teacher" not in md
    assert "12.34 last / " in md and " for seed 0 of ce, blockkd; " in md and " for seed 0 of kd, kd-ls. " in md
    proc = subprocess.run(base + ["--methods", "kd", "--epochs", "2"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 2 and "another teacher, other overrides or other recipes" in proc.stderr
    # A teacher cached under another folder name (a key added to the config since changes the recipe's
    # fingerprint) is the same teacher where its weights are: appended to; other weights are refused.
    for sha, code in ((after["teacher"]["weights_sha256"], 0), ("0" * 64, 2)):
        moved = {**after, "teacher": {**after["teacher"], "run_dir": "/elsewhere/teacher-0123", "weights_sha256": sha}}
        (tmp_path / "out" / "accuracy.json").write_text(json.dumps(moved))
        proc = subprocess.run(base + ["--methods", "kd", "--from-runs"], cwd=tmp_path, env=env, text=True,
                              capture_output=True, timeout=240)
        assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]


def _running(pid: int) -> bool:
    """Whether process ``pid`` is still running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process states from /proc (Linux)")
def test_side_by_side_trainings_stop_when_their_benchmark_is_killed(tmp_path):
    """A benchmark killed outright (SIGKILL: no cleanup runs) takes its side-by-side workers with it: they
    would otherwise go on training unseen, holding the cores and their run folders."""
    script = tmp_path / "bench.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        "import students\n\n"
        "def work(path):\n"
        "    open(path + '.tmp', 'w').write(str(os.getpid()))\n"
        "    os.replace(path + '.tmp', path)\n"
        "    time.sleep(300)\n\n"
        "if __name__ == '__main__':\n"
        f"    students.side_by_side(work, [({str(tmp_path / 'a')!r},), ({str(tmp_path / 'b')!r},)], 2, 1)\n")
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    pid_files = [tmp_path / "a", tmp_path / "b"]
    for _ in range(240):
        if all(p.is_file() for p in pid_files) or proc.poll() is not None:
            break
        time.sleep(0.5)
    workers = [int(p.read_text()) for p in pid_files]
    assert all(_running(w) for w in workers)
    proc.kill()
    proc.wait()
    for _ in range(20):
        if not any(_running(w) for w in workers):
            break
        time.sleep(0.5)
    assert not any(_running(w) for w in workers)


def test_a_resumed_invocation_is_reproduced_once(monkeypatch):
    """--append after the same command again (a --resume going on after a stop): one invocation, minutes summed;
    another command in between keeps both."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import append_runs, reproduce_line

    a, b = "python benchmarks/accuracy.py --append --resume --methods x", "python benchmarks/accuracy.py --methods y"
    before = {"runs": [{"m": "x", "s": 0}, {"m": "y", "s": 0}], "invocations": [{"command": b, "minutes": 1.0},
                                                                                 {"command": a, "minutes": 2.0}]}
    runs, inv = append_runs(before, [{"m": "x", "s": 0, "new": True}], [{"command": a, "minutes": 3.0}],
                            key=lambda r: (r["m"], r["s"]))
    assert runs == [{"m": "y", "s": 0}, {"m": "x", "s": 0, "new": True}]
    assert inv == [{"command": b, "minutes": 1.0}, {"command": a, "minutes": 5.0}]
    assert before["invocations"][1]["minutes"] == 2.0  # the earlier report is not changed in place
    assert reproduce_line(inv) == f"Reproduce, in order: `{b}`; `{a}`."
    _, inv = append_runs({"runs": [], "invocations": inv}, [], [{"command": b, "minutes": 1.0}], key=id)
    assert [i["command"] for i in inv] == [b, a, b]


def test_machine_line_names_the_threads_each_side_by_side_run_had(monkeypatch):
    """Runs side by side (--jobs) train in workers on a share of the cores: the machine line says that share,
    not the parent process's thread count."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import machine_info, machine_line, threads_per_job

    info = machine_info()
    assert f"({info['cpu_cores']} cores, {torch.get_num_threads()} torch threads)" in machine_line(info)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert "(8 cores, 2 torch threads per run, 4 runs side by side)" in machine_line(machine_info(jobs=4))
    assert "(8 cores, 3 torch threads per run, 2 runs side by side)" in machine_line(machine_info(jobs=2, threads=3))
    assert threads_per_job(16) == 1


def test_accuracy_report_from_the_finished_runs(runs, tmp_path):
    """--from-runs trains nothing: it reports the finished runs in the run folders (a benchmark stopped at a
    deadline), the same numbers as the run that made them; an unfinished run is left out."""
    folder, _ = runs["accuracy"]
    shutil.copytree(folder / "accuracy-runs", tmp_path / "out" / "accuracy-runs")
    (tmp_path / "out" / "accuracy-runs" / "blockkd-seed0" / "summary.json").unlink()  # as if killed mid-run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(folder.parent / "cache")}  # the cached teacher
    proc = subprocess.run([sys.executable, str(BENCH / "accuracy.py"), "--quick", "--val", "300", "--from-runs",
                           "--out", "out/accuracy.json"], cwd=tmp_path, env=env, text=True, capture_output=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== " not in proc.stdout  # nothing trained
    before = json.loads((folder / "accuracy.json").read_text())
    after = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert after["setup"]["methods"] == ["ce"] and list(after["methods"]) == ["ce"]
    assert after["methods"]["ce"]["last_top1"] == before["methods"]["ce"]["last_top1"]
    assert after["recipes"]["ce"]["config"]["method"] == before["recipes"]["ce"]["config"]["method"]
    # its Reproduce command trains the runs where they are not (--resume), not nothing (--from-runs)
    assert after["invocations"][0]["command"].endswith("--quick --val 300 --resume --out out/accuracy.json")


def test_accuracy_resume_reuses_finished_runs_and_continues_interrupted_ones(runs, tmp_path):
    """--resume: a finished run is reused as it is, one stopped after its last checkpoint (no summary yet) is
    continued from it, and the report equals the uninterrupted one; a run of another recipe is trained again."""
    folder, _ = runs["accuracy"]
    shutil.copytree(folder / "accuracy-runs", tmp_path / "out" / "accuracy-runs")
    runs_dir = tmp_path / "out" / "accuracy-runs"
    (runs_dir / "blockkd-seed0" / "summary.json").unlink()  # as if killed after its last checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(folder.parent / "cache")}  # the cached teacher
    base = [sys.executable, str(BENCH / "accuracy.py"), "--quick", "--val", "300", "--resume",
            "--out", "out/accuracy.json"]
    proc = subprocess.run(base, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"finished before in {Path('out/accuracy-runs/ce-seed0')}: reused" in proc.stdout
    assert "resuming" in (runs_dir / "blockkd-seed0" / "train.log").read_text()
    before = json.loads((folder / "accuracy.json").read_text())
    after = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    for m in ("ce", "blockkd"):
        assert after["methods"][m]["last_top1"] == before["methods"][m]["last_top1"]
    curves = lambda r: {x["method"]: x["curve"] for x in r["runs"]}  # noqa: E731
    assert curves(after) == curves(before)
    # another recipe (a changed override): nothing reused, every run trained again from its first step
    proc = subprocess.run(base + ["--epochs", "2", "--methods", "ce"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reused" not in proc.stdout and "resuming" not in (runs_dir / "ce-seed0" / "train.log").read_text()
    assert [e for e, _ in json.loads((tmp_path / "out" / "accuracy.json").read_text())["runs"][0]["curve"]] == [1, 2]


@needs_fortunes
def test_accuracy_on_another_recipe_folder(tmp_path):
    """--recipes configs/fortunes: the same report for the text task (teacher and students from that folder),
    run where the recipes' relative paths resolve: configs/ and the pre-trained teacher's runs/fortunes-bert-mlm
    (here benchmarks/fortunes_mlm.py --quick's); a method without a recipe there is refused before any training."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    pre = subprocess.run([sys.executable, str(BENCH / "fortunes_mlm.py"), "--quick", "--epochs", "1"], cwd=tmp_path,
                         env=env, text=True, capture_output=True, timeout=240)
    assert pre.returncode == 0 and (tmp_path / "runs" / "fortunes-bert-mlm" / "pretraining.json").is_file(), pre.stderr
    base = [sys.executable, str(BENCH / "accuracy.py"), "--quick", "--recipes", "configs/fortunes", "--out",
            str(tmp_path / "out" / "text.json")]
    proc = subprocess.run(base + ["--methods", "ce", "blockkd"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "text.json").read_text())
    setup, student = report["setup"], "hf-config.configs/fortunes/models/student.json"
    assert (setup["dataset"], setup["recipes"], setup["samples"], setup["optimizer"]) == (
        "fortunes", "configs/fortunes", "texts", "adamw")
    assert setup["student"] == student and report["teacher"]["model"] == "hf.runs/fortunes-bert-mlm"
    assert setup["train_images"] == 128 and setup["split"] == "test" and setup["methods"] == ["ce", "blockkd"]
    assert Path(report["teacher"]["run_dir"]).is_relative_to(tmp_path / "cache")
    assert report["recipes"]["blockkd"]["file"] == "configs/fortunes/blockkd.yaml"
    r = {x["method"]: x for x in report["runs"]}
    assert r["blockkd"]["curve"][-1] == [1, r["blockkd"]["last_top1"]] and r["ce"]["last_top1"] <= r["ce"]["best_top1"]
    assert report["methods"]["blockkd"]["gain_vs_ce"] == approx(r["blockkd"]["last_top1"] - r["ce"]["last_top1"])
    md = (tmp_path / "out" / "text.md").read_text()
    assert (md.startswith("### Accuracy (fortunes")
            and "recipes `configs/fortunes/<method>.yaml` with 128 training texts" in md)
    assert f"| {student} | blockkd | 1 |" in md and "text.png" in md and "AdamW lr 0.003" in md
    assert (tmp_path / "out" / "text.png").read_bytes()[:4] == b"\x89PNG"

    proc = subprocess.run(base + ["--methods", "blockkd-lite"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and "configs/fortunes has no recipe for blockkd-lite" in proc.stderr, proc.stderr


@needs_fortunes
def test_text_teacher_pretraining_never_reads_a_test_text(monkeypatch):
    """fortunes_mlm.py's corpus: every fortune entry (all files, deduplicated) except the task's test texts."""
    monkeypatch.syspath_prepend(str(BENCH))
    import dataclasses

    import fortunes_mlm
    from blockkd.data.text_readers import fortune_files, load_fortunes, read_fortunes

    options = dataclasses.asdict(config.load(ROOT / "configs" / "fortunes" / "teacher.yaml").data.options)
    texts, left_out = fortunes_mlm.corpus(options)
    test = set(load_fortunes(options).test.texts)
    root = Path(options["root"])
    every = {t for name in fortune_files(root) for t in read_fortunes(root / name)}
    assert len(fortune_files(root)) > len(options["categories"])  # every file, not only the task's six
    assert left_out == len(test) > 0 and not test & set(texts)
    assert len(texts) == len(set(texts)) == len(every) - len(test)


@needs_fortunes
def test_text_teacher_pretraining_writes_what_hf_models_load(tmp_path):
    """--quick: the folder holds the MLM weights, the recipe's own tokenizer (the token ids the students read)
    and the record; ``hf.<folder>`` loads those weights into the classifier's encoder; a finished folder is kept
    unless --force; a student pre-trained the same way shares the teacher's token ids."""
    import dataclasses

    from safetensors.torch import load_file

    from blockkd import models
    from blockkd.data.text_readers import load_fortunes
    from blockkd.data.tokenizer import cache_path, load_tokenizer

    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "BLOCKKD_DATA": str(tmp_path / "data")}  # where the tokenizer it trains is cached
    out = tmp_path / "mlm"
    cmd = [sys.executable, str(BENCH / "fortunes_mlm.py"), "--quick", "--epochs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "pretraining.json").read_text())
    assert [e for e, _, _ in record["curve"]] == [1, 2] and record["texts"] + record["held_out_texts"] == 256
    assert not list(tmp_path.glob(".mlm.*"))  # the temporary folder was renamed onto --out
    saved = load_file(out / "model.safetensors")
    model = models.create(f"hf.{out}", num_classes=6, in_channels=None)
    key = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[key], saved[key])
    tok = load_tokenizer(str(out), vocab_size=0, texts=[], name="unused")
    assert len(tok) == record["tokens"] and "token_type_ids" in tok("a fortune")
    # a WordPiece trained on the task's training texts (the one data.tokenizer: wordpiece trains, by its cache
    # file), not on the MLM corpus and not whatever the recipe's data.tokenizer names (there: this very folder)
    options = dataclasses.asdict(config.load(ROOT / "configs" / "fortunes" / "teacher.yaml").data.options)
    name = cache_path("wordpiece", options["vocab_size"], load_fortunes(options).train.texts, "fortunes").name
    cached = list((tmp_path / "data").rglob(name))
    assert len(cached) == 1 and json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    assert tok.get_vocab() == load_tokenizer(str(cached[0]), vocab_size=0, texts=[], name="unused").get_vocab()

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert again.returncode == 0 and "already pretrained" in again.stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # a student pre-trained with --tokenizer <the teacher's folder> shares its token ids
    student = tmp_path / "mlm-student"
    proc = subprocess.run([sys.executable, str(BENCH / "fortunes_mlm.py"), "--quick", "--epochs", "1", "--arch",
                           "configs/fortunes/models/student.json", "--tokenizer", str(out), "--out", str(student)],
                          cwd=ROOT, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (json.loads((student / "tokenizer.json").read_text())["model"]["vocab"]
            == json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    assert json.loads((student / "config.json").read_text())["hidden_size"] == 32


# ----------------------------------------------------------------------------------------- tuning
def test_tuning_report(tmp_path):
    """tune.py runs each variant's options (checked in the run folders' configs) on the held-out split."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--jobs", "2",
                           "--out", "out/tuning.json"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "tuning.json").read_text())
    variants = report["variants"]
    assert list(variants) == ["kd", "blockkd", "blockkd T 2"] and report["setup"]["val_split"] == 300
    assert report["setup"]["recipes"] == "configs/fashion_mnist"
    assert report["setup"]["jobs"] == 2 and report["setup"]["threads_per_job"] >= 1
    for r in report["runs"]:
        cfg = config.load(tmp_path / r["run_dir"] / "config.yaml")  # run_dir is relative to the cwd
        assert cfg["data"]["val_split"] == 300 and cfg["method"]["name"] == (
            "kd" if r["variant"] == "kd" else "blockkd")
        if r["variant"] != "kd":
            assert cfg["method"]["options"]["temperature"] == (2.0 if r["variant"] == "blockkd T 2" else 4.0)
            # the variants of rounds 1-15 start from the method's defaults of then (tune.FORMER_DEFAULTS), not
            # from the recipe's own options
            assert cfg["method"]["options"]["connector"] == "conv1x1_bn"
            assert cfg["method"]["options"]["alpha"] == 0.35 and cfg["method"]["options"]["stone_grad_cap"] is None
        v = variants[r["variant"]]
        assert v["last_top1"]["values"] == [r["last_top1"]]
        assert v["gain_vs_kd"] == approx(r["last_top1"] - variants["kd"]["last_top1"]["mean"])
    assert variants["blockkd T 2"]["options"] == {"temperature": 2.0}
    md = (tmp_path / "out" / "tuning.md").read_text()
    assert md.startswith("### Tuning Block-KD") and "| blockkd T 2 | temperature=2.0 | 1 |" in md

    # --append: a second seed of kd joins the first run's results; the rest is kept as it was. --weights-of pkt
    # adds PKT at its recipe's distillation weight, half and twice it.
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--append", "--variants", "kd",
                           "--weights-of", "pkt", "--seeds", "1", "--jobs", "1", "--out", "out/tuning.json"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((tmp_path / "out" / "tuning.json").read_text())
    assert [i["command"].split("tune.py ")[1] for i in merged["invocations"]] == [
        "--quick --jobs 2 --out out/tuning.json",
        "--quick --append --variants kd --weights-of pkt --seeds 1 --jobs 1 --out out/tuning.json"]
    recipe = config.load(ROOT / "configs/fashion_mnist/pkt.yaml")["method"]["options"]["feat_weight"]
    pkt = {r["variant"]: config.load(tmp_path / r["run_dir"] / "config.yaml")["method"]
           for r in merged["runs"] if r["variant"].startswith("pkt")}
    assert {k: (m["name"], m["options"]["feat_weight"]) for k, m in pkt.items()} == {
        "pkt": ("pkt", recipe), "pkt feat_weight x0.5": ("pkt", recipe / 2), "pkt feat_weight x2": ("pkt", recipe * 2)}
    assert merged["variants"]["kd"]["seeds"] == [0, 1]
    assert merged["variants"]["blockkd T 2"]["last_top1"] == variants["blockkd T 2"]["last_top1"]
    kd_runs = [r["last_top1"] for r in merged["runs"] if r["variant"] == "kd"]
    assert merged["variants"]["kd"]["last_top1"]["mean"] == approx(statistics.fmean(kd_runs))
    assert merged["setup"]["seeds"] == [0, 1]
    # each command's parallelism is kept and said: the first ran two trainings side by side, the second one
    assert [i["jobs"] for i in merged["invocations"]] == [2, 1]
    md = (tmp_path / "out" / "tuning.md").read_text()
    threads = [i["threads_per_job"] for i in merged["invocations"]]
    assert (f"2 runs side by side, {threads[0]} thread(s) each (command 1 below); one run at a time, {threads[1]} "
            f"thread(s) (command 2 below)") in md
    # the sweep's own table: each weight tried with its val top-1, the best one chosen (the recipe's on a tie)
    means = {k: merged["variants"][k]["last_top1"]["mean"] for k in pkt}
    factor = {"pkt": 1, "pkt feat_weight x0.5": 0.5, "pkt feat_weight x2": 2}
    best = max(factor, key=means.get)
    sweep = re.search(r"^\| pkt \| feat_weight \| 1 \| (.*)$", (tmp_path / "out" / "tuning.md").read_text(), re.M)
    assert sweep and f"{recipe / 2:g}: {means['pkt feat_weight x0.5']:.2f} |" in sweep[1]
    assert f"**{pkt[best]['options']['feat_weight']:g}** (x{factor[best]:g})" in sweep[1]

    # each invocation records its teacher; one retrained between invocations (another machine's cache) is said
    assert [i["teacher_top1"] for i in merged["invocations"]] == [report["teacher"]["last_top1"]] * 2
    assert f"teacher resnet20 at {report['teacher']['last_top1']:.2f}; seeds" in md
    doctored = {**merged, "invocations": [{**merged["invocations"][0], "teacher_top1": 12.34},
                                          merged["invocations"][1]]}
    (tmp_path / "other.json").write_text(json.dumps(doctored))
    subprocess.run([sys.executable, str(BENCH / "tune.py"), "--render", "--out", "other.json"], cwd=tmp_path,
                   check=True, capture_output=True)
    assert (f"teacher resnet20 at 12.34 (command 1 below); {report['teacher']['last_top1']:.2f} (command 2 below): "
            "retrained from its recipe between invocations; seeds") in (tmp_path / "other.md").read_text()

    # --from-runs: the finished runs are reported again, nothing is trained (their summaries stay as they were)
    pkt_runs = {(r["variant"], r["seed"]): r for r in merged["runs"] if r["variant"].startswith("pkt")}
    stamps = {k: (tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for k, r in pkt_runs.items()}
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--append", "--from-runs", "--weights-of",
                           "pkt", "--seeds", "1", "2", "--jobs", "1", "--out", "out/tuning.json"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "out" / "tuning.json").read_text())
    assert {(r["variant"], r["seed"]): r for r in again["runs"] if r["variant"].startswith("pkt")} == pkt_runs
    assert stamps == {k: (tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for k, r in pkt_runs.items()}
    assert again["variants"]["pkt feat_weight x2"] == merged["variants"]["pkt feat_weight x2"]
    assert len(again["invocations"]) == 3 and "--from-runs" not in again["invocations"][2]["command"]
    assert "--append --resume --weights-of" in again["invocations"][2]["command"]  # trains where runs are not
    # --resume: the finished runs of the same recipe are reused, not trained again
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--append", "--resume", "--weights-of",
                           "pkt", "--seeds", "1", "--jobs", "1", "--out", "out/tuning.json"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("finished before in") == 3
    assert stamps == {k: (tmp_path / r["run_dir"] / "summary.json").stat().st_mtime_ns for k, r in pkt_runs.items()}
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--append", "--from-runs", "--variants",
                           "kd", "--seeds", "5", "--out", "out/tuning.json"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and "no finished run" in proc.stderr, proc.stderr

    # runs of another recipe folder do not join this file: refused before any training
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--append", "--recipes",
                           "configs/fashion_mnist_wide", "--out", "out/tuning.json"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and "holds runs of other recipes (configs/fashion_mnist)" in proc.stderr, proc.stderr
    assert "teacher" not in proc.stdout


def test_tuning_summary_keeps_the_options_its_runs_recorded(monkeypatch):
    """A weight variant is defined from its recipe's value, which changes once the recipe takes the chosen
    weight: the summary (and so the sweep's table and the recipe check) must keep the value that ran."""
    monkeypatch.syspath_prepend(str(BENCH))
    import tune

    name = "pkt feat_weight x0.5"
    runs = [{"variant": name, "seed": s, "options": {"feat_weight": 7.0}, "last_top1": 80.0 + s, "best_top1": 81.0,
             "wall_time_s": 60.0} for s in (0, 1)]
    assert tune.VARIANTS[name][1] != {"feat_weight": 7.0}
    summary = tune.summarise(runs, [name])
    assert summary[name]["options"] == {"feat_weight": 7.0} and summary[name]["seeds"] == [0, 1]
    assert summary[name]["last_top1"]["mean"] == approx(80.5)


def test_tuning_on_the_wide_teacher(tmp_path):
    """--recipes configs/fashion_mnist_wide: the same variants distil from the 4x wider resnet8x4 teacher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "tune.py"), "--quick", "--recipes", "configs/fashion_mnist_wide",
                           "--variants", "blockkd conv3x3_bn", "--out", "out/wide.json"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "wide.json").read_text())
    assert report["setup"]["recipes"] == "configs/fashion_mnist_wide" and report["teacher"]["model"] == "resnet8x4"
    (run,) = report["runs"]
    cfg = config.load(tmp_path / run["run_dir"] / "config.yaml")
    assert (cfg["model"]["name"], cfg["teacher"]["name"]) == ("resnet8", "resnet8x4")
    assert cfg["method"]["options"]["connector"] == "conv3x3_bn" and cfg["data"]["val_split"] == 300
    md = (tmp_path / "out" / "wide.md").read_text()
    assert md.startswith("### Tuning Block-KD (validation split, configs/fashion_mnist_wide, 1 epochs; ")
    assert "configs/fashion_mnist_wide recipes" in md and "teacher resnet8x4 at" in md


# ----------------------------------------------------------------------------------------- held-out settings
@pytest.mark.parametrize("folder", ["fashion_mnist_full", "fashion_mnist_vit"])
def test_held_out_settings_run_what_users_get(folder, monkeypatch):
    """The settings nothing was chosen on (issue 29): Block-KD at the method's defaults (no option set by its
    recipe), every baseline with its configs/fashion_mnist options but the warm-ups scaled to the schedule, and
    one pair, data and schedule for every entry."""
    monkeypatch.syspath_prepend(str(BENCH))
    import students

    here = ROOT / "configs" / folder
    entries = students.entries_in(here)
    assert {"ce", "kd", "dkd", "dist", "blockkd"} <= set(entries) and set(entries) <= {*students.ORDER}
    cfgs = {m: config.load(here / f"{m}.yaml") for m in entries}
    teacher = config.load(here / "teacher.yaml")
    assert cfgs["blockkd"]["method"]["options"] == methods.defaults("blockkd")
    shared = {(c["model"]["name"], c["teacher"]["name"], c["data"]["train_subset"], c["train"]["epochs"],
               c["optim"]["name"], c["schedule"]["name"]) for m, c in cfgs.items() if m != "ce"}
    assert len(shared) == 1 and (cfgs["ce"]["model"]["name"],) == next(iter(shared))[:1]
    (student, teacher_name, subset, epochs, _, _), = shared
    assert teacher_name == teacher["model"]["name"] == "resnet20"
    main = {m: config.load(ROOT / "configs" / "fashion_mnist" / f"{m}.yaml") for m in entries}
    for m in entries:
        scaled = {"warmup"} if "warmup" in cfgs[m]["method"]["options"] and m != "blockkd" else set()
        ours, theirs = cfgs[m]["method"]["options"], main[m]["method"]["options"]
        if m != "blockkd":
            assert {k: v for k, v in ours.items() if k not in scaled} == {k: v for k, v in theirs.items()
                                                                           if k not in scaled}, m
        for k in scaled:  # the same share of training as in the main setting
            assert ours[k] / epochs == approx(theirs[k] / main[m]["train"]["epochs"]), m
    if folder == "fashion_mnist_full":
        assert subset is None and epochs != main["ce"]["train"]["epochs"] and student == "resnet8"
    else:
        assert student == "vit_tiny_p4" and "reviewkd" not in entries
        assert config.fingerprint(teacher, ignore=("output",)) == config.fingerprint(
            config.load(ROOT / "configs" / "fashion_mnist" / "teacher.yaml"),
            ignore=("output",))  # the same cached teacher


# ----------------------------------------------------------------------------------------- sensitivity
def test_sensitivity_points_follow_the_method_defaults(monkeypatch):
    """Each knob's values are relative to the defaults the method has when the sweep runs, every other knob
    pinned at its default: the sweep stays around the defaults whatever they become."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sensitivity

    d = {**methods.defaults("blockkd"), "alpha": 1.0, "beta": 0.5, "gamma": 0.1, "temperature": 2.0,
         "connector": "conv3x3_bn"}
    warm = sensitivity.warmup_key(d)
    assert warm in d and "warmup" in warm
    g = sensitivity.grid("blockkd", {**d, warm: 0.3}, epochs=8)  # stone_warmup_fraction: a share of training
    assert [o for _, o in g["alpha_beta"]] == [{"alpha": 0.5, "beta": 0.25}, {"alpha": 2.0, "beta": 1.0}]
    assert ([o["gamma"] for _, o in g["gamma"]] == [0.0, 0.4]
            and [o["temperature"] for _, o in g["temperature"]] == [1, 4])
    assert {o["connector"] for _, o in g["connector"]} == set(sensitivity.CONNECTORS.names()) - {"conv3x3_bn"}
    assert [o[warm] for _, o in g["warmup"]] == [0.0, 0.6]
    g0 = sensitivity.grid("blockkd", {**d, "gamma": 0.0, warm: 0.0}, epochs=8)  # from 0: fixed steps up
    assert [o["gamma"] for _, o in g0["gamma"]] == [0.05, 0.2] and [o[warm] for _, o in g0["warmup"]] == [0.25, 0.5]
    points = sensitivity.points_of(["gamma", "connector"], "blockkd", d, 8, None)
    pinned = {k: d[k] for k in ("alpha", "beta", "gamma", "temperature", "connector", warm)}
    assert points[0] == ("defaults", None, "default", pinned)
    for _, knob, _, options in points[1:]:  # one knob off its default at a time
        assert [k for k in pinned if options[k] != pinned[k]] == [knob]


def test_sensitivity_report(tmp_path):
    """--quick: the defaults and one point per knob asked for, trained on the held-out split with exactly the
    options of the report (read back from the run folders); the table, the plot and --render agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "sensitivity.py"), "--quick", "--knobs", "gamma", "connector",
                           "--jobs", "2", "--out", "out/sens.json"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "sens.json").read_text())
    d = methods.defaults("blockkd")
    assert report["setup"]["defaults"] == {k: d[k] for k in report["setup"]["defaults"]}
    assert report["setup"]["val_split"] == 300 and report["setup"]["seeds"] == [0]
    assert len(report["runs"]) == 3 and {r["knob"] for r in report["runs"]} == {None, "gamma", "connector"}
    by_point = {r["point"]: r for r in report["runs"]}
    for r in report["runs"]:
        cfg = config.load(tmp_path / r["run_dir"] / "config.yaml")
        assert cfg["data"]["val_split"] == 300 and cfg["method"]["name"] == "blockkd"
        ran = {k: cfg["method"]["options"][k] for k in report["setup"]["defaults"]}
        assert ran == r["options"]
        changed = [k for k in ran if ran[k] != report["setup"]["defaults"][k]]
        assert changed == ([] if r["point"] == "defaults" else [r["knob"]])
    assert list(report["knobs"]) == ["gamma", "connector"]
    default = by_point["defaults"]["last_top1"]
    for points in report["knobs"].values():
        assert len(points) == 2 and sum(p["default"] for p in points) == 1
        for p in points:
            mine = [r for r in report["runs"] if r["options"] == p["options"]]
            assert p["last_top1"]["values"] == [r["last_top1"] for r in mine]
            assert p["vs_default"] == approx(p["last_top1"]["mean"] - default)
    assert [p["value"] for p in report["knobs"]["gamma"]] == sorted([0.0, d["gamma"]] if d["gamma"] else [0.0, 0.05])
    md = (tmp_path / "out" / "sens.md").read_text()
    assert md.startswith("### Sensitivity of blockkd (validation split)") and "sens.png" in md
    assert f"| connector | **{d['connector']} (default)** | 1 |" in md
    assert (tmp_path / "out" / "sens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "out" / "sens.md").unlink()
    subprocess.run([sys.executable, str(BENCH / "sensitivity.py"), "--render",
                    "--out", str(tmp_path / "out" / "sens.json")],
                   check=True, capture_output=True, timeout=120)
    assert (tmp_path / "out" / "sens.md").read_text() == md


# ----------------------------------------------------------------------------------------- README
def test_readme_results_are_the_committed_benchmark_output(tmp_path):
    """README.md's headline table and results/README.md's sections are exactly results/*.md, and --check notices
    any difference in either."""
    def readme(*args: str) -> int:
        return subprocess.run([sys.executable, str(BENCH / "readme.py"), *args], capture_output=True,
                              timeout=120).returncode

    assert readme("--check") == 0, "README.md or results/README.md is out of date: run python benchmarks/readme.py"
    marks = re.compile(r"<!-- BEGIN ([\w./-]+\.md)((?:: headline)?) -->")
    top = marks.findall((ROOT / "README.md").read_text())
    assert top == [("results/accuracy.md", ": headline")]  # one headline table, the leaderboard
    text = (ROOT / "results" / "README.md").read_text()
    names = [name for name, view in marks.findall(text)]
    assert {"results/speed.md", "results/accuracy.md", "results/tuning-round7.md"} <= set(names)
    assert names == sorted(set(names), key=names.index)  # each section once
    # Every benchmark section (a level-3 title) has its place; a results file with a title of its own is a page,
    # linked from results/README.md.
    sections = sorted(p.name for p in (ROOT / "results").glob("*.md") if p.read_text().startswith("### "))
    pages = sorted(p.name for p in (ROOT / "results").glob("*.md") if p.read_text().startswith("# ")
                   and p.name != "README.md")
    assert sorted(n.split("/", 1)[1] for n in names) == sections
    assert all(f"]({page})" in text for page in pages), pages
    titles = [line for line in text.splitlines() if line.startswith("#")]
    assert len(titles) == len(set(titles)), "results/README.md has two sections of the same title"

    (tmp_path / "results").mkdir()
    for name in names:
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "README.md").write_text(text)  # the document's marks are relative to its folder
    first = tmp_path / names[0]
    first.write_text(first.read_text() + "\nedited\n")
    assert readme("--check", "--readme", str(tmp_path / "README.md")) == 1
    assert readme("--readme", str(tmp_path / "README.md")) == 0
    assert "\nedited\n<!-- END" in (tmp_path / "README.md").read_text()
    assert readme("--check", "--readme", str(tmp_path / "README.md")) == 0

    # The headline follows the leaderboard's table: a changed number there changes it.
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    table = (tmp_path / "results" / "accuracy.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    (tmp_path / "results" / "accuracy.md").write_text(table.replace(row, row.replace("| 1 |", "| 99 |")))
    assert readme("--check", "--readme", str(tmp_path / "README.md")) == 1
    assert readme("--readme", str(tmp_path / "README.md")) == 0
    assert "| 99 |" in (tmp_path / "README.md").read_text()


def test_recipes_carry_the_weights_chosen_on_the_validation_split(baseline_sweeps):
    """Each baseline swept in results/tuning-baselines.json has, in its Fashion-MNIST recipe, the weight that
    the sweep chose (what the README's leaderboard says of its entries)."""
    assert baseline_sweeps, "results/tuning-baselines.json holds no complete sweep"
    for method, w in baseline_sweeps.items():
        means = {f: t["last_top1"]["mean"] for f, t in w["tried"].items()}
        assert means[f"{w['chosen_factor']:g}"] == max(means.values())
        recipe = config.load(ROOT / "configs" / "fashion_mnist" / f"{method}.yaml")["method"]["options"]
        assert recipe[w["key"]] == approx(w["chosen"]), f"{method}.yaml: {w['key']} is not the chosen {w['chosen']:g}"


# ------------------------------------------------------------------------------------- fortunes LM
def test_lm_benchmark_report(tmp_path):
    """benchmarks/lm_fortunes.py --quick from the repository root: the teacher, then forward KL live and from
    two logit caches (k = 8 and 16), each in its own process; the table ranks what the JSON holds."""
    out = tmp_path / "lm.md"
    proc = subprocess.run([sys.executable, str(BENCH / "lm_fortunes.py"), "--quick", "--seeds", "0", "--methods",
                           "forward_kl", "forward_kl-cached-k8", "forward_kl-cached-k16", "--runs",
                           str(tmp_path / "runs"), "--out", str(out)], cwd=ROOT, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    runs = {m: rs[0] for m, rs in report["runs"].items()}
    assert set(runs) == {"forward_kl", "forward_kl-cached-k8", "forward_kl-cached-k16"}
    assert all(r["steps"] == 3 and r["peak_mib"] > 0 and r["peak_kind"] in ("RSS", "CUDA") for r in runs.values())
    mass = report["cache_mass"]
    assert 0 < mass["forward_kl-cached-k8"] < mass["forward_kl-cached-k16"] <= 1  # more of the teacher at larger k
    assert sorted((tmp_path / "runs").glob("cache-k*")) == [tmp_path / "runs/cache-k16", tmp_path / "runs/cache-k8"]
    table = [line.split("|")[1:-1] for line in out.read_text().splitlines() if re.match(r"^\| \d", line)]
    assert [row[1].strip() for row in table] == sorted(runs, key=lambda m: runs[m]["perplexity"])
    ratio = {row[1].strip(): row[6].strip() for row in table}
    assert ratio["forward_kl"] == "1.00"
    k8, live = runs["forward_kl-cached-k8"], runs["forward_kl"]
    assert ratio["forward_kl-cached-k8"] == f"{k8['step_s'] / live['step_s']:.2f}"
    written = out.read_text()
    out.unlink()
    proc = subprocess.run([sys.executable, str(BENCH / "lm_fortunes.py"), "--render", "--out", str(out)], cwd=ROOT,
                          text=True, capture_output=True, timeout=60)
    assert proc.returncode == 0 and out.read_text() == written  # the table is the JSON's, nothing else


def test_lm_benchmark_refuses_a_method_without_a_recipe(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "lm_fortunes.py"), "--quick", "--methods", "kd-nope",
                           "--out", str(tmp_path / "x.md")], cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == ("error: no recipe configs/lm_fortunes/kd-nope.yaml for "
                                                            "method kd-nope")


# ----------------------------------------------------------------------------------------- across families
HETERO = ROOT / "configs" / "fashion_mnist_hetero"


@pytest.mark.parametrize("pair", sorted(d.name for d in HETERO.iterdir() if d.is_dir()))
def test_heterogeneous_pairs_run_the_main_recipes_with_their_models(pair):
    """Issue 35's table: each pair's recipe for a method is configs/fashion_mnist's, the models, the teacher's
    checkpoint and the student family's learning rate aside (nothing tuned per pair or method; run names
    follow), with Block-KD at the method's defaults."""
    here = HETERO / pair
    teacher_name, student_name = pair.split("-")
    pair_keys = ("model.name", "teacher.name", "teacher.checkpoint", "optim.lr")
    flat = lambda c: {k: v for k, v in config.flat_keys(c.to_dict()).items()  # noqa: E731
                      if k not in pair_keys and not k.startswith("output.")}
    entries = sorted(p.stem for p in here.glob("*.yaml") if p.stem not in ("pair", "teacher"))
    assert set(entries) >= {"ce", "kd", "dkd", "reviewkd", "dist", "blockkd"}
    for m in entries:
        cfg = config.load(here / f"{m}.yaml")
        assert cfg["model"]["name"].lower() == student_name, m
        main = config.load(ROOT / "configs" / "fashion_mnist" / f"{m}.yaml")
        assert flat(cfg) == flat(main), m
        # MobileNet/ShuffleNet students: the CIFAR-100 recipes' lr rule, 0.01 where the others have 0.05
        lr = cfg["optim"]["lr"]
        assert student_name.startswith(("shuffle", "mobilenet")) and lr == approx(main["optim"]["lr"] / 5), m
        assert lr == config.load(ROOT / "configs/cifar100/resnet32x4_ShuffleV1/pair.yaml")["optim"]["lr"], m
        if m != "ce":
            assert cfg["teacher"]["name"] == teacher_name, m
    assert config.load(here / "blockkd.yaml")["method"]["options"] == methods.defaults("blockkd")
    assert config.load(here / "teacher.yaml")["model"]["name"] == teacher_name


def test_heterogeneous_benchmark_passes_its_run_options_to_each_pair(monkeypatch, tmp_path):
    """hetero.py runs each pair through accuracy.py: --from-runs and --append reach it (a session's finished runs
    join the pair's report), a pair with no finished run is left out, and a pair not run now keeps its rows from
    its report (pairs run in different sessions share one table)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import accuracy
    import hetero

    calls = []

    def fake_accuracy(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        out.write_text(json.dumps({"teacher": {"last_top1": 88.0}, "runs": [], "methods": {}}))
        return 0

    monkeypatch.setattr(accuracy, "main", fake_accuracy)
    out = tmp_path / "hetero.md"
    (tmp_path / "hetero" / "resnet20-shufflev1-runs" / "kd-seed1").mkdir(parents=True)
    (tmp_path / "hetero" / "resnet20-shufflev1-runs" / "kd-seed1" / "summary.json").write_text("{}")
    earlier = {"teacher": {"last_top1": 91.25}, "runs": [{"method": "kd", "seed": 0, "curve": [[1, 80.0]]}],
               "methods": {"kd": {"seeds": [0], "last_top1": {"mean": 80.0, "std": 0.0, "n": 1}}}}
    (tmp_path / "hetero" / "wrn_16_2-shufflev1.json").write_text(json.dumps(earlier))
    argv = ["--pairs", "resnet20-shufflev1", "resnet20-mobilenetv2", "--methods", "kd", "--seeds", "1",
            "--from-runs", "--append", "--jobs", "2", "--out", str(out)]
    assert hetero.main(argv) == 0
    assert len(calls) == 1  # resnet20-mobilenetv2: no finished run, left out
    assert calls[0][0] == "--recipes" and Path(calls[0][1]).resolve() == HETERO / "resnet20-shufflev1"
    assert {"--from-runs", "--append"} <= set(calls[0]) and "--resume" not in calls[0]
    assert calls[0][calls[0].index("--out") + 1] == str(tmp_path / "hetero" / "resnet20-shufflev1.json")
    assert "| wrn_16_2-shufflev1 | kd | 80.00 | 1 | 0.0 | 91.25 |" in out.read_text()  # not run now, kept
    assert hetero.main(["--render", "--out", str(out)]) == 0 and len(calls) == 1  # --render trains nothing
    assert "| wrn_16_2-shufflev1 | kd | 80.00 |" in out.read_text()


def test_heterogeneous_table_reports_each_pairs_mean_and_largest_drop(monkeypatch):
    """The combined table: per pair and method the mean ± std of the last-epoch top-1 over the seeds, and the
    largest fall of any of its runs from one epoch to the next (issue 35's collapse criterion)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import hetero

    assert hetero.largest_drop([[2, 40.0], [1, 50.0], [3, 70.0]]) == 10.0  # epochs sorted first
    assert hetero.largest_drop([[1, 10.0], [2, 20.0]]) == 0.0
    runs = [{"method": "dkd", "seed": 0, "curve": [[1, 60.0], [2, 44.0], [3, 80.0]]},
            {"method": "dkd", "seed": 1, "curve": [[1, 50.0], [2, 55.0], [3, 81.0]]},
            {"method": "blockkd", "seed": 0, "curve": [[1, 30.0], [2, 27.5], [3, 84.0]]}]
    report = {"teacher": {"last_top1": 88.7}, "runs": runs,
              "methods": {"dkd": {"seeds": [0, 1], "last_top1": {"mean": 80.5, "std": 0.71}},
                          "blockkd": {"seeds": [0], "last_top1": {"mean": 84.0, "std": 0.0, "n": 1, "values": [84.0]}}}}
    md = hetero.render({"resnet20-shufflev1": report})
    rows = {r.split("|")[2].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in md.splitlines()
            if r.startswith("|") and r.split("|")[2].strip() in ("dkd", "blockkd")}
    assert rows["dkd"][0] == "resnet20-shufflev1" and rows["dkd"][5] == "88.70"
    assert rows["dkd"][2:5] == ["80.50 ± 0.71", "2", "16.0"]
    assert rows["blockkd"][0] == "" and rows["blockkd"][2:5] == ["84.00", "1", "2.5"]  # one seed: no "± 0.00"
    assert "`python benchmarks/hetero.py --render`" in md  # how to make it again, whichever command ran
    # a teacher retrained between sessions: both, the runs each taught named in the pair's own report
    report["teacher"] = {"last_top1": 88.82, "weights_sha256": "b", "earlier": [
        {"last_top1": 88.65, "weights_sha256": "a"}]}
    for r, sha in zip(runs, "aab"):
        r["teacher_sha256"] = sha
    md = hetero.render({"resnet20-shufflev1": report})
    assert "| resnet20-shufflev1 | dkd | 80.50 ± 0.71 | 2 | 16.0 | 88.65 / 88.82 |" in md


def test_precise_bn_report_trains_the_same_weights_again(tmp_path):
    """benchmarks/precise_bn.py: the run trained again with train.precise_bn has the same weights (so its curve
    differs only in the BN statistics evaluated), and a broken weight would be caught."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine import recipe
    from blockkd.engine import train
    train(recipe(tmp_path, "r"))
    out = tmp_path / "report" / "pbn.json"
    subprocess.run([sys.executable, str(BENCH / "precise_bn.py"), str(tmp_path / "r"), "--batches", "2", "--out",
                    str(out)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    report = json.loads(out.read_text())
    assert report["same_weights"] is True and report["precise_bn"] == 2
    assert len(report["test_top1"]) == len(report["test_top1_precise_bn"]) == 2
    assert "| largest epoch drop |" in out.with_suffix(".md").read_text()
    sys.path.insert(0, str(BENCH))
    from precise_bn import same_weights
    import safetensors.torch
    again = out.with_name("pbn-runs") / "r" / "last" / "weights.safetensors"
    sd = safetensors.torch.load_file(again)
    key = next(k for k in sd if k.endswith("conv1.weight"))
    sd[key] = sd[key] + 1e-3
    safetensors.torch.save_file(sd, again)
    assert not same_weights(tmp_path / "r", again.parent.parent)


def test_first_epoch_report_starts_every_variant_alike(tmp_path):
    """benchmarks/first_epoch.py: every variant starts from the same student on the same first batch (the same
    CE at step 1), and at step 1 Block-KD's gradient into the student is that of KD with CE 0 + KD 1 (its task
    terms and stepping-stones ramp in from 0; before that ramp, CE 1 + KD 1's), which the report rests on."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine import recipe
    from blockkd.engine import train
    train(recipe(tmp_path, "t", train__epochs=1))
    train(recipe(tmp_path, "b", method__name="blockkd", teacher__name="resnet8",
                 teacher__checkpoint=str(tmp_path / "t"), train__max_steps=1))
    out = tmp_path / "report" / "fe.json"
    subprocess.run([sys.executable, str(BENCH / "first_epoch.py"), str(tmp_path / "b"), "--steps", "2", "--out",
                    str(out)], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    report = json.loads(out.read_text())
    runs = report["variants"]
    assert set(runs) == {"blockkd (RUN's)", "kd, CE 0.1 + KD 0.9", "kd, CE 1 + KD 1", "kd, CE 0 + KD 1", "ce"}
    assert all(len(r) == 2 for r in runs.values())
    first = [r[0]["ce"] for r in runs.values()]
    assert max(first) - min(first) < 1e-5
    assert runs["blockkd (RUN's)"][0]["grad_norm"] == pytest.approx(runs["kd, CE 0 + KD 1"][0]["grad_norm"], rel=1e-4)
    assert runs["kd, CE 1 + KD 1"][0]["grad_norm"] > runs["kd, CE 0.1 + KD 0.9"][0]["grad_norm"]
    assert "| kd, CE 1 + KD 1 |" in out.with_suffix(".md").read_text()
