"""Optimizers by name: the classes of ``torch.optim`` with their own keyword arguments.

Why introspection: every ``torch.optim`` optimizer already declares its keyword arguments and their
defaults; reading them from the constructor's signature gives each one a typed options dataclass
(``optim.momentum``, ``optim.betas`` ...) without writing any of them again. Only where our recipes'
convention differs from torch's default (SGD momentum 0.9) is a default overridden, in one table.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from ..registry import Registry
from ..schema import ANY, BOOL, Check, list_of, number, option, integer
from .dot import DOT, DOTOptions

# name -> (torch.optim class name, our defaults where they differ from torch's)
TORCH_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"momentum": 0.9}),
    "adamw": ("AdamW", {}),
    "adam": ("Adam", {}),
    "nadam": ("NAdam", {}),
    "radam": ("RAdam", {}),
    "rmsprop": ("RMSprop", {}),
    "adagrad": ("Adagrad", {}),
    "adamax": ("Adamax", {}),
    "adadelta": ("Adadelta", {}),
}
COMMON = ("params", "lr", "weight_decay")  # lr and weight_decay are keys of the optim section itself
SKIPPED = ("foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay")


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer choice: its options dataclass and ``build(params, lr, weight_decay, options)``.
    ``needs_loss_split``: the optimizer takes the task and the distillation gradients apart (DOT; see
    :func:`blockkd.engine.train_step`), which rules out fp16 loss scaling and ``train.grad_clip``."""

    options: type
    build: Any
    help: str
    needs_loss_split: bool = False


def _check_like(default: Any, annotation: str) -> Check:
    """The check for a keyword argument: from its annotation where it names a plain type, else its default."""
    if isinstance(default, bool) or annotation == "bool":
        return BOOL
    if "float" in annotation and not isinstance(default, tuple):
        return number(0)
    if isinstance(default, int):
        return integer(0)
    if isinstance(default, float):
        return number(0)
    if isinstance(default, tuple) and all(isinstance(v, (int, float)) for v in default):
        return Check(f"a list of {len(default)} numbers",
                     lambda v: isinstance(v, (list, tuple)) and len(v) == len(default) and list_of(number()).ok(v),
                     lambda v: [float(x) for x in v])
    return ANY


# Bounds that a signature cannot say (momentum-like coefficients live in [0, 1]).
BOUNDED = {name: number(0, hi=1) for name in ("momentum", "dampening", "alpha", "rho")}
BOUNDED["betas"] = Check("a list of 2 numbers in [0, 1)", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                         and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v),
                         lambda v: [float(b) for b in v])


def options_of(cls: type, overrides: dict[str, Any]) -> type:
    """A frozen options dataclass from ``cls.__init__``'s keyword arguments (our ``overrides`` win)."""
    fields = []
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name in ("self", *COMMON, *SKIPPED) or p.default is inspect.Parameter.empty:
            continue
        default = overrides.get(p.name, p.default)
        if isinstance(default, torch.Tensor):
            default = float(default)
        default = list(default) if isinstance(default, tuple) else default
        annotation = (p.annotation if isinstance(p.annotation, str)
                      else getattr(p.annotation, "__name__", str(p.annotation)))
        check = BOUNDED.get(p.name) or _check_like(float(p.default) if isinstance(p.default, torch.Tensor)
                                                    else p.default, annotation)
        fields.append((p.name, Any, option(default, check, f"torch.optim.{cls.__name__}({p.name}=...)")))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields, frozen=True)


def _torch_builder(cls: type):
    def build(params, *, lr: float, weight_decay: float, options) -> torch.optim.Optimizer:
        kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)

    return build


OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")
for _name, (_cls_name, _overrides) in TORCH_OPTIMIZERS.items():
    _cls = getattr(torch.optim, _cls_name)
    OPTIMIZERS.register(_name, Optimizer(options_of(_cls, _overrides), _torch_builder(_cls),
                                         f"torch.optim.{_cls_name}"))


def _build_dot(params, *, lr: float, weight_decay: float, options: DOTOptions) -> DOT:
    return DOT(params, lr=lr, momentum=options.momentum, delta=options.delta, weight_decay=weight_decay)


OPTIMIZERS.register("dot", Optimizer(DOTOptions, _build_dot, "DOT, the Distillation-Oriented Trainer (Zhao et al., "
                                     "ICCV 2023): SGD with task momentum β − Δ and distillation momentum β + Δ",
                                     needs_loss_split=DOT.needs_loss_split))


def build_optimizer(params, optim) -> torch.optim.Optimizer:
    """The optimizer of the validated ``optim`` section over ``params``."""
    return OPTIMIZERS.get(optim.name).build(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                            options=optim.options)
