"""The training loop: ``train(cfg)`` builds a run from a validated :class:`~blockkd.config.Config` and trains it.

Why it looks like this: one ``train_step`` (also what ``benchmarks/speed.py`` times) and one
``evaluate`` serve every method (the distiller hides what differs); metrics are accumulated on the
device and read back only every few steps, so the GPU is never stalled by the bookkeeping; each epoch
ends in an atomic checkpoint (``run_folder``) from which ``resume=True`` continues exactly (data order
from ``set_epoch``, RNG/optimizer/scheduler state from the checkpoint).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from .. import data as data_lib
from .. import methods, models, schema
from .._hooks import debug_log, fault_point
from ..config import Config, dump, flat_keys, validate
from ..config.paths import short
from ..errors import BlockKDError
from ..optim import build_optimizer, build_scheduler
from ..utils import shown
from . import fsdp, run_folder, runtime
from .build import build_distiller
from .checkpoint import saved_tokenizer, teacher_tokenizer
from .evaluation import evaluate, metrics_of
from .guards import NonFiniteGuard, oom_advice
from .lm_eval import write_samples
from .logger import RunLogger, quiet_libraries
from .plots import plot_curves
from .precise_bn import recompute_bn
from .runtime import Runtime


def train_step(model: nn.Module, x: Any, y: torch.Tensor, *, epoch: float, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, rt: Runtime, grad_clip: float | None = None,
               params: list[nn.Parameter] | None = None, index: torch.Tensor | None = None,
               x_strong: torch.Tensor | None = None,
               proceed: Callable[[dict[str, torch.Tensor]], bool] | None = None,
               proceed_grads: Callable[[torch.Tensor], bool] | None = None):
    """One optimizer step: forward under autocast, the sum of the method's losses, (scaled) backward,
    optional gradient clipping, optimizer step. Returns ``(logits, losses, stepped)``; ``proceed(losses)``
    may veto the update (a non-finite loss in ``skip`` mode), and so may ``proceed_grads(finite)``, given
    whether every gradient is finite (a 0-dim bool tensor on the device) when no fp16 loss scaler is on:
    a finite loss can still backpropagate NaN (a singular value decomposition of a rank-deficient map, a
    square root at 0), and the scaler's own inf check covers only fp16. ``index``: each sample's index in the
    training split, for the methods that keep per-sample state (``needs_index``: CRD's memory bank).
    ``x_strong``: a second, strongly augmented view of the batch, for the methods that declare
    ``needs_strong_view`` (MLKD).
    An optimizer with ``needs_loss_split`` (DOT) gets the task and the distillation gradients apart
    (:func:`backward_split`)."""
    split = getattr(optimizer, "needs_loss_split", False)
    params = params if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
    # DDP all-reduces in one backward per forward; DOT's two run outside its sync and are averaged here.
    with ddp_of(model).no_sync() if split and runtime.is_distributed() else contextlib.nullcontext():
        with rt.autocast():
            extra = {} if index is None else {"index": index}
            if x_strong is not None:
                extra["x_strong"] = rt.prepare(x_strong)
            logits, losses = model(rt.prepare(x), y, epoch=epoch, **extra)
        optimizer.zero_grad(set_to_none=True)
        if proceed is not None and not proceed(losses):
            return logits, losses, False
        check = proceed_grads is not None and not scaler.is_enabled()
        if split:
            distill_finite = backward_split(model, losses, optimizer, scaler, grad_clip, params if check else None,
                                            average=lambda: runtime.average_grads(params))
        else:
            scaler.scale(sum(losses.values())).backward()
            distill_finite = None
    if check:
        finite = grads_finite(params)
        if not proceed_grads(finite if distill_finite is None else finite & distill_finite):
            optimizer.zero_grad(set_to_none=True)
            return logits, losses, False
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return logits, losses, True


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch's correct predictions, counted in samples: a classifier's (argmax of ``(B, C)`` logits vs ``(B,)``
    labels); a language-model method returns its predicted tokens ``(B, L)`` instead of logits (methods/lm.py),
    and each sample counts its share of correct tokens among those labelled (label != -100)."""
    if logits.shape != y.shape:
        return (logits.argmax(1) == y).sum()
    counted = (y != -100).sum(1).clamp_min(1)
    return ((logits == y).sum(1) / counted).sum()


def grads_finite(params: list[nn.Parameter]) -> torch.Tensor:
    """Whether every gradient of ``params`` is finite, as a 0-dim bool tensor on their device (no host sync):
    the norms' sum is finite exactly when each norm is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool)
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]  # FSDP: this rank's shards
    finite = torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(local)]).sum())
    if len(local) and hasattr(grads[0], "to_local") and runtime.is_distributed():  # every rank decides alike
        finite = runtime.all_reduce_sum((~finite).float()) == 0
    return finite


def backward_split(model: nn.Module, losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, grad_clip: float | None = None,
                   check: list[nn.Parameter] | None = None,
                   average: Callable[[], None] | None = None) -> torch.Tensor | None:
    """Two backward passes: the distillation terms' (their gradients then handed to
    ``optimizer.stash_distill_grads()``), then the task terms' into ``.grad``. Returns whether the
    distillation gradients of ``check`` were finite (None without ``check``). The task terms are the losses
    named in the method's ``task_losses``; the rest are the distillation terms. ``average()``, under DDP,
    averages each pass's gradients over the ranks before they are used. fp16 loss scaling and
    gradient clipping are refused: the scaler would unscale and check only the task gradients, and clipping
    one of the two is not clipping their sum (bf16 autocast needs no scaler and works)."""
    if scaler.is_enabled() or grad_clip:
        raise BlockKDError(f"{type(optimizer).__name__} takes the task and distillation gradients apart: it does not "
                           f"work with fp16 loss scaling or train.grad_clip; use train.amp bf16 or off, grad_clip null")
    names = task_losses_of(model)
    if not any(k in names for k in losses):
        raise BlockKDError(f"{type(optimizer).__name__} needs the method's task loss, one of {list(names)} "
                           f"(its task_losses), among its losses {list(losses)}")
    task = [v for k, v in losses.items() if k in names and v.requires_grad]
    distill = [v for k, v in losses.items() if k not in names and v.requires_grad]
    if distill:
        sum(distill).backward(retain_graph=bool(task))
    if average is not None:
        average()  # every rank runs both passes (with or without terms), so the collectives match
    finite = grads_finite(check) if check is not None else None
    optimizer.stash_distill_grads()
    if task:
        sum(task).backward()
    if average is not None:
        average()
    return finite


def layers(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` and the modules it wraps, outermost first: through DDP (``.module``) and torch.compile
    (``._orig_mod``) down to the distiller. ``_orig_mod`` first: a compiled module forwards unknown
    attributes to the one it wraps, so its ``.module`` would skip a DDP wrapper inside it."""
    while isinstance(model, nn.Module):
        yield model
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)


def ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel:
    """The DDP wrapper of ``model``, itself or under a torch.compile wrapper."""
    return next(m for m in layers(model) if isinstance(m, nn.parallel.DistributedDataParallel))


def extra_inference_params(distiller) -> int:
    """Parameters the deployed model uses beyond the student's own (SimKD: its projector and the teacher's head)."""
    own = {id(p) for p in distiller.student.parameters()}
    return sum(p.numel() for p in distiller.deployed_model().parameters() if id(p) not in own)


def task_losses_of(model: nn.Module) -> tuple[str, ...]:
    """The distiller's ``task_losses`` through its wrappers (CE's name for a model that declares none)."""
    return next((tuple(m.task_losses) for m in layers(model) if hasattr(m, "task_losses")), ("loss_ce",))


class Trainer:
    """One run: the distiller, its optimizer and schedule, the data, and the run's progress state."""

    def __init__(self, cfg: Config, folder: run_folder.RunFolder, rt: Runtime, log: RunLogger, *, resume: bool):
        self.cfg, self.folder, self.run_dir, self.rt, self.log = cfg, folder, folder.path, rt, log
        self.started = time.perf_counter()
        tcfg = cfg.train
        runtime.seed_everything(tcfg.seed)
        self.data, self.tokenizer_json = self.build_data(resume)
        sync_bn = tcfg.sync_bn and runtime.is_distributed()
        if sync_bn and rt.device.type != "cuda":
            raise BlockKDError(f"train.sync_bn needs CUDA devices (this run uses {rt.device}); set it to false")
        self.distiller = build_distiller(cfg, self.data, rt.device, sync_bn=sync_bn)
        if rt.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        # Methods with per-sample state (CRD's memory bank) get each sample's index with its batch.
        self.data.train.with_index = bool(getattr(self.distiller, "needs_index", False))
        # Methods that compare a second, strongly augmented view (MLKD) get it with each batch, as its last item.
        self.strong_view = bool(getattr(self.distiller, "needs_strong_view", False))
        if self.strong_view and not hasattr(self.data.train, "strong_view"):
            raise BlockKDError(f"method {cfg.method.name!r} needs a strongly augmented second view of each image; "
                               f"data.name={cfg.data.name!r} does not make one (image datasets and imagefolder do)")
        if self.strong_view:
            self.data.train.strong_view = True
        self.model: nn.Module = self.distiller  # what the training step calls: maybe DDP- and compile-wrapped
        if runtime.is_distributed():
            if tcfg.fsdp:  # sharded in place: the distiller itself is the root FSDP unit
                fsdp.shard(self.distiller, rt.amp_dtype)
            else:
                self.model = runtime.wrap_ddp(self.model, rt.device)
        self.fsdp = bool(tcfg.fsdp and runtime.is_distributed())
        if tcfg.compile:
            self.model = torch.compile(self.model)

        self.params = list(self.distiller.trainable_parameters())
        self.optimizer = build_optimizer(self.params, cfg.optim)
        if getattr(self.optimizer, "needs_loss_split", False) and rt.fp16:
            raise BlockKDError(f"optim.name={cfg.optim.name!r} runs two backward passes per step, one per gradient; "
                               f"fp16 loss scaling does not support that: use train.amp bf16 or off "
                               f"(this run: {rt.describe()})")
        # the class names in label order, recorded in meta.json, summary.json and hf/ (index strings if unnamed)
        # Class names for meta.json, summary.json and hf/'s id2label; a causal LM's "classes" are its vocabulary,
        # which the saved tokenizer already holds.
        self.classes = [] if getattr(self.data, "task", None) == "causal_lm" else \
            [str(c) for c in self.data.classes or range(self.data.num_classes)]
        self.steps_per_epoch = len(self.data.train)
        self.epochs = tcfg.epochs
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, steps_per_epoch=self.steps_per_epoch,
                                         epochs=self.epochs)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.fp16)
        self.guard = NonFiniteGuard(tcfg.nonfinite, rt.device)
        self.max_steps, self.grad_clip = tcfg.max_steps, tcfg.grad_clip

        self.epoch, self.step, self.history = 0, 0, []
        self.best_top1, self.best_epoch, self.wall_before = -1.0, None, 0.0
        self.teacher_top1: float | None = None
        self.loss_names: list[str] | None = None
        if resume:
            self.restore()
        # The checkpoint's last step (logged as step self.step) is kept; the resumed run logs from the next one.
        log.open_tensorboard(purge_step=self.step + 1 if resume else None)

    # -- state ---------------------------------------------------------------------------------------
    def build_data(self, resume: bool) -> tuple[data_lib.DataBundle, bytes | None]:
        """This rank's data, and the tokenizer.json of a tokenizer trained on the training text (None for other
        data), which goes into every checkpoint (engine/checkpoint.py: TOKENIZER). Under DDP such a tokenizer
        is trained by rank 0 alone and sent to the others: trained twice, it need not give the same ids."""
        cfg, rank = self.cfg, runtime.rank()
        build = functools.partial(data_lib.build, cfg.data, device=self.rt.device, rank=rank,
                                  world_size=runtime.world_size(), seed=cfg.train.seed)
        section = cfg.data.flat()
        if section.get("tokenizer") not in data_lib.TRAINED_TOKENIZERS:
            return build(), None
        file = self.trained_tokenizer(resume, section)
        source = "file" if file is not None else "trained or cached"
        if file is None and runtime.is_distributed():
            data = build() if rank == 0 else None
            trained = runtime.broadcast_object(data.tokenizer.backend_tokenizer.to_str() if rank == 0 else None)
            if rank != 0:
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "tokenizer.json").write_text(trained, encoding="utf-8")
                    data, source = build(tokenizer_file=Path(tmp) / "tokenizer.json"), "rank 0"
        else:
            data = build(tokenizer_file=file)
        tokenizer_json = data.tokenizer.backend_tokenizer.to_str().encode()
        debug_log(rank, lambda: {"tokenizer_sha256": hashlib.sha256(tokenizer_json).hexdigest(),
                                 "tokenizer_source": source})
        return data, tokenizer_json

    def trained_tokenizer(self, resume: bool, data: dict[str, Any]) -> Path | None:
        """The tokenizer.json to use for the tokenizer that the data section ``data`` (flat) trains (wordpiece,
        bpe, bytebpe): the run's own, resumed; else the teacher's, trained with the same settings, which its
        logits were learned with; None: train it (or read the cache)."""
        file = (saved_tokenizer(self.run_dir) if resume else None) or \
            teacher_tokenizer(self.cfg.teacher.checkpoint, data)
        if file is not None:
            self.log.info(f"data.tokenizer={data['tokenizer']}: the trained tokenizer {shown(file)}")
        return file

    def restore(self) -> None:
        ckpt = self.folder.resumable()
        if ckpt is None:
            self.log.warning(f"nothing to resume in {self.run_dir} (no checkpoint yet); starting from scratch")
            return
        meta, state = ckpt.meta, ckpt.state
        saved, now = flat_keys(meta["config"]), flat_keys(self.cfg.to_dict())
        shown = {k: f"{k}={json.dumps(v)}" for k, v in now.items() if not k.startswith("output.")}  # as overrides
        changed = ", ".join(s for k, s in shown.items() if k in saved and saved[k] != now[k])
        # Keys the run's saved config lacks were added to blockkd since; today's defaults fill them in,
        # which may not be what the run was trained with (e.g. blockkd-lite's num_stones).
        unrecorded = ", ".join(s for k, s in shown.items() if k not in saved and now[k] != {})  # {}: sets nothing
        self.refuse_removed_options(saved, meta["config"])
        if changed:
            self.log.warning(f"resuming with changed settings: {changed}")
        if unrecorded:
            self.log.warning(f"resuming a run whose saved config predates these settings (today's defaults "
                             f"apply): {unrecorded}")
        try:
            self.distiller.load_train_state_dict(fsdp.shard_like(self.distiller, ckpt.weights) if self.fsdp
                                                 else ckpt.weights)
        except BlockKDError as e:
            if not unrecorded:
                raise
            raise BlockKDError(f"{e}; the run's saved config predates {unrecorded}: pass the values it was "
                               f"trained with as key=value overrides") from None
        if self.fsdp:
            fsdp.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.apply_schedule(meta["config"]["train"].get("epochs"))
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
        self.folder.repair_best(self.best_epoch, ckpt.path)

    def apply_schedule(self, saved_epochs: int | None) -> None:
        """The lr of the resumed step from today's schedule. The rule: the lr of every step is the recipe's
        schedule at that step, for the recipe's train.epochs; resumed with more (or fewer) epochs, the run
        goes on from where a run planned with the new train.epochs would be at this step (the saved optimizer
        holds the old schedule's lr, e.g. 0 at the end of a finished cosine decay)."""
        sched = self.scheduler
        lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs  # what get_last_lr() reports
        if saved_epochs is not None and saved_epochs != self.epochs:
            self.log.info(f"train.epochs {saved_epochs} -> {self.epochs}: the lr schedule is now that of a "
                          f"{self.epochs}-epoch run; from step {self.step} lr {lrs[0]:.4g}")

    def refuse_removed_options(self, saved: dict[str, Any], saved_cfg: dict[str, Any]) -> None:
        """One line where the run was trained with a method option since removed, at a value whose behaviour
        is gone (a value that trains as today's code does, e.g. the former default, resumes silently)."""
        name = saved_cfg.get("method", {}).get("name")
        if name not in methods.names():
            return
        cls = methods.get(name).Options
        for key, (why, same) in schema.removed_options(cls).items():
            flat = f"method.options.{key}"
            if flat not in saved or same is None:
                continue
            if not (same(saved[flat], self.cfg) if callable(same) else saved[flat] in same):
                raise BlockKDError(f"this run was trained with {flat}={json.dumps(saved[flat])}, removed in blockkd "
                                   f"{cls.removed_in} ({why}: see docs/blockkd.md); resume it with the blockkd "
                                   f"that started it, or start a new run")

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def save(self, is_best: bool) -> None:
        meta = {"config": self.cfg.to_dict(), "classes": self.classes, "epoch": self.epoch, "step": self.step,
                "history": self.history, "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "wall_time_s": self.wall_time(),
                "skipped_steps": self.guard.skipped, "rng": runtime.rng_state()}
        optimizer = fsdp.optimizer_state(self.optimizer) if self.fsdp else self.optimizer.state_dict()
        state = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        self.folder.save(weights=self.train_state(), meta=meta, state=state, is_best=is_best,
                         tokenizer=self.tokenizer_json)

    def train_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the distiller's trained tensors, full (gathered on every rank) under FSDP."""
        state = self.distiller.train_state_dict()
        return fsdp.full_state(self.distiller, state) if self.fsdp else state

    # -- loop ----------------------------------------------------------------------------------------
    def step_once(self, x: Any, y: torch.Tensor, epoch: int, i: int, index: torch.Tensor | None = None,
                  x_strong: torch.Tensor | None = None) -> torch.Tensor | None:
        """One optimizer step on batch ``i`` of ``epoch``; returns ``[each loss term * n, correct]`` on the
        device (no host sync), or None when the step was skipped for a non-finite loss."""
        terms: list[torch.Tensor] = []

        def proceed(losses: dict[str, torch.Tensor]) -> bool:
            if self.loss_names is None:
                self.loss_names = list(losses)
            terms.append(torch.stack([v.detach().float() for v in losses.values()]))
            return self.guard.ok(terms[0], self.loss_names, epoch, i, self.log)

        logits, _, stepped = train_step(self.model, x, y, epoch=epoch + (i + 1) / self.steps_per_epoch,
                                        optimizer=self.optimizer, scaler=self.scaler, rt=self.rt,
                                        grad_clip=self.grad_clip, params=self.params, index=index, x_strong=x_strong,
                                        proceed=proceed,
                                        proceed_grads=lambda finite: self.guard.grads_ok(finite, epoch, i, self.log))
        if not stepped:
            return None
        return torch.cat([terms[0] * y.shape[0], correct(logits, y).float()[None]])

    def diagnostics(self, x: torch.Tensor, y: torch.Tensor, epoch: float, sums: dict[str, list[float]]) -> None:
        """The method's own training diagnostics (e.g. Block-KD's per-stone gradient norms): to TensorBoard
        at this step, and into ``sums`` (name -> [total, count]) for the epoch's mean in the metrics files."""
        with self.rt.autocast():
            values = self.distiller.diagnostics(self.rt.prepare(x), y, epoch=epoch)
        if values:
            values = {k: float(v) for k, v in values.items()}
            self.log.scalars("diagnostics", values, self.step)
            for k, v in values.items():
                total = sums.setdefault(k, [0.0, 0])
                total[0] += v
                total[1] += 1

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's averaged training metrics.

        Sums live on the device; they are read back (and the non-finite guard checked, the progress bar
        and TensorBoard updated) only every ``sync_every`` steps and at the end.
        """
        self.model.train()
        self.guard.start_epoch()
        steps = self.steps_per_epoch
        sync_every = max(1, min(50, steps // 10))
        every = self.cfg.train.diagnostics_every  # null: once, at the epoch's last step; 0: never
        diag_at = (lambda i: i + 1 == steps) if every is None else (lambda i: every > 0 and (i + 1) % every == 0)
        lr = self.optimizer.param_groups[0]["lr"]
        acc: torch.Tensor | None = None  # running [sum of each loss term * n ..., correct]
        seen, synced, synced_seen = 0, None, 0
        diag: dict[str, list[float]] = {}
        start = time.perf_counter()
        with self.log.bar(steps, f"epoch {epoch + 1}/{self.epochs}") as bar:
            for i, (x, y, *extra) in enumerate(self.data.train):
                if self.out_of_steps():
                    break
                fault_point("step", step=self.step)
                try:
                    x_strong = extra.pop() if self.strong_view else None  # the second view comes last
                    stats = self.step_once(x, y, epoch, i, *extra, x_strong=x_strong)
                except (RuntimeError, ValueError) as e:  # e.g. an SVD of weights that an earlier NaN step corrupted
                    self.guard.raise_recorded(self.loss_names or [], epoch, cause=e)
                    raise
                if stats is not None:
                    acc = stats if acc is None else acc + stats
                    seen += y.shape[0]
                self.scheduler.step()  # the schedule follows batches, skipped or not, to stay aligned with epochs
                self.step += 1
                bar.update(1)
                if diag_at(i) and runtime.is_main():
                    self.diagnostics(x, y, epoch + (i + 1) / steps, diag)
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
                **{f"train_{k}": total / count for k, (total, count) in diag.items()},
                "images_per_s": n / max(seconds, 1e-9), "train_time_s": seconds}

    def evaluate_teacher(self) -> None:
        """Check the teacher before spending hours distilling from it: a wrong checkpoint is near chance."""
        teacher = self.distiller.teacher
        if teacher is None:
            return
        res = evaluate(teacher, self.data.test, self.rt, progress=self.log.progress)
        self.teacher_top1 = res["top1"]
        name = self.cfg.teacher.name
        self.log.info(f"teacher {name}: test top-1 {res['top1']:.1f}% (top-5 {res['top5']:.1f}%)")
        chance = 100.0 / self.data.num_classes
        if res["top1"] <= 1.5 * chance and not self.cfg.teacher.allow_random:
            self.log.warning(f"THE TEACHER IS AT CHANCE LEVEL: {name} scores {res['top1']:.1f}% top-1 on "
                             f"{self.data.name} (chance {chance:.1f}%); check teacher.checkpoint "
                             f"({self.cfg.teacher.checkpoint}) and the data")

    def fit(self) -> dict[str, Any]:
        cfg, log = self.cfg, self.log
        n_params = models.num_params(self.distiller.student)
        teacher = f", teacher {short(cfg.teacher.name)}" if self.distiller.teacher is not None else ""
        log.info(f"run {self.run_dir}: method {cfg.method.name}, student {short(cfg.model.name)} "
                 f"({n_params / 1e6:.2f}M params){teacher}; {self.data.name}: {self.data.train_size} train / "
                 f"{self.data.test_size} test {_unit(self.data)}, {self.steps_per_epoch} steps/epoch; "
                 f"{self.rt.describe()}")
        try:
            self.epochs_loop()
        except KeyboardInterrupt:
            self.log.warning(f"interrupted in epoch {self.epoch + 1}; {self.folder.saved_note()}")
            raise
        if hasattr(self.distiller.student, "save_pretrained"):  # Hugging Face models: loadable by transformers
            spec = self.data.input_shape
            length = spec["input_ids"][0] if isinstance(spec, dict) and "input_ids" in spec else None
            with quiet_libraries(not self.log.shows_bars()):
                self.folder.save_pretrained(self.distiller.student, self.data.tokenizer, classes=self.classes,
                                            max_length=length,
                                            state_dict=fsdp.full_state(self.distiller.student) if self.fsdp else None)
        if getattr(self.data, "task", None) == "causal_lm":  # a few continuations of test prompts: samples.md
            write_samples(self.distiller.student, self.data.tokenizer, self.data.test, self.run_dir / "samples.md",
                          seed=self.cfg.train.seed)
        return self.finish(n_params)

    def epochs_loop(self) -> None:
        cfg, log = self.cfg, self.log
        train_oom = functools.partial(oom_advice, "data.batch_size", cfg.data.batch_size)
        eval_oom = functools.partial(oom_advice, "data.eval_batch_size", cfg.data.eval_batch_size)
        with eval_oom():
            self.evaluate_teacher()
        epoch_times: list[float] = []  # this process's epochs: the run's ETA
        while self.epoch < self.epochs and not self.out_of_steps():
            epoch = self.epoch
            epoch_start = time.perf_counter()
            self.data.set_epoch(epoch)
            with train_oom():
                trained = self.run_epoch(epoch)
            last = epoch + 1 == self.epochs or self.out_of_steps()
            evaluating = (epoch + 1) % cfg.train.eval_every == 0 or last
            if evaluating and cfg.train.precise_bn:
                with train_oom():
                    recompute_bn(self.distiller, self.data.train, cfg.train.precise_bn, self.rt)
            self.sync_buffers()
            with eval_oom():
                test = evaluate(self.distiller, self.data.test, self.rt, heads=True, metrics=metrics_of(self.data),
                                progress=self.log.progress) if evaluating else {}
            if test and test["top1"] > self.best_top1:
                self.best_top1, self.best_epoch = test["top1"], epoch + 1
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": self.step, "lr": trained.pop("lr"), "train_loss": trained.pop("train_loss"),
                **{k: trained.pop(k) for k in list(trained) if k.startswith(("train_loss_", "train_grad_norm_"))},
                "train_top1": trained.pop("train_top1"), "test_top1": test.get("top1"), "test_top5": test.get("top5"),
                "test_loss": test.get("loss"), **{f"test_{k}": test.get(k) for k in self.data.metric_names},
                **{f"test_{k}": v for k, v in test.items() if k.startswith("top1_")},
                "best_top1": self.best_top1 if self.best_epoch else None,
                "best_epoch": self.best_epoch, "images_per_s": trained.pop("images_per_s"),
                "train_time_s": trained.pop("train_time_s"), "epoch_time_s": time.perf_counter() - epoch_start,
                "skipped_steps": self.guard.skipped}
            self.history.append(row)
            epoch_times.append(row["epoch_time_s"])
            self.epoch = epoch + 1
            with runtime.defer_sigint():  # Ctrl-C waits until last/, best/ and the metrics files agree
                self.save(is_best=self.best_epoch == epoch + 1)
                log.metrics(self.history)
            log.scalars("epoch", {k: v for k, v in row.items() if k not in ("epoch", "step")}, self.epoch)
            log.info(_epoch_line(row, self.epochs) + self.eta(epoch_times))

    def sync_buffers(self) -> None:
        """Rank 0's trained buffers (BN running statistics) on every rank, before evaluating and saving
        (see ``runtime.wrap_ddp``); with ``$BLOCKKD_DEBUG_LOG`` each rank then logs a digest of its weights."""
        trained = self.distiller.train_state_dict()
        runtime.broadcast_tensors([b for n, b in self.distiller.named_buffers() if n in trained])
        debug_log(runtime.rank(), lambda: {"epoch": self.epoch + 1, "step": self.step,
                                           "weights_sha256": runtime.state_digest(self.train_state())})

    def eta(self, epoch_times: list[float]) -> str:
        """``, run ETA 1:02:03`` (the mean epoch time so far times the epochs left), or nothing at the end."""
        left = self.epochs - self.epoch
        if self.max_steps is not None:
            left = min(left, -(-(self.max_steps - self.step) // self.steps_per_epoch))
        if left <= 0 or not epoch_times:
            return ""
        seconds = round(left * sum(epoch_times) / len(epoch_times))
        return f", run ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} ({left} epochs left)"

    def out_of_steps(self) -> bool:
        return self.max_steps is not None and self.step >= self.max_steps

    def finish(self, n_params: int) -> dict[str, Any]:
        evaluated = [r for r in self.history if r.get("test_top1") is not None]
        last = evaluated[-1] if evaluated else {}
        best = next((r for r in evaluated if r["epoch"] == self.best_epoch), {})
        total_images = sum(r["images_per_s"] * r["train_time_s"] for r in self.history)
        total_time = sum(r["train_time_s"] for r in self.history)
        summary = {
            "run_dir": str(self.run_dir), "method": self.cfg.method.name, "model": short(self.cfg.model.name),
            "teacher": short(self.cfg.teacher.name) if self.distiller.teacher is not None else None,
            "data": self.data.name, "classes": self.classes, "epochs": self.epoch, "steps": self.step,
            "last": {"epoch": last.get("epoch"), "test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"),
                     **{f"test_{k}": last.get(f"test_{k}") for k in self.data.metric_names},
                     **{k: v for k, v in last.items() if k.startswith("test_top1_")}},
            "best": {"epoch": best.get("epoch"), "test_top1": best.get("test_top1"), "test_top5": best.get("test_top5"),
                     **{f"test_{k}": best.get(f"test_{k}") for k in self.data.metric_names}},
            "teacher_test_top1": self.teacher_top1, "wall_time_s": self.wall_time(), "params": n_params,
            "extra_inference_params": extra_inference_params(self.distiller),
            "trainable_params": sum(p.numel() for p in self.params),
            "images_per_s": total_images / total_time if total_time else None,
            "skipped_steps": self.guard.skipped, "device": str(self.rt.device), "runtime": self.rt.describe(),
        }
        if runtime.is_main():
            self.log.write_json("summary.json", summary)
            if self.cfg.output.plot and self.history:
                plot_curves(self.history, self.run_dir / "curves.png",
                            title=f"{summary['method']}: {summary['model']} on {summary['data']}")
        if last:
            self.log.info(f"done: last test top-1 {last['test_top1']:.2f}% (epoch {last['epoch']}), best "
                          f"{best.get('test_top1', float('nan')):.2f}% (epoch {best.get('epoch')}), "
                          f"{summary['wall_time_s'] / 60:.1f} min; {self.run_dir}")
        return summary


def _unit(data) -> str:
    """What the data's examples are, for the log lines."""
    return "sequences" if getattr(data, "task", None) == "causal_lm" else "examples" if getattr(
        data, "tokenizer", None) is not None else "images"


