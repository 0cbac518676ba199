"""Models of a run: the student and the teacher, built for the data and loaded from their checkpoints.

Why here: a teacher checkpoint can be one of our run folders, a ``.safetensors`` file, or a foreign
``.pth`` from RepDistiller/mdistiller; a mismatch with the data (class count, input channels) must be a
one-line error naming both sides, before any training starts.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .. import methods, models
from ..config.paths import same_path_name, short
from ..data.lm_cache import open_cache
from ..models.external import create_causal_lm
from ..utils import shown
from ..errors import BlockKDError
from ..schema import OptionError
from .checkpoint import checkpoint_dir, load_checkpoint


def _signature(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> tuple[int | None, int | None]:
    """(classes, input channels) that ``sd`` was trained for: the rows of the model's classifier weight
    (its last 2-D weight) and the in-channels of its first conv, looked up in ``sd`` under the model's keys."""
    mats = [k for k, v in own.items() if v.dim() == 2 and k.endswith("weight")]
    convs = [k for k, v in own.items() if v.dim() == 4]
    classes = sd[mats[-1]].shape[0] if mats and mats[-1] in sd and sd[mats[-1]].dim() == 2 else None
    channels = sd[convs[0]].shape[1] if convs and convs[0] in sd and sd[convs[0]].dim() == 4 else None
    return classes, channels


def check_fits(model: nn.Module, sd: dict[str, torch.Tensor], *, role: str, path: str | Path, data,
               name: str | None = None) -> None:
    """Raise a BlockKDError naming the checkpoint and the data when ``sd`` cannot fit ``model`` (``name``:
    the model's name in the recipe section ``role``)."""
    own = model.state_dict()
    classes, channels = _signature(own, sd)
    want_classes, want_channels = data.num_classes, data.in_channels
    if getattr(data, "task", None) == "causal_lm":  # the LM head's rows are the model's vocabulary, checked below
        classes, want_classes = None, None
    if (classes is not None and classes != want_classes) or (channels is not None and channels != want_channels):
        raise BlockKDError(
            f"{role} checkpoint {path} is for {classes} classes and {channels} input channels, but the data "
            f"({data.name}) has {want_classes} classes and {want_channels} channels")
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            model_name = name or "the model"
            raise BlockKDError(f"{role} checkpoint {path} does not fit {model_name}: {k} has shape "
                               f"{tuple(v.shape)}, {model_name} expects {tuple(own[k].shape)}"
                               + (f" (wrong {role}.name?)" if name else ""))


def load_model_weights(model: nn.Module, path: str | Path, *, role: str, name: str, data) -> nn.Module:
    """Load ``path`` (our run/checkpoint folder, a ``.safetensors``, a foreign ``.pth``, torchvision's
    pretrained weights as ``torchvision://DEFAULT`` or timm's as ``timm://DEFAULT``) into ``model``."""
    if str(path).startswith("torchvision://"):
        sd = models.torchvision_state_dict(name, str(path))
    elif str(path).startswith("timm://"):
        sd = models.timm_state_dict(name, str(path))
    elif not (path := Path(shown(Path(path).expanduser()))).exists():  # named as typed in messages
        raise BlockKDError(f"{role} checkpoint {path} does not exist")
    elif path.is_dir():
        ckpt = load_checkpoint(checkpoint_dir(path), with_state=False)
        trained = ckpt.meta.get("config", {}).get("model", {}).get("name")
        if trained and not same_path_name(trained, name):
            raise BlockKDError(f"{role} checkpoint {ckpt.path} holds a {short(trained)}, but {role}.name is "
                               f"{short(name)}")
        sd = ckpt.student_weights()
    else:  # weights_only / safetensors: no code from the file runs
        sd = models.read_state_dict(path)
        if any(k.startswith("student.") for k in sd):  # one of our weights.safetensors files
            sd = {k[len("student."):]: v for k, v in sd.items() if k.startswith("student.")}
    check_fits(model, sd, role=role, path=path, data=data, name=name)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from old checkpoints
    if missing or unexpected:
        raise BlockKDError(f"{role} checkpoint {path} does not fit {name}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (wrong {role}.name?)")
    return model


