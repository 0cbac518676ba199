"""DOT, the Distillation-Oriented Trainer (``optim.name: dot``): its update rule, the split backward of
``train_step``, its options, and one step of real methods through it."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from blockkd import config, methods, models
from blockkd.engine import runtime, train_step
from blockkd.errors import BlockKDError
from blockkd.optim import DOT, OPTIMIZERS, build_optimizer

RT = runtime.resolve("cpu", "off", False)
LR, BETA, DELTA, WD = 0.1, 0.9, 0.075, 0.01


def no_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


class Toy(nn.Module):
    """Quadratic losses with known gradients: ``w`` gets both, ``c`` (a connector) only the distillation
    term's, ``h`` (a head) only the task term's.

        loss_ce = ½‖w − a‖² + ½‖h − a‖²      loss_kd = ½‖w − b‖² + ½‖c − b‖²
    """

    task_losses = ("loss_ce",)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor([0.3, 0.7], dtype=torch.float64))
        self.h = nn.Parameter(torch.tensor([-1.0, 2.0], dtype=torch.float64))
        self.a = torch.tensor([0.2, 0.4, -0.6], dtype=torch.float64)
        self.b = torch.tensor([-1.5, 1.0, 2.0], dtype=torch.float64)

    def forward(self, x, y, *, epoch=0.0):
        loss_ce = 0.5 * (self.w - self.a).square().sum() + 0.5 * (self.h - self.a[:2]).square().sum()
        loss_kd = 0.5 * (self.w - self.b).square().sum() + 0.5 * (self.c - self.b[:2]).square().sum()
        return x, {"loss_ce": loss_ce, "loss_kd": loss_kd}


def toy_steps(model: nn.Module, optimizer, n: int) -> None:
    x, y = torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    for i in range(n):
        train_step(model, x, y, epoch=float(i), optimizer=optimizer, scaler=no_scaler(), rt=RT)


def by_hand(n: int, beta: float = BETA, delta: float = DELTA) -> dict[str, list[float]]:
    """DOT's rule written out per coordinate with plain floats, each momentum buffer as its explicit sum
    b_t = Σ_{k ≤ t} m^(t − k) · d_k over the step's (decayed) gradients d_k (m^0 = 1 for the first one)."""
    toy = Toy()
    w, c, h = (toy.w.tolist(), toy.c.tolist(), toy.h.tolist())
    a, b = toy.a.tolist(), toy.b.tolist()
    history: dict[str, list[list[float]]] = {"w_task": [], "w_kd": [], "c": [], "h": []}

    def buffer(ds: list[list[float]], m: float) -> list[float]:
        t = len(ds) - 1
        return [sum(m ** (t - k) * ds[k][j] for k in range(t + 1)) for j in range(len(ds[0]))]

    for _ in range(n):
        history["w_task"].append([(wi - ai) + WD * wi for wi, ai in zip(w, a)])  # task grad + weight decay
        history["w_kd"].append([wi - bi for wi, bi in zip(w, b)])  # no decay: it went with the task side
        history["c"].append([(ci - bi) + WD * ci for ci, bi in zip(c, b)])  # only the kd grad: plain SGD, β
        history["h"].append([(hi - ai) + WD * hi for hi, ai in zip(h, a)])  # only the task grad: plain SGD, β
        bt, bk = buffer(history["w_task"], beta - delta), buffer(history["w_kd"], beta + delta)
        w = [wi - LR * (x + y) for wi, x, y in zip(w, bt, bk)]
        c = [ci - LR * x for ci, x in zip(c, buffer(history["c"], beta))]
        h = [hi - LR * x for hi, x in zip(h, buffer(history["h"], beta))]
    return {"w": w, "c": c, "h": h}


