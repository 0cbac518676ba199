"""The training loop: ``train(cfg)`` builds a run from a validated recipe and trains it to the end.

Why it looks like this: one ``run_epoch`` and one ``evaluate`` serve every method (the distiller hides
what differs); metrics are accumulated on the device and read back only every few steps, so the GPU is
never stalled by the bookkeeping; each epoch ends in an atomic checkpoint from which ``resume=True``
continues exactly (data order comes from ``set_epoch``, RNG/optimizer/scheduler state from the checkpoint).
"""
from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .. import data as data_lib
from .. import methods, models
from ..data.common import debug_log
from ..config import flatten
from ..errors import BlockKDError
from ..schema import OptionError
from . import runtime
from .build import build_model, check_fits
from .checkpoint import (checkpoint_dir, copy_checkpoint, load_checkpoint, load_resumable, read_meta,
                         save_checkpoint)
from .logger import RunLogger
from .plots import plot_curves
from .runtime import Runtime
from .schedule import build_scheduler

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "last", "last.prev", "best", "summary.json")


# ------------------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def oom_advice(key: str, batch_size: int) -> Iterator[None]:
    """Turn running out of device memory into one line that says which batch size to lower, and to what."""
    try:
        yield
    except torch.OutOfMemoryError:
        what = "eval batch size" if "eval" in key else "batch size"
        tip = f"try {key}={batch_size // 2}" if batch_size > 1 else "try a smaller model or a larger device"
        raise BlockKDError(f"out of memory at {what} {batch_size}; {tip}") from None


# ------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime | None = None) -> dict[str, float]:
    """Top-1/top-5 (%), mean cross-entropy and images/s of ``model`` on ``loader`` (summed over ranks)."""
    if rt is None:
        param = next(model.parameters(), None)
        rt = Runtime(param.device if param is not None else torch.device("cpu"), None, False)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=rt.device, dtype=torch.float64)  # correct@1, correct@5, loss sum
    n = 0
    start = time.perf_counter()
    for x, y in loader:
        with rt.autocast():
            logits = model(rt.prepare(x))
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
        sums += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), F.cross_entropy(logits, y, reduction="sum")])
        n += y.shape[0]
    totals = runtime.all_reduce_sum(torch.cat([sums, sums.new_tensor([n])])).tolist()
    seconds = time.perf_counter() - start
    model.train(was_training)
    c1, c5, loss, n_all = totals
    if n_all == 0:
        raise BlockKDError("the test split is empty")
    return {"top1": 100 * c1 / n_all, "top5": 100 * c5 / n_all, "loss": loss / n_all, "images": int(n_all),
            "images_per_s": n_all / max(seconds, 1e-9)}


def evaluate_checkpoint(path: str | Path, data_overrides: dict | None = None,
                        device: str | None = None) -> dict[str, Any]:
    """Rebuild the student of a run (or checkpoint folder) from its meta.json and evaluate it on the test split."""
    ckpt = load_checkpoint(checkpoint_dir(path), with_state=False)
    cfg = ckpt.meta["config"]
    data_cfg = {**cfg["data"], **(data_overrides or {})}
    rt = runtime.from_config({**cfg["train"], **({"device": device} if device else {})})
    data = data_lib.build(data_cfg, device=rt.device, seed=cfg["train"]["seed"])
    model = build_model({"name": cfg["model"]["name"]}, data, role="model")
    weights = ckpt.student_weights()
    check_fits(model, weights, role="evaluated", path=ckpt.path, data=data)
    model.load_state_dict(weights)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    with oom_advice("data.eval_batch_size", data_cfg["eval_batch_size"]):
        result = evaluate(model, data.test, rt)
    return {"checkpoint": str(ckpt.path), "epoch": ckpt.meta.get("epoch"), "model": cfg["model"]["name"],
            "method": cfg["method"]["name"], "data": data_cfg["name"], **result}