def _epoch_line(row: dict, epochs: int) -> str:
    terms = " ".join(f"{k[len('train_loss_'):]}={v:.3f}" for k, v in row.items()
                     if k.startswith("train_loss_") and v is not None)
    loss = f"loss {row['train_loss']:.4f} ({terms})" if row.get("train_loss") is not None else "loss n/a"
    train_acc = f"train {row['train_top1']:.1f}%" if row.get("train_top1") is not None else ""
    test = (f"test top-1 {row['test_top1']:.2f}% top-5 {row['test_top5']:.2f}% (best {row['best_top1']:.2f}%)"
            if row.get("test_top1") is not None else "no eval")
    if row.get("test_perplexity") is not None:  # language models: top-1 is the token accuracy
        test += f" perplexity {row['test_perplexity']:.2f}"
    return (f"epoch {row['epoch']}/{epochs}: {loss} {train_acc} | {test} | lr {row['lr']:.4g} | "
            f"{row['images_per_s']:.0f} img/s, {row['epoch_time_s']:.1f}s")


def train(cfg: Config | dict, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train the run described by the recipe ``cfg`` (a :class:`Config`, or a nested mapping validated
    here); returns the summary (also in summary.json)."""
    if resume and overwrite:  # deleting the checkpoint, then finding nothing to resume, helps no one
        raise BlockKDError("--resume continues a run from its checkpoint and --overwrite deletes it: pass one of them")
    cfg = validate(cfg)
    t = cfg.train
    rt = runtime.resolve(t.device, t.amp, t.channels_last)
    created_group = not runtime.is_distributed()
    runtime.init_distributed(rt.device)
    created_group = created_group and runtime.is_distributed()
    lock = None  # rank 0 owns the run folder (run_folder.RunLock) until the run ends, however it ends
    try:
        run_dir = Path(cfg.output.dir).expanduser() / cfg.output.name
        error = None
        if runtime.is_main():
            try:
                lock = run_folder.prepare(run_dir, resume=resume, overwrite=overwrite)
            except BlockKDError as e:
                error = str(e)
        error = runtime.broadcast_object(error)
        if error:
            raise BlockKDError(error)
        out = cfg.output
        with runtime.reproducibility(t.deterministic), \
                RunLogger(run_dir, enabled=runtime.is_main(), tensorboard=out.tensorboard,
                          progress=out.progress) as log:
            if lock is not None and lock.stale:
                log.warning(f"the run folder's last owner ({run_folder.describe_holder(lock.stale)}) ended without "
                            f"releasing it (killed?); taking over")
            folder = run_folder.RunFolder(run_dir, log.warning)
            folder.write_config(dump(cfg))
            return Trainer(cfg, folder, rt, log, resume=resume).fit()
    finally:
        if lock is not None:
            lock.release()
        if created_group:
            runtime.close_distributed()