def build_model(name: str, data, *, checkpoint: str | None = None, role: str = "model",
                kwargs: dict | None = None) -> nn.Module:
    """``models.create`` for the data's classes and channels (None: text) and the recipe's constructor
    arguments (``model.kwargs``), then ``checkpoint``, if any; a causal LM for next-token data."""
    if getattr(data, "task", None) == "causal_lm":
        if kwargs:
            raise BlockKDError(f"{role}.kwargs applies to torchvision and timm models; {name} is a causal LM built "
                               f"from its own configuration")
        model = create_causal_lm(name)
    else:
        model = models.create(name, num_classes=data.num_classes, in_channels=data.in_channels, **(kwargs or {}))
    if getattr(data, "check_model", None) is not None:  # e.g. text: the tokenizer must fit the embeddings
        data.check_model(model, role=role, name=name)
    if checkpoint:
        load_model_weights(model, checkpoint, role=role, name=name, data=data)
    return model


def build_distiller(cfg, data, device: torch.device, *, sync_bn: bool = False):
    """The recipe's student (and teacher) for the data, wrapped by its method, on ``device``.

    A method option that can only be checked against the models (``num_blocks`` larger than the
    networks' stages, say) fails here with one line naming the key and the file that set it.
    """
    lm_data, lm_method = getattr(data, "task", None) == "causal_lm", getattr(methods.get(cfg.method.name), "task", None)
    if lm_data != (lm_method == "causal_lm"):
        lm = ", ".join(m for m in methods.names() if getattr(methods.get(m), "task", None) == "causal_lm")
        raise BlockKDError(f"method {cfg.method.name} does not fit data {data.name}: language-model data (data.name "
                           f"lm_*) needs one of {lm}, and those methods need language-model data")
    student = build_model(cfg.model.name, data, checkpoint=cfg.model.checkpoint, role="model",
                          kwargs=cfg.model.kwargs)
    if sync_bn:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)  # before the method builds views of it
    cache = None
    if cfg.teacher.cache is not None and cfg.needs_teacher:
        cache = open_teacher_cache(cfg, data)
    teacher = build_model(cfg.teacher.name, data, checkpoint=cfg.teacher.checkpoint, role="teacher",
                          kwargs=cfg.teacher.kwargs) if cfg.needs_teacher and cache is None else None
    try:
        if cache is not None:
            distiller = methods.get(cfg.method.name).from_cache(student, cache, data.input_shape,
                                                                 options=cfg.method.options)
            distiller.epochs = cfg.train.epochs
        else:
            distiller = methods.create(cfg.method.name, student, teacher, data.input_shape,
                                       options=cfg.method.options, epochs=cfg.train.epochs)
    except OptionError as e:
        key = f"method.options.{e.key}"
        raise BlockKDError(f"invalid {key} in {cfg.where(key)}: {e}") from None
    if sync_bn:  # the method's own modules (connectors), in place
        for name, child in distiller.named_children():
            if name not in ("student", "teacher"):
                nn.SyncBatchNorm.convert_sync_batchnorm(child)
    return distiller.to(device)


def open_teacher_cache(cfg, data):
    """``teacher.cache``: the cached top-k teacher logits, for a method that can read them, verified against the
    run's training sequences and tokenizer (:mod:`blockkd.data.lm_cache`)."""
    where = cfg.where("teacher.cache")
    if not getattr(methods.get(cfg.method.name), "reads_cache", False):
        live = "its stepping-stones run the teacher's own layers" if "blockkd" in cfg.method.name else \
            "it reads more of the teacher than its output distribution"
        raise BlockKDError(f"method {cfg.method.name} needs the live teacher ({live}); remove teacher.cache (in "
                           f"{where}) or use lm-kd")
    if getattr(data.train, "data", None) is None or getattr(data, "tokenizer", None) is None:
        raise BlockKDError(f"teacher.cache (in {where}) needs language-model data (data.name lm_*)")
    return open_cache(cfg.teacher.cache, tokenizer=data.tokenizer, seqs=data.train.data)
