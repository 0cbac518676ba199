"""Precise BN (engine/precise_bn.py): the statistics an evaluation uses are those of the weights evaluated.

The cause it answers (issue 35, docs/blockkd.md "Across architecture families"): a ShuffleV1 student's test
top-1 fell 18.5 points at one epoch's end while its training top-1 rose; its BN running averages, which mix
the last steps' weights, were the difference (the same weights: 81.57 % with them recomputed, 60.67 % without;
results/precise_bn.md).
"""
import torch
import torch.nn as nn

from blockkd import methods
from blockkd.engine.precise_bn import recompute_bn, trained_batch_norms
from blockkd.models import create


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 8, 8, generator=g) * 3 + 1, torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(5, 4, 1),
                         nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_statistics_are_the_plain_average_of_the_batches_under_the_current_weights():
    torch.manual_seed(0)
    model, data = net(), batches(5)
    model.train()
    for x, _ in data:  # running averages of these weights ...
        model(x)
    with torch.no_grad():  # ... then the weights move: the averages are now stale
        model[0].weight.mul_(3)
    bn = model[1]
    stale = bn.running_var.clone()
    inputs = [model[0](x).detach() for x, _ in data[:3]]
    mean = torch.stack([i.mean((0, 2, 3)) for i in inputs]).mean(0)
    var = torch.stack([i.transpose(0, 1).flatten(1).var(1) for i in inputs]).mean(0)  # unbiased, as BN keeps it

    model.eval()
    torch.manual_seed(7)
    used = recompute_bn(model, data, 3)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))  # the dropout's draws were given back: training goes on unchanged
    assert used == 3 and not model.training and bn.momentum == 0.1
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    assert not torch.allclose(stale, bn.running_var, rtol=0.5)


def test_a_distiller_s_trained_modules_are_refreshed_and_its_teacher_is_not():
    teacher, student = create("resnet8", 10, 1).eval(), create("ShuffleV1", 10, 1)
    d = methods.create("blockkd", student, teacher, input_shape=(1, 28, 28), epochs=4)
    norms = trained_batch_norms(d)
    assert any(m in norms for m in d.connectors.modules())  # the stones' connectors are evaluated too
    assert not any(m in norms for m in d.teacher.modules())
    frozen = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    connector_bn = next(m for m in d.connectors.modules() if isinstance(m, nn.BatchNorm2d))
    before = connector_bn.running_var.clone()
    data = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    assert recompute_bn(d, data, 4) == 2  # a loader shorter than asked: all of it
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(before, connector_bn.running_var)
    assert d.teacher.training is False


def test_a_model_without_batch_norm_is_left_alone():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.LayerNorm(4))
    assert recompute_bn(model, iter(()), 10) == 0
