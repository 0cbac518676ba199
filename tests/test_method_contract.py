"""The contract every registered method keeps, checked for each name in ``blockkd.methods.names()``.

A new file in src/blockkd/methods/ that registers a distiller is picked up here with no other edit:
built on two tiny pairs (same family; a wider teacher of another family), one training step reaches every
student parameter with a finite gradient (but those its class declares untrained, see
``Distiller.untrained_student_parameters``), the teacher is untouched and absent from what is saved,
``eval_logits`` works, and the saved train state loads into a fresh distiller to the same outputs.
The package's discovery rule (every module registers a method, but the declared helpers) is checked too.
"""
from __future__ import annotations

import ast
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockkd
from blockkd import methods
from helpers import make, step_kwargs

SRC = Path(blockkd.__file__).resolve().parent
PAIRS = {"same family": ("resnet14", "resnet8"), "other family and widths": ("wrn_16_2", "resnet8")}
# Options that keep a method small enough for a unit test (CRD's memory bank holds one row per training sample).
SMALL = {"crd": {"num_data": 64, "nce_k": 16}}
N = 4
# Classifier methods; the causal-LM ones (``task = "causal_lm"``) distil next-token models: tests/test_lm.py
# steps them on tiny GPT-2s.
CLASSIFIERS = [m for m in methods.names() if getattr(methods.get(m), "task", None) != "causal_lm"]


def build(method: str, pair: str, seed: int = 0) -> methods.Distiller:
    torch.manual_seed(seed)
    teacher, student = PAIRS[pair]
    d = make(method, student=student, teacher=teacher, **SMALL.get(method, {}))
    if not methods.needs_teacher(method):
        assert methods.create(method, d.student).teacher is None  # builds without one
    return d


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randint(0, 10, (N,), generator=g)


@pytest.mark.filterwarnings("ignore:OFD")  # OFD warns when it takes margins from data instead of BN
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method", CLASSIFIERS)
def test_one_step_keeps_the_contract(method, pair):
    d = build(method, pair).train()
    cls = methods.get(method)
    assert isinstance(cls.paper, str) and isinstance(d.untrained_student_parameters, tuple)
    teacher = d.teacher
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
    params = list(d.trainable_parameters())
    ids = {id(p) for p in params}
    if teacher is not None:
        assert not teacher.training and not any(id(p) in ids for p in teacher.parameters())
    # Everything outside the teacher that requires a gradient is trained (SimKD's frozen copy of the teacher's
    # head requires none).
    assert all(id(p) in ids for n, p in d.named_parameters() if not n.startswith("teacher.") and p.requires_grad)

    x, y = batch()
    logits, losses = d(x, y, epoch=0.5, **step_kwargs(d, N, x))
    assert logits.shape == (N, 10)
    assert losses and all(k.startswith("loss_") and v.dim() == 0 and torch.isfinite(v) for k, v in losses.items())
    assert set(cls.task_losses) <= set(losses), "task_losses must name losses the method returns (DOT reads them)"
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opt.zero_grad()
    sum(losses.values()).backward()

    untrained = d.untrained_student_parameters
    for name, p in d.student.named_parameters():
        if name.startswith(untrained):
            assert p.grad is None, f"{name} is declared untrained but got a gradient"
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"student parameter {name} got no finite grad"
    assert any(p.grad.abs().sum() > 0 for n, p in d.student.named_parameters() if not n.startswith(untrained))
    for name, p in d.named_parameters():
        if not name.startswith(("student.", "teacher.")) and p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    if teacher is not None:
        assert all(p.grad is None for p in teacher.parameters())
    opt.step()
    if teacher is not None:
        assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())

    state = d.train_state_dict()
    assert state and not any(k.startswith("teacher.") for k in state)
    assert all(f"student.{k}" in state for k in d.student.state_dict())

    d.eval()
    with torch.no_grad():
        heads = d.eval_logits(x)
        plain = d(x)
    assert "student" in heads and all(v.shape == (N, 10) and torch.isfinite(v).all() for v in heads.values())
    torch.testing.assert_close(heads["student"], plain)

    # Resume: the saved state loaded into a distiller built afresh (other initial weights) gives it back.
    again = build(method, pair, seed=1)
    if again.teacher is not None:
        again.teacher.load_state_dict(teacher.state_dict())
    again.load_train_state_dict(state)
    assert again.train_state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in again.train_state_dict().items())
    again.eval()
    with torch.no_grad():
        resumed = again.eval_logits(x)
    assert resumed.keys() == heads.keys()
    for k in heads:
        torch.testing.assert_close(resumed[k], heads[k])


# ----------------------------------------------------------------------------------------- discovery
def registered_by(module: str) -> set[str]:
    """The names a method module registers with ``@register("...")``, read from its source."""
    tree = ast.parse((SRC / "methods" / f"{module}.py").read_text())
    return {d.args[0].value for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            for d in node.decorator_list
            if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register" and d.args}


def test_every_method_module_registers_a_method_and_every_helper_none():
    modules = sorted(m.name for m in pkgutil.iter_modules([str(SRC / "methods")]))
    assert set(methods.HELPERS) <= set(modules), "methods.HELPERS names a module that does not exist"
    found = set()
    for module in modules:
        names = registered_by(module)
        if module in methods.HELPERS:
            assert not names, f"methods/{module}.py is listed in methods.HELPERS but registers {sorted(names)}"
        else:
            assert names, (f"methods/{module}.py registers no method: decorate its Distiller with "
                           f"@register(\"name\") (from .registry import register), or add {module!r} to "
                           f"HELPERS in methods/__init__.py if it only holds shared code")
            found |= names
    assert found == set(methods.names())


def test_method_modules_import_register_from_the_registry_not_the_package():
    """No import back up: a module inside methods/ never imports from the package ``__init__``."""
    upward = []
    for path in sorted((SRC / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if path.name != "__init__.py" and isinstance(node, ast.ImportFrom) and (
                    (node.level == 1 and node.module is None) or (node.level == 2 and node.module == "methods")):
                upward.append(f"methods/{path.name}:{node.lineno}")
    assert not upward, f"import register from .registry, not from the package: {upward}"


def test_a_new_method_file_is_found_with_no_other_edit(tmp_path):
    """A copy of the package plus one file ``mykd.py``: ``blockkd methods`` lists it, nothing else edited."""
    shutil.copytree(SRC, tmp_path / "blockkd", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "blockkd" / "methods" / "mykd.py").write_text(
        "from .kd import KD\nfrom .registry import register\n\n\n"
        "@register(\"mykd\")\nclass MyKD(KD):\n    paper = \"a test\"\n")
    proc = subprocess.run([sys.executable, "-m", "blockkd", "methods"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "mykd" in proc.stdout and "blockkd-lite" in proc.stdout
