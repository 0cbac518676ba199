"""The recipe's sections, each declared once as a typed dataclass (see :mod:`blockkd.schema`).

Why here and not spread over the engine: a recipe is checked whole at load time, before any data,
model or teacher is touched, and ``docs/config.md`` is generated from these declarations. The
``data``, ``optim`` and ``schedule`` sections are declared beside what they choose (``blockkd.data``,
``blockkd.optim``): their ``name`` picks an entry whose own keys sit flat beside the common ones.
"""
from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from typing import Any

import torch

from ..schema import BOOL, STRING, Check, REQUIRED, choice, integer, number, option, optional

AMP = Check("one of auto, off, bf16, fp16", lambda v: v is False or v in ("auto", "off", "bf16", "fp16"),
            lambda v: "off" if v is False else v, ("auto", "off", "bf16", "fp16"))  # YAML 1.1 reads `off` as false


def _is_device(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, ValueError):
        return False
    return True


DEVICE = Check("'auto' or a torch device such as cpu, cuda, cuda:1", _is_device)


KWARGS = Check("a mapping of keyword arguments (names to values)",
               lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and k for k in v)),
               lambda v: dict(v or {}))
KWARGS_HELP = ("keyword arguments of a torchvision.* or timm.* model's constructor, e.g. {img_size: 32, "
               "patch_size: 4} for a timm ViT on 32-px images")


def _inside(v: Any) -> bool:
    """A run folder name stays inside output.dir: relative, no '..', not empty (sub-folders are fine)."""
    parts = PurePosixPath(v).parts if isinstance(v, str) and not v.startswith("~") and "\0" not in v else ()
    return bool(parts) and parts[0] != "/" and ".." not in parts


RUN_NAME = Check("a folder name inside output.dir (not absolute, no '..')", _inside)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    name: str = option(REQUIRED, STRING, "the student (for ce: the model trained): a blockkd.models name, "
                       "torchvision.<name>, timm.<name>, hf.<hub id or folder> or hf-config.<config.json>")
    checkpoint: str | None = option(None, optional(STRING), "initial weights for the student")
    kwargs: dict = option({}, KWARGS, KWARGS_HELP)


@dataclasses.dataclass(frozen=True)
class TeacherSection:
    name: str | None = option(None, optional(STRING), "teacher model name (every method but ce)")
    checkpoint: str | None = option(None, optional(STRING), "our run folder, .safetensors, a RepDistiller/"
                                    "mdistiller or torchvision .pth, torchvision://IMAGENET1K_V1 or timm://DEFAULT")
    allow_random: bool = option(False, BOOL, "tests only: distill from an untrained teacher")
    cache: str | None = option(None, optional(STRING), "language models: a folder of the teacher's top-k logits "
                               "(blockkd cache-logits RECIPE) read instead of running the teacher (lm-kd)")
    kwargs: dict = option({}, KWARGS, "the teacher's constructor arguments, as model.kwargs")


@dataclasses.dataclass(frozen=True)
class MethodSection:
    name: str = option("ce", STRING, "distillation method: a blockkd.methods name (blockkd methods)")
    options: Any = None  # the method's own Options instance (method.options.<key> in YAML)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: str = option("sgd", STRING, "optimizer: sgd, adamw, adam, ... (torch.optim's, by name) or dot "
                       "(DOT); its keyword arguments sit beside lr")
    lr: float = option(0.05, number(0, strict=True), "base learning rate for the global batch")
    weight_decay: float = option(5.0e-4, number(0), "weight decay")
    options: Any = None


@dataclasses.dataclass(frozen=True)
class ScheduleSection:
    name: str = option("multistep", STRING, "lr schedule: multistep, cosine, linear, constant")
    warmup_epochs: float = option(0.0, number(0), "linear lr warm-up from 0, per step, before the schedule")
    options: Any = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    epochs: int = option(240, integer(1), "number of epochs")
    seed: int = option(0, integer(0), "seed of every RNG")
    deterministic: bool = option(False, BOOL, "deterministic algorithms (exact resume)")
    device: str = option("auto", DEVICE, "auto, cpu, cuda, cuda:1 ...")
    amp: str = option("auto", AMP, "mixed precision: auto (bf16 on CUDA when supported), off, bf16, fp16")
    channels_last: Any = option("auto", choice("auto", True, False),
                                "channels-last memory format (auto: on CUDA and CPU, where it measured 1.1–1.55×"
                                " faster)")
    compile: bool = option(False, BOOL, "torch.compile the training forward")
    grad_clip: float | None = option(None, optional(number(0, strict=True)), "max gradient norm (null: off)")
    nonfinite: str = option("stop", choice("stop", "skip"),
                            "a NaN/Inf loss or gradient: stop the run, or skip the step")
    eval_every: int = option(1, integer(1), "epochs between evaluations (the last epoch is always evaluated)")
    precise_bn: int = option(0, integer(0), "training batches whose BN statistics, under the epoch's final weights, "
                             "replace the running averages before each evaluation (0: off; engine/precise_bn.py)")
    sync_bn: bool = option(False, BOOL, "SyncBatchNorm under DDP (CUDA)")
    fsdp: bool = option(False, BOOL, "under torchrun: shard the student and the teacher with FSDP2 instead of DDP "
                        "(causal LMs, the lm-* methods; docs/lm.md)")
    max_steps: int | None = option(None, optional(integer(1)), "stop after this many optimizer steps")
    diagnostics_every: int | None = option(None, optional(integer(0)), "steps between the method's diagnostics "
                                           "(Block-KD: the gradient norm each stone sends into the student), in "
                                           "TensorBoard and, as epoch means, the metrics; null: once per epoch, 0: off")


@dataclasses.dataclass(frozen=True)
class OutputSection:
    dir: str = option("runs", STRING, "parent folder of run folders")
    name: str | None = option(None, optional(RUN_NAME), "run folder name inside dir (null: "
                              "dataset-teacher-model-method[-seedN])")
    tensorboard: bool = option(True, BOOL, "TensorBoard event files")
    progress: bool = option(True, BOOL, "live progress bar")
    plot: bool = option(True, BOOL, "PNG of the curves at the end")