def test_update_is_dots_rule_by_hand():
    toy = Toy()
    cfg = validate({"lr": LR, "weight_decay": WD, "momentum": BETA, "delta": DELTA})
    opt = build_optimizer(list(toy.parameters()), cfg.optim)
    assert isinstance(opt, DOT) and opt.defaults["delta"] == DELTA
    toy_steps(toy, opt, 3)
    expected = by_hand(3)
    for name in ("w", "c", "h"):
        torch.testing.assert_close(getattr(toy, name).detach(), torch.tensor(expected[name], dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
    assert set(opt.state[toy.w]) == {"momentum_buffer", "distill_momentum_buffer"}
    assert set(opt.state[toy.c]) == {"distill_momentum_buffer"} and set(opt.state[toy.h]) == {"momentum_buffer"}
    # Δ makes a difference: the same three steps with one momentum end elsewhere.
    assert not torch.allclose(toy.w.detach(), torch.tensor(by_hand(3, delta=0.0)["w"], dtype=torch.float64))


def test_state_dict_resumes_exactly():
    straight, split = Toy(), Toy()
    opt = DOT(straight.parameters(), lr=LR, weight_decay=WD)
    toy_steps(straight, opt, 4)
    first = DOT(split.parameters(), lr=LR, weight_decay=WD)
    toy_steps(split, first, 2)
    second = DOT(split.parameters(), lr=LR, weight_decay=WD)
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    toy_steps(split, second, 2)
    for p, q in zip(straight.parameters(), split.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def tiny(method: str, **options) -> methods.Distiller:
    torch.manual_seed(0)
    return methods.create(method, models.create("resnet8", 10), models.create("resnet14", 10), (3, 16, 16),
                          **options)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("method, options", [("kd", {}),
                                             ("blockkd", {"stone_grad_cap": None, "connector": "conv1x1_bn"})])
def test_delta_zero_is_sgd_with_momentum(method, options):
    """Δ = 0: the two buffers add up to SGD's one, so the split changes nothing (up to rounding). Block-KD's
    stone_grad_cap is off here: DOT's two backward passes (task, distillation) are bounded apart, so with the
    cap a split step is not the one-pass step (docs/blockkd.md, the cap's row). The 1x1 connector: on this
    16-px pair the default 3x3 one, BN over 8 samples of a 4x4 map, amplifies rounding so much that the two
    orders of summation part by 2e-3 after three steps on one thread (1e-7 on two)."""
    x, y = batch()
    finals = []
    for make in (lambda ps: torch.optim.SGD(ps, lr=LR, momentum=BETA, weight_decay=WD),
                 lambda ps: DOT(ps, lr=LR, momentum=BETA, delta=0.0, weight_decay=WD)):
        d = tiny(method, **options).train()
        opt = make(list(d.trainable_parameters()))
        for i in range(3):
            train_step(d, x, y, epoch=5.0 + i, optimizer=opt, scaler=no_scaler(), rt=RT)
        finals.append([p.detach().clone() for p in d.trainable_parameters()])
    for p, q in zip(*finals):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["kd", "blockkd"])
def test_one_step_of_a_method(method):
    d = tiny(method).train()
    assert set(d.task_losses) <= {"loss_ce", "loss_task_student", "loss_task_stones"}
    before = {n: p.detach().clone() for n, p in d.named_parameters() if p.requires_grad}
    opt = DOT(list(d.trainable_parameters()), lr=LR, weight_decay=WD)
    x, y = batch()
    logits, losses, stepped = train_step(d, x, y, epoch=5.0, optimizer=opt, scaler=no_scaler(), rt=RT)
    assert stepped and logits.shape == (8, 10) and set(d.task_losses) <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    changed = [n for n, p in d.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.startswith("student.") for n in changed)
    fc = d.student.fc.weight if hasattr(d.student, "fc") else next(d.student.parameters())
    assert set(opt.state[fc]) == {"momentum_buffer", "distill_momentum_buffer"}  # the student gets both
    assert not opt._distill_grads  # the stash is consumed by the step
    assert all(not n.startswith("teacher.") for n in changed)


def test_a_method_without_its_task_loss_is_refused():
    class Nameless(Toy):
        task_losses = ("loss_task",)

    toy = Nameless()
    with pytest.raises(BlockKDError, match="task loss.*loss_task"):
        toy_steps(toy, DOT(toy.parameters(), lr=LR), 1)


def test_fp16_scaling_and_clipping_are_refused_in_the_step():
    toy = Toy()
    x, y = torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)

    class Scaling(torch.amp.GradScaler):
        def is_enabled(self):
            return True

    with pytest.raises(BlockKDError, match="fp16"):
        train_step(toy, x, y, epoch=0.0, optimizer=DOT(toy.parameters(), lr=LR), scaler=Scaling("cpu"), rt=RT)
    with pytest.raises(BlockKDError, match="grad_clip"):
        train_step(toy, x, y, epoch=0.0, optimizer=DOT(toy.parameters(), lr=LR), scaler=no_scaler(), rt=RT,
                   grad_clip=1.0)


def validate(optim: dict, **train) -> config.Config:
    return config.validate({"model": {"name": "resnet8"}, "data": {"name": "synthetic"},
                            "optim": {"name": "dot", **optim}, "train": train})


def test_options_are_validated():
    cfg = validate({"lr": 0.05, "momentum": 0.9})
    assert cfg.optim.options.delta == 0.075 and cfg.optim.options.momentum == 0.9
    assert OPTIMIZERS.get("dot").needs_loss_split and not OPTIMIZERS.get("sgd").needs_loss_split
    with pytest.raises(BlockKDError, match="did you mean 'dot'"):
        validate({"name": "dott"})
    with pytest.raises(BlockKDError, match="did you mean 'optim.delta'"):
        validate({"detla": 0.1})
    with pytest.raises(BlockKDError, match="optim.delta=-0.1.*>= 0"):
        validate({"delta": -0.1})
    with pytest.raises(BlockKDError, match="optim.momentum=1.5.*<= 1"):
        validate({"momentum": 1.5})
    with pytest.raises(BlockKDError, match="optim.delta.*at most momentum"):
        validate({"momentum": 0.05, "delta": 0.075})
    with pytest.raises(BlockKDError, match="optim.delta.*below 1"):
        validate({"momentum": 0.95, "delta": 0.075})
    with pytest.raises(BlockKDError, match="optim.betas.*does not apply to optimizer 'dot'"):
        validate({"betas": [0.9, 0.99]})
    with pytest.raises(BlockKDError, match="train.amp=fp16"):
        validate({}, amp="fp16")
    with pytest.raises(BlockKDError, match="train.grad_clip"):
        validate({}, grad_clip=5.0)
    assert validate({}, amp="bf16").train.amp == "bf16"
    with pytest.raises(ValueError, match="DOT"):
        DOT([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9, delta=0.2)


def test_a_run_trains_with_dot(tmp_path):
    """``optim.name: dot`` through ``blockkd.engine.train``: the trainer's own step, checkpoint and resume."""
    from blockkd.engine import load_checkpoint, train

    cfg = config.validate({
        "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "allow_random": True},
        "method": {"name": "kd"},
        "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 64, "test_size": 32,
                 "batch_size": 32, "eval_batch_size": 32},
        "optim": {"name": "dot", "lr": 0.1}, "schedule": {"name": "constant"},
        "train": {"epochs": 2, "max_steps": 2, "device": "cpu", "amp": "off"},
        "output": {"dir": str(tmp_path), "name": "r", "progress": False, "tensorboard": False, "plot": False}})
    summary = train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    state = load_checkpoint(tmp_path / "r" / "last").state
    kinds = {k for s in state["optimizer"]["state"].values() for k in s}
    assert kinds == {"momentum_buffer", "distill_momentum_buffer"}  # both buffers are saved for resuming


@pytest.mark.parametrize("term", ["loss_kd", "loss_ce"])
def test_a_nan_gradient_of_either_pass_is_seen_and_vetoes_the_step(term):
    """The distillation gradients leave ``.grad`` for DOT's stash before the task pass: the finite check
    must look at them there, or a NaN in them alone would slip into the update."""

    class NaNGrad(Toy):
        def forward(self, x, y, *, epoch=0.0):
            logits, losses = super().forward(x, y, epoch=epoch)
            poisoned = self.c if term == "loss_kd" else self.h  # c: distillation gradient only; h: task only
            hook = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
            losses[term] = losses[term] + 0 * poisoned.sum()
            self.hooks = [hook]
            return logits, losses

    toy, seen = NaNGrad(), []
    before = [p.detach().clone() for p in toy.parameters()]
    x, y = torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)
    _, losses, stepped = train_step(toy, x, y, epoch=0.0, optimizer=DOT(toy.parameters(), lr=LR),
                                    scaler=no_scaler(), rt=RT, proceed_grads=lambda f: seen.append(bool(f)) or False)
    assert all(torch.isfinite(v) for v in losses.values())
    assert seen == [False] and not stepped
    assert all(torch.equal(p, q) for p, q in zip(toy.parameters(), before))
    toy.hooks[0].remove()
    clean = Toy()
    _, _, stepped = train_step(clean, x, y, epoch=0.0, optimizer=DOT(clean.parameters(), lr=LR),
                               scaler=no_scaler(), rt=RT, proceed_grads=lambda f: seen.append(bool(f)) or True)
    assert seen == [False, True] and stepped