# ------------------------------------------------------------------------------------------- non-finite
class NonFiniteGuard:
    """Catches NaN/Inf loss terms.

    ``stop``: the first bad step is recorded on the device and reported at the next sync point (no
    host sync per step); the run then raises before any checkpoint is written from the corrupted state.
    ``skip``: needs the answer before the optimizer step, so it syncs every step and skips bad steps.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in ("stop", "skip"):
            raise BlockKDError(f"train.nonfinite={mode!r}; choose stop or skip")
        self.mode, self.device, self.skipped = mode, device, 0
        self.start_epoch()

    def start_epoch(self) -> None:
        self.counter = torch.zeros((), dtype=torch.long, device=self.device)  # step index in the epoch
        self.first = torch.full((), -1, dtype=torch.long, device=self.device)
        self.values: torch.Tensor | None = None

    @staticmethod
    def describe(names, values) -> str:
        bad = [f"term {k!r} = {v}" for k, v in zip(names, values) if not math.isfinite(v)]
        return ", ".join(bad) or "the total"

    def ok(self, terms: torch.Tensor, names, epoch: int, step: int, log: RunLogger) -> bool:
        """False when this step must be skipped (``skip`` mode only)."""
        bad = ~torch.isfinite(terms)
        if self.mode == "skip":
            # Under DDP every rank must skip together, or the gradient all-reduce would hang.
            if not runtime.all_reduce_sum(bad.any().float()[None]).item():
                return True
            self.skipped += 1
            log.warning(f"non-finite loss at epoch {epoch + 1} step {step + 1}: "
                        f"{self.describe(names, terms.tolist())}; step skipped ({self.skipped} so far)")
            return False
        new = bad.any() & (self.first < 0)
        self.first = torch.where(new, self.counter, self.first)
        self.values = terms if self.values is None else torch.where(new, terms, self.values)
        self.counter += 1
        return True

    def check(self, names, epoch: int) -> None:
        """Raise if a bad step was recorded here or on another rank (one host sync)."""
        if self.mode != "stop":
            return
        bad_ranks = runtime.all_reduce_sum((self.first >= 0).float()[None]).item()
        if (step := int(self.first)) >= 0:
            raise BlockKDError(f"non-finite loss at epoch {epoch + 1} step {step + 1}: "
                               f"{self.describe(names, self.values.tolist())}")
        if bad_ranks:
            raise BlockKDError(f"non-finite loss at epoch {epoch + 1} on another rank (see its message)")


# ------------------------------------------------------------------------------------------- run folder
def run_dir_of(cfg: dict) -> Path:
    out = cfg["output"]
    name = out["name"] or f"{cfg['model']['name']}_{cfg['method']['name']}"
    return Path(out["dir"]).expanduser() / name


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create (or check, or clear) the run folder; refuse to silently mix two runs in one folder.

    A folder left by a start that failed before its first checkpoint (a typo in a teacher path, say)
    holds nothing worth keeping and is reused without flags.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise BlockKDError(f"run folder {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        ours = any((run_dir / m).exists() for m in RUN_MARKERS)
        progress = any((run_dir / m).exists() for m in RUN_MARKERS if m != "config.yaml")
        if overwrite or (ours and not progress):
            if not ours:
                raise BlockKDError(f"{run_dir} does not look like a blockkd run folder; refusing to delete it "
                                   f"(choose another output.dir/output.name)")
            shutil.rmtree(run_dir)
        elif not resume:
            raise BlockKDError(f"run folder {run_dir} exists; pass --resume to continue or --overwrite to replace it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BlockKDError(f"run folder {run_dir} is not writable ({e.strerror})") from None


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One run: the distiller, its optimizer and schedule, the data, and the run's progress state."""

    def __init__(self, cfg: dict, run_dir: Path, rt: Runtime, log: RunLogger, *, resume: bool):
        self.cfg, self.run_dir, self.rt, self.log = cfg, run_dir, rt, log
        self.started = time.perf_counter()
        tcfg = cfg["train"]
        runtime.seed_everything(int(tcfg["seed"]))
        self.data = data_lib.build(cfg["data"], device=rt.device, rank=runtime.rank(),
                                   world_size=runtime.world_size(), seed=int(tcfg["seed"]))
        self.distiller = self._build_distiller()
        self.model: nn.Module = self.distiller  # what the training step calls: maybe DDP- and compile-wrapped
        if runtime.is_distributed():
            self.model = runtime.wrap_ddp(self.model, rt.device)
        if tcfg["compile"]:
            self.model = torch.compile(self.model)

        ocfg = cfg["optim"]
        if ocfg["name"] != "sgd":
            raise BlockKDError(f"optim.name={ocfg['name']!r}; only sgd is available")
        self.params = list(self.distiller.trainable_parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=float(ocfg["lr"]), momentum=float(ocfg["momentum"]),
                                         nesterov=bool(ocfg["nesterov"]), weight_decay=float(ocfg["weight_decay"]))
        self.steps_per_epoch = len(self.data.train)
        self.epochs = int(tcfg["epochs"])
        self.scheduler = build_scheduler(self.optimizer, cfg["schedule"], steps_per_epoch=self.steps_per_epoch,
                                         epochs=self.epochs)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
        self.guard = NonFiniteGuard(tcfg["nonfinite"], rt.device)
        self.max_steps, self.grad_clip = tcfg["max_steps"], tcfg["grad_clip"]

        self.epoch, self.step, self.history = 0, 0, []
        self.best_top1, self.best_epoch, self.wall_before = -1.0, None, 0.0
        self.teacher_top1: float | None = None
        self.loss_names: list[str] | None = None
        if resume:
            self.restore()
        log.open_tensorboard(purge_step=self.step if resume else None)

    def _build_distiller(self) -> methods.Distiller:
        """Student (and teacher) for the data, wrapped by the method, on the device."""
        cfg, data, rt = self.cfg, self.data, self.rt
        student = build_model(cfg["model"], data, role="model")
        if cfg["train"]["sync_bn"] and runtime.is_distributed():
            if rt.device.type != "cuda":
                raise BlockKDError(f"train.sync_bn needs CUDA devices (this run uses {rt.device}); set it to false")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # before the method builds views of it
        method = cfg["method"]["name"]
        teacher = build_model(cfg["teacher"], data, role="teacher") \
            if methods.needs_teacher(method) and cfg["teacher"]["name"] else None
        try:
            distiller = methods.create(method, student, teacher, data.input_shape, **cfg["method"]["options"])
        except OptionError as e:
            raise BlockKDError(f"invalid method.options.{e.key} in {cfg.get('_source', 'the recipe')}: {e}") from None
        if cfg["train"]["sync_bn"] and runtime.is_distributed():  # the method's own modules (connectors), in place
            for name, child in distiller.named_children():
                if name not in ("student", "teacher"):
                    nn.SyncBatchNorm.convert_sync_batchnorm(child)
        distiller.to(rt.device)
        if rt.channels_last:
            distiller.to(memory_format=torch.channels_last)
        return distiller

    # -- state ---------------------------------------------------------------------------------------
    def restore(self) -> None:
        ckpt = load_resumable(self.run_dir, self.log.warning)
        if ckpt is None:
            self.log.warning(f"nothing to resume in {self.run_dir} (no checkpoint yet); starting from scratch")
            return
        meta, state = ckpt.meta, ckpt.state
        saved = flatten(meta["config"])
        changed = {k: v for k, v in flatten(self.cfg).items() if saved.get(k, v) != v and not k.startswith("output.")}
        if changed:
            self.log.warning("resuming with changed settings: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
        self.distiller.load_train_state_dict(ckpt.weights)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        runtime.set_rng_state(meta["rng"])
        self.epoch, self.step, self.history = int(meta["epoch"]), int(meta["step"]), list(meta["history"])
        self.best_top1 = meta.get("best_top1", -1.0)
        self.best_epoch = meta.get("best_epoch")
        self.wall_before = float(meta.get("wall_time_s", 0.0))
        self.guard.skipped = int(meta.get("skipped_steps", 0))
        self.log.info(f"resuming {self.run_dir} from {ckpt.path.name}/ after epoch {self.epoch} (step {self.step})")
        self.log.metrics(self.history)  # a kill after the checkpoint but before the metrics files left them behind
        self.repair_best(ckpt.path)

    def repair_best(self, resumed_from: Path) -> None:
        """Make ``best/`` hold ``best_epoch`` again: a kill between writing ``last/`` and copying it to
        ``best/`` (or while swapping ``best/``) leaves an older or missing ``best/`` behind."""
        if self.best_epoch is None or not runtime.is_main():
            return

        def epoch_of(folder: Path) -> int | None:
            try:
                return read_meta(folder).get("epoch")
            except BlockKDError:
                return None

        best = self.run_dir / "best"
        if epoch_of(best) == self.best_epoch:
            return
        source = next((f for f in (resumed_from, self.run_dir / "best.prev") if epoch_of(f) == self.best_epoch), None)
        if source is None:
            self.log.warning(f"{best} does not hold the best epoch ({self.best_epoch}) and no checkpoint of it is "
                             f"left; it will be replaced by the next best epoch")
            return
        self.log.warning(f"{best} did not hold the best epoch ({self.best_epoch}); restored it from {source.name}/")
        copy_checkpoint(source, best)

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def save(self, is_best: bool) -> None:
        """``last/`` (and ``best/``) from the current state; rank 0 only."""
        if not runtime.is_main():
            return
        meta = {"config": self.cfg, "epoch": self.epoch, "step": self.step, "history": self.history,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch, "wall_time_s": self.wall_time(),
                "skipped_steps": self.guard.skipped, "rng": runtime.rng_state()}
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict()}
        last = save_checkpoint(self.run_dir / "last", weights=self.distiller.train_state_dict(), meta=meta,
                               state=state, keep_prev=True)
        if is_best:
            copy_checkpoint(last, self.run_dir / "best")

    # -- loop ----------------------------------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, i: int) -> torch.Tensor | None:
        """One optimizer step on batch ``i`` of ``epoch``; returns ``[each loss term * n, correct]`` on the
        device (no host sync), or None when the step was skipped for a non-finite loss."""
        rt = self.rt
        with rt.autocast():
            logits, losses = self.model(rt.prepare(x), y, epoch=epoch + (i + 1) / self.steps_per_epoch)
        if self.loss_names is None:
            self.loss_names = list(losses)
        terms = torch.stack([v.detach().float() for v in losses.values()])
        self.optimizer.zero_grad(set_to_none=True)
        if not self.guard.ok(terms, self.loss_names, epoch, i, self.log):
            return None
        self.scaler.scale(sum(losses.values())).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.params, float(self.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return torch.cat([terms * y.shape[0], (logits.argmax(1) == y).sum().float()[None]])

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's averaged training metrics.

        Sums live on the device; they are read back (and the non-finite guard checked, the progress bar
        and TensorBoard updated) only every ``sync_every`` steps and at the end.
        """
        self.model.train()
        self.guard.start_epoch()
        steps = self.steps_per_epoch
        sync_every = max(1, min(50, steps // 10))
        lr = self.optimizer.param_groups[0]["lr"]
        acc: torch.Tensor | None = None  # running [sum of each loss term * n ..., correct]
        seen, synced, synced_seen = 0, None, 0
        start = time.perf_counter()
        with self.log.bar(steps, f"epoch {epoch + 1}/{self.epochs}") as bar:
            for i, (x, y) in enumerate(self.data.train):
                if self.out_of_steps():
                    break
                runtime.fault_point("step", step=self.step)
                stats = self.train_step(x, y, epoch, i)
                if stats is not None:
                    acc = stats if acc is None else acc + stats
                    seen += y.shape[0]
                self.scheduler.step()  # the schedule follows batches, skipped or not, to stay aligned with epochs
                self.step += 1
                bar.update(1)
                if ((i + 1) % sync_every == 0 or i + 1 == steps) and seen > synced_seen:
                    self.guard.check(self.loss_names, epoch)
                    totals = acc.tolist()
                    window = [t - p for t, p in zip(totals, synced or [0.0] * len(totals))]
                    terms = {k: v / (seen - synced_seen) for k, v in zip(self.loss_names, window)}
                    self.log.scalars("step", {"loss": sum(terms.values()), **terms,
                                              "lr": self.optimizer.param_groups[0]["lr"]}, self.step)
                    bar.set_postfix({"loss": f"{sum(totals[:-1]) / seen:.3f}", "acc": f"{100 * totals[-1] / seen:.1f}%",
                                     "img/s": f"{seen / (time.perf_counter() - start):.0f}"}, refresh=False)
                    synced, synced_seen = totals, seen
        names = self.loss_names or []
        self.guard.check(names, epoch)
        if acc is None:
            acc = torch.zeros(len(names) + 1, device=self.rt.device)
        totals = runtime.all_reduce_sum(torch.cat([acc.double(), acc.new_tensor([seen]).double()])).tolist()
        seconds = time.perf_counter() - start
        n = totals[-1]
        mean = (lambda v: v / n) if n else (lambda v: None)
        return {"lr": lr, "train_loss": mean(sum(totals[:len(names)])),
                **{f"train_{k}": mean(v) for k, v in zip(names, totals)},
                "train_top1": mean(100 * totals[len(names)]) if names else None,
                "images_per_s": n / max(seconds, 1e-9), "train_time_s": seconds}

    def evaluate_teacher(self) -> None:
        """Check the teacher before spending hours distilling from it: a wrong checkpoint is near chance."""
        teacher = self.distiller.teacher
        if teacher is None:
            return
        res = evaluate(teacher, self.data.test, self.rt)
        self.teacher_top1 = res["top1"]
        name = self.cfg["teacher"]["name"]
        self.log.info(f"teacher {name}: test top-1 {res['top1']:.1f}% (top-5 {res['top5']:.1f}%)")
        chance = 100.0 / self.data.num_classes
        if res["top1"] <= 1.5 * chance and not self.cfg["teacher"]["allow_random"]:
            self.log.warning(f"THE TEACHER IS AT CHANCE LEVEL: {name} scores {res['top1']:.1f}% top-1 on "
                             f"{self.data.name} (chance {chance:.1f}%); check teacher.checkpoint "
                             f"({self.cfg['teacher']['checkpoint']}) and the data")

    def fit(self) -> dict[str, Any]:
        cfg, log = self.cfg, self.log
        n_params = models.num_params(self.distiller.student)
        teacher = f", teacher {cfg['teacher']['name']}" if self.distiller.teacher is not None else ""
        log.info(f"run {self.run_dir}: method {cfg['method']['name']}, student {cfg['model']['name']} "
                 f"({n_params / 1e6:.2f}M params){teacher}; {self.data.name}: {self.data.train_size} train / "
                 f"{self.data.test_size} test images, {self.steps_per_epoch} steps/epoch; {self.rt.describe()}")
        try:
            self.epochs_loop()
        except KeyboardInterrupt:
            self.log.warning(f"interrupted in epoch {self.epoch + 1}; {self.saved_note()}")
            raise
        return self.finish(n_params)

    def saved_note(self) -> str:
        """What a ``--resume`` would continue from, as read back from the disk."""
        try:
            return f"{self.run_dir / 'last'} holds epoch {read_meta(self.run_dir / 'last')['epoch']}"
        except BlockKDError:
            return "no checkpoint was written yet"

    def epochs_loop(self) -> None:
        cfg, log = self.cfg, self.log
        train_oom = functools.partial(oom_advice, "data.batch_size", int(cfg["data"]["batch_size"]))
        eval_oom = functools.partial(oom_advice, "data.eval_batch_size", int(cfg["data"]["eval_batch_size"]))
        with eval_oom():
            self.evaluate_teacher()
        eval_every = max(1, int(cfg["train"]["eval_every"]))
        while self.epoch < self.epochs and not self.out_of_steps():
            epoch = self.epoch
            epoch_start = time.perf_counter()
            self.data.set_epoch(epoch)
            with train_oom():
                trained = self.run_epoch(epoch)
            self.sync_buffers()
            last = epoch + 1 == self.epochs or self.out_of_steps()
            with eval_oom():
                test = evaluate(self.distiller.student, self.data.test, self.rt) \
                    if (epoch + 1) % eval_every == 0 or last else {}
            if test and test["top1"] > self.best_top1:
                self.best_top1, self.best_epoch = test["top1"], epoch + 1
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": self.step, "lr": trained.pop("lr"), "train_loss": trained.pop("train_loss"),
                **{k: trained.pop(k) for k in list(trained) if k.startswith("train_loss_")},
                "train_top1": trained.pop("train_top1"), "test_top1": test.get("top1"), "test_top5": test.get("top5"),
                "test_loss": test.get("loss"), "best_top1": self.best_top1 if self.best_epoch else None,
                "best_epoch": self.best_epoch, "images_per_s": trained.pop("images_per_s"),
                "train_time_s": trained.pop("train_time_s"), "epoch_time_s": time.perf_counter() - epoch_start,
                "skipped_steps": self.guard.skipped}
            self.history.append(row)
            self.epoch = epoch + 1
            with runtime.defer_sigint():  # Ctrl-C waits until last/, best/ and the metrics files agree
                self.save(is_best=self.best_epoch == epoch + 1)
                log.metrics(self.history)
            log.scalars("epoch", {k: v for k, v in row.items() if k not in ("epoch", "step")}, self.epoch)
            log.info(_epoch_line(row, self.epochs))

    def sync_buffers(self) -> None:
        """Rank 0's trained buffers (BN running statistics) on every rank, before evaluating and saving
        (see ``runtime.wrap_ddp``); with ``$BLOCKKD_DEBUG_LOG`` each rank then logs a digest of its weights."""
        trained = self.distiller.train_state_dict()
        runtime.broadcast_tensors([b for n, b in self.distiller.named_buffers() if n in trained])
        debug_log(runtime.rank(), lambda: {"epoch": self.epoch + 1, "step": self.step,
                                           "weights_sha256": runtime.state_digest(self.distiller.train_state_dict())})

    def out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def finish(self, n_params: int) -> dict[str, Any]:
        evaluated = [r for r in self.history if r.get("test_top1") is not None]
        last = evaluated[-1] if evaluated else {}
        best = next((r for r in evaluated if r["epoch"] == self.best_epoch), {})
        total_images = sum(r["images_per_s"] * r["train_time_s"] for r in self.history)
        total_time = sum(r["train_time_s"] for r in self.history)
        summary = {
            "run_dir": str(self.run_dir), "method": self.cfg["method"]["name"], "model": self.cfg["model"]["name"],
            "teacher": self.cfg["teacher"]["name"] if self.distiller.teacher is not None else None,
            "data": self.data.name, "epochs": self.epoch, "steps": self.step,
            "last": {"epoch": last.get("epoch"), "test_top1": last.get("test_top1"), "test_top5": last.get("test_top5")},
            "best": {"epoch": best.get("epoch"), "test_top1": best.get("test_top1"), "test_top5": best.get("test_top5")},
            "teacher_test_top1": self.teacher_top1, "wall_time_s": self.wall_time(), "params": n_params,
            "trainable_params": sum(p.numel() for p in self.params),
            "images_per_s": total_images / total_time if total_time else None,
            "skipped_steps": self.guard.skipped, "device": str(self.rt.device), "runtime": self.rt.describe(),
        }
        if runtime.is_main():
            self.log.write_json("summary.json", summary)
            if self.cfg["output"]["plot"] and self.history:
                plot_curves(self.history, self.run_dir / "curves.png",
                            title=f"{summary['method']}: {summary['model']} on {summary['data']}")
        if last:
            self.log.info(f"done: last test top-1 {last['test_top1']:.2f}% (epoch {last['epoch']}), best "
                          f"{best.get('test_top1', float('nan')):.2f}% (epoch {best.get('epoch')}), "
                          f"{summary['wall_time_s'] / 60:.1f} min; {self.run_dir}")
        return summary


def _epoch_line(row: dict, epochs: int) -> str:
    terms = " ".join(f"{k[len('train_loss_'):]}={v:.3f}" for k, v in row.items()
                     if k.startswith("train_loss_") and v is not None)
    loss = f"loss {row['train_loss']:.4f} ({terms})" if row.get("train_loss") is not None else "loss n/a"
    train_acc = f"train {row['train_top1']:.1f}%" if row.get("train_top1") is not None else ""
    test = (f"test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% (best {row['best_top1']:.2f}%)"
            if row.get("test_top1") is not None else "no eval")
    return (f"epoch {row['epoch']}/{epochs}: {loss} {train_acc} | {test} | lr {row['lr']:.4g} | "
            f"{row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s")


def train(cfg: dict, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the run described by the validated recipe ``cfg``; returns the summary (also in summary.json)."""
    rt = runtime.from_config(cfg["train"])
    created_group = not runtime.is_distributed()
    runtime.init_distributed(rt.device)
    created_group = created_group and runtime.is_distributed()
    try:
        run_dir = run_dir_of(cfg)
        error = None
        if runtime.is_main():
            try:
                prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
            except BlockKDError as e:
                error = str(e)
        error = runtime.broadcast_object(error)
        if error:
            raise BlockKDError(error)
        out = cfg["output"]
        with runtime.reproducibility(bool(cfg["train"]["deterministic"])), \
                RunLogger(run_dir, enabled=runtime.is_main(), tensorboard=out["tensorboard"],
                          progress=out["progress"]) as log:
            if runtime.is_main():
                (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            return Trainer(cfg, run_dir, rt, log, resume=resume).fit()
    finally:
        if created_group:
            torch.distributed.destroy_process_group()
