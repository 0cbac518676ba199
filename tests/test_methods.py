"""Distillers: interface, frozen teacher, gradients, loss formulas checked independently."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import blockkd
from blockkd.errors import BlockKDError
from blockkd.methods.losses import dkd_parts, kl_div
from helpers import SHAPE, make



def lite3(**options):
    """blockkd-lite with all three stones, each on its own share of the batch: the split mechanics."""
    return make("blockkd-lite", **{"num_stones": None, "whole_batch_stones": 0, **options})


def batch(n=8, shape=SHAPE, num_classes=10):
    return torch.randn(n, *shape), torch.randint(0, num_classes, (n,))


def reference_kl(student, target, t):
    """KL(p_target ‖ p_student) · t², written out: Σ p (log p − log q), mean over the batch."""
    p = torch.softmax(target.double() / t, 1)
    q = torch.softmax(student.double() / t, 1)
    return (p * (p.log() - q.log())).sum(1).mean() * t * t


def reference_standardize(z):
    """Sun et al. (CVPR 2024): per-sample (z − mean) / (std + 1e-7), std with Bessel's correction."""
    z = z.double()
    mean = z.mean(1, keepdim=True)
    std = ((z - mean) ** 2).sum(1, keepdim=True).div(z.shape[1] - 1).sqrt()
    return (z - mean) / (std + 1e-7)


def reference_dkd(student, target, y, t, alpha, beta):
    """Zhao et al.: α·KL(b_target ‖ b_student) + β·KL(p̂_target ‖ p̂_student), · t², mean over the batch."""
    p, q = torch.softmax(target.double() / t, 1), torch.softmax(student.double() / t, 1)
    gt = F.one_hot(y, p.shape[1]).bool()
    bp = torch.stack([p[gt], 1 - p[gt]], 1)
    bq = torch.stack([q[gt], 1 - q[gt]], 1)
    tckd = (bp * (bp.log() - bq.log())).sum(1)
    hp = p[~gt].view(len(p), -1)
    hq = q[~gt].view(len(q), -1)
    hp, hq = hp / hp.sum(1, keepdim=True), hq / hq.sum(1, keepdim=True)
    nckd = (hp * (hp.log() - hq.log())).sum(1)
    return (alpha * tckd + beta * nckd).mean() * t * t


def reference_divergence(kind, ls, t, alpha=1.0, beta=8.0):
    """d(student, target, y) of Block-KD, built from the references above."""
    def d(student, target, y):
        if ls:
            student, target = reference_standardize(student), reference_standardize(target)
        return reference_kl(student, target, t) if kind == "kl" else reference_dkd(student, target, y, t, alpha, beta)
    return d


def test_registry_lists_methods_and_rejects_bad_options():
    assert {"ce", "kd", "dkd", "blockkd", "blockkd-lite"} <= set(blockkd.methods.names())
    with pytest.raises(BlockKDError, match="did you mean 'method.options.temperature'"):
        make("kd", temprature=3)
    with pytest.raises(BlockKDError, match="needs a teacher"):
        blockkd.methods.create("kd", blockkd.models.create("resnet8", num_classes=10))
    with pytest.raises(BlockKDError, match="did you mean 'blockkd'"):
        blockkd.methods.create("blokkd", None)


def test_kd_loss_matches_formula():
    s, t = torch.randn(5, 7), torch.randn(5, 7) * 3
    assert torch.allclose(kl_div(s, t, 4.0).double(), reference_kl(s, t, 4.0), atol=1e-5)


def test_dkd_parts_match_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 2.0]])
    y = torch.tensor([0, 2])
    T = 2.0
    tckd_ref = nckd_ref = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        ps = [math.exp(v / T) for v in si]
        pt = [math.exp(v / T) for v in ti]
        bs = [ps[yi] / sum(ps), 1 - ps[yi] / sum(ps)]
        bt = [pt[yi] / sum(pt), 1 - pt[yi] / sum(pt)]
        tckd_ref += sum(a * math.log(a / b) for a, b in zip(bt, bs))
        qs = [v for j, v in enumerate(ps) if j != yi]
        qt = [v for j, v in enumerate(pt) if j != yi]
        qs = [v / sum(qs) for v in qs]
        qt = [v / sum(qt) for v in qt]
        nckd_ref += sum(a * math.log(a / b) for a, b in zip(qt, qs))
    tckd, nckd = dkd_parts(s, t, y, T)
    assert tckd.item() == pytest.approx(tckd_ref / 2 * T * T, rel=1e-5)
    assert nckd.item() == pytest.approx(nckd_ref / 2 * T * T, rel=1e-5)


def test_dkd_warmup_ramps_kd_terms():
    d = make("dkd", warmup=4.0)
    d.train()
    x, y = batch()
    _, early = d(x, y, epoch=1.0)
    _, late = d(x, y, epoch=10.0)
    assert early["loss_ce"].item() == pytest.approx(late["loss_ce"].item(), rel=1e-5)
    assert early["loss_nckd"].item() == pytest.approx(late["loss_nckd"].item() / 4, rel=1e-4)


@pytest.mark.parametrize("method", ["ce", "kd", "dkd", "blockkd", "blockkd-lite"])
def test_interface_and_frozen_teacher(method):
    d = make(method)
    d.train()
    if d.teacher is not None:
        assert not d.teacher.training and all(not p.requires_grad for p in d.teacher.parameters())
        before = copy.deepcopy(d.teacher.state_dict())
    assert not any(k.startswith("teacher.") for k in d.train_state_dict())
    teacher_params = {id(p) for p in d.teacher.parameters()} if d.teacher is not None else set()
    params = list(d.trainable_parameters())
    assert params and not any(id(p) in teacher_params for p in params)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch()
        logits, losses = d(x, y, epoch=step)
        assert logits.shape == (8, 10)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    if d.teacher is not None:
        after = d.teacher.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "teacher changed"
    d.eval()
    x, _ = batch()
    assert torch.equal(d(x), d.student(x))


def test_blockkd_gradients_reach_student_and_connectors_never_teacher():
    d = make("blockkd", epochs=8)
    d.train()
    x, y = batch()
    _, losses = d(x, y, epoch=2.0)  # past the stones' warm-up (a quarter of the 8 epochs)
    sum(losses.values()).backward()
    for name, p in d.student.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in d.connectors.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in d.teacher.parameters())


def test_blockkd_attributes():
    d = make("blockkd", temperature=3.0, alpha=0.5, beta=2.0, gamma=0.25)
    n = d.num_blocks
    assert n == 3 and len(d.connectors) == n
    assert d.stone_weights == [0.25, 0.5, 1.0]
    assert (d.opts.temperature, d.opts.alpha, d.opts.beta, d.opts.gamma) == (3.0, 0.5, 2.0, 0.25)
    assert isinstance(d.connectors, torch.nn.ModuleList)


def test_blockkd_loss_equals_paper_formula():
    d = make("blockkd", temperature=3.0, alpha=0.3, beta=0.7, gamma=0.5, stone_warmup_fraction=0.0)
    d.train()
    x, y = batch()
    logits, losses = d(x, y)
    stones = d.stones(x)  # train-mode BN uses batch statistics: same values as inside forward
    with torch.no_grad():
        t = d.teacher(x)
    T, w = 3.0, d.stone_weights
    div = reference_divergence("kl", False, T)
    ens = torch.stack(stones).mean(0)
    ce = lambda z: F.cross_entropy(z.double(), y)
    L_task = ce(logits) + sum(wi * ce(z) for wi, z in zip(w, stones))
    L_distill = div(logits, t, y) + sum(wi * div(z, t, y) for wi, z in zip(w, stones))
    L_cross = div(logits, ens, y) + sum(div(z, ens, y) for z in stones)
    expected = 0.3 * L_task + 0.7 * L_distill + 0.5 * L_cross
    total = sum(losses.values())
    assert total.item() == pytest.approx(expected.item(), rel=1e-4)
    assert (losses["loss_task_student"] + losses["loss_task_stones"]).item() == pytest.approx(
        0.3 * L_task.item(), rel=1e-4)
    assert (losses["loss_distill_student"] + losses["loss_distill_stones"]).item() == pytest.approx(
        0.7 * L_distill.item(), rel=1e-4)
    assert losses["loss_cross"].item() == pytest.approx(0.5 * L_cross.item(), rel=1e-4)
    grads = torch.autograd.grad(losses["loss_cross"], list(d.connectors.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_stone_warmup_ramps_every_term_but_the_students_distillation():
    """stone_warmup_fraction 0.25 of 8 epochs ramps the stones' terms, L_cross and the student's task term in
    over 2 epochs; the student's distillation term is at full weight from the first step."""
    d = make("blockkd", stone_warmup_fraction=0.25, epochs=8)
    full = make("blockkd", stone_warmup_fraction=0.0)
    full.load_state_dict(d.state_dict())
    d.train(), full.train()
    x, y = batch()
    for epoch, ramp in ((0.0, 0.0), (0.5, 0.25), (2.0, 1.0), (5.0, 1.0)):
        torch.manual_seed(0)
        got = d(x, y, epoch=epoch)[1]
        torch.manual_seed(0)
        ref = full(x, y, epoch=epoch)[1]
        for k in ref:
            scale = 1.0 if k == "loss_distill_student" else ramp
            assert got[k].item() == pytest.approx(scale * ref[k].item(), rel=1e-5, abs=1e-7), (epoch, k)
    long = make("blockkd", stone_warmup_fraction=0.25, epochs=80)  # the ramp scales with the schedule
    assert long.ramp(10.0) == pytest.approx(0.5) and d.ramp(1.0) == pytest.approx(0.5)
    unknown = make("blockkd")  # no training length given: the 8 epochs the warm-up was measured on, said once
    with pytest.warns(UserWarning, match=r"training length is unknown.*pass epochs= to blockkd\.methods\.create"):
        assert unknown.ramp(1.0) == pytest.approx(0.5)
    assert unknown.ramp(4.0) == 1.0
    with pytest.raises(BlockKDError, match="stone_warmup_fraction"):
        make("blockkd", stone_warmup_fraction=-1)
    with pytest.raises(BlockKDError, match="stone_warmup_fraction"):
        make("blockkd", stone_warmup_fraction=1.5)


@pytest.mark.parametrize("kind, convs", [("conv1x1_bn", [1]), ("conv3x3_bn", [3]), ("conv1x1_bn_relu", [1]),
                                         ("conv3x3_bn_relu_conv1x1_bn", [3, 1])])
def test_connector_kinds(kind, convs):
    """Each kind maps the student's block output to the teacher's shape with the layers its name says."""
    d = make("blockkd", student="resnet8", teacher="wrn_16_2", connector=kind)
    s_shapes = d._views[0].probe(SHAPE)
    t_shapes = d._views[1].probe(SHAPE)
    for c, s_shape, t_shape in zip(d.connectors, s_shapes, t_shapes):
        conv = [m for m in c.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [m.kernel_size[0] for m in conv] == convs and conv[-1].out_channels == t_shape[0]
        assert any(isinstance(m, torch.nn.ReLU) for m in c.modules()) == ("relu" in kind)
        assert tuple(c.eval()(torch.randn(2, *s_shape)).shape[1:]) == tuple(t_shape)
    with pytest.raises(BlockKDError, match=r"invalid method\.options\.connector=conv5x5 .*expected one of conv1x1_bn"):
        make("blockkd", connector="conv5x5")


def test_stones_are_the_hybrid_models():
    """N_i computed by hand from the models' own block views equals stones(x)[i]."""
    d = make("blockkd").eval()
    x, _ = batch(4)
    s_view, t_view = d._views
    with torch.no_grad():
        stones = d.stones(x)
        for i in range(d.num_blocks):
            h = x
            for b in s_view.blocks[: i + 1]:
                h = b(h)
            h = d.connectors[i](h)
            for b in t_view.blocks[i + 1:]:
                h = b(h)
            assert torch.allclose(t_view.head(h), stones[i], atol=1e-5)
        # the last stone uses the teacher's head alone
        assert len(stones) == 3


def test_batched_and_separate_stones_agree():
    a = make("blockkd", batched_stones=True)
    b = make("blockkd", batched_stones=False)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x, y = batch()
    la, lb = a(x, y)[1], b(x, y)[1]
    for k in la:
        assert la[k].item() == pytest.approx(lb[k].item(), rel=1e-5, abs=1e-6), k


def test_unmatchable_pair_is_a_clear_error():
    with pytest.raises(BlockKDError, match="block"):
        make("blockkd", num_blocks=9)


PAIRS = [("vgg13", "MobileNetV2"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
         ("ResNet50", "MobileNetV2"), ("wrn_40_2", "ShuffleV1"), ("resnet32x4", "resnet8x4")]


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("method", ["blockkd", "blockkd-lite"])
def test_heterogeneous_pairs_train_one_step(teacher, student, method):
    d = make(method, student=student, teacher=teacher, num_classes=100, epochs=8)
    d.train()
    x, y = batch(8, num_classes=100)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    _, losses = d(x, y, epoch=2.0)  # past the stones' warm-up
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    # every connector learns every step: all stones run (blockkd-lite: each on its share of the batch)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connectors.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    opt.step()


@pytest.mark.parametrize("teacher,student", [("resnet34", "resnet18"), ("resnet50", "mobilenet_v2")])
def test_torchvision_pairs_train_one_step(teacher, student):
    import torchvision
    t = getattr(torchvision.models, teacher)(num_classes=10)
    s = getattr(torchvision.models, student)(num_classes=10)
    d = blockkd.methods.create("blockkd", s, t, input_shape=(3, 64, 64)).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    _, losses = d(x, y)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.connectors.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())


# ------------------------------------------------------------------------------ evaluation of the stones
def test_eval_logits_are_the_stones_and_their_ensemble():
    d = make("blockkd").eval()
    x, _ = batch(4)
    with torch.no_grad():
        out = d.eval_logits(x)
        stones = d.stones(x)
        assert list(out) == ["student", "stone1", "stone2", "stone3", "ensemble"]
        assert torch.equal(out["student"], d.student(x))
        for i, z in enumerate(stones):
            assert torch.allclose(out[f"stone{i + 1}"], z, atol=1e-6)
        assert torch.allclose(out["ensemble"], torch.stack(stones).mean(0), atol=1e-6)
    kd = make("kd").eval()
    with torch.no_grad():
        assert list(kd.eval_logits(x)) == ["student"] and torch.equal(kd.eval_logits(x)["student"], kd.student(x))
    assert kd.diagnostics(x, torch.zeros(4, dtype=torch.long), epoch=0.0) == {}


# ------------------------------------------------------------------------------------------- diagnostics
def test_diagnostics_are_finite_and_restore_bn_statistics():
    d = make("blockkd").train()
    x, y = batch()
    before = {k: v.clone() for k, v in d.state_dict().items()}
    out = d.diagnostics(x, y, epoch=1.0)
    assert list(out) == ["grad_norm_student", "grad_norm_stone1", "grad_norm_stone2", "grad_norm_stone3"]
    assert all(math.isfinite(v) and v > 0 for v in out.values())
    after = d.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "diagnostics changed a buffer"
    assert all(p.grad is None for p in d.parameters())


def test_diagnostics_parts_sum_to_the_loss_gradient():
    """The parts are the loss, split: their gradients add up to the gradient of the training loss."""
    d = make("blockkd", gamma=0.3, stone_warmup_fraction=0.5, epochs=8).train()
    x, y = batch()
    parts = d.part_gradients(x, y, epoch=1.0)
    params = [p for p in d.student.parameters() if p.requires_grad]
    _, losses = d(x, y, epoch=1.0)
    full = torch.autograd.grad(sum(losses.values()), params)
    for k, g in enumerate(full):
        assert torch.allclose(sum(part[k] for part in parts.values()), g, rtol=1e-4, atol=1e-6)


def test_diagnostics_attribute_gradients_to_the_right_stone():
    d = make("blockkd", gamma=0.5).train()
    x, y = batch()
    s_blocks = d._views[0].blocks
    params = [p for p in d.student.parameters() if p.requires_grad]
    parts = d.part_gradients(x, y, epoch=1.0)
    for i in range(d.num_blocks):
        # Stone i runs the student's blocks 1..i only: no gradient reaches deeper blocks or the head.
        reached = {id(p) for b in s_blocks[: i + 1] for p in b.parameters()}
        grads = parts[f"stone{i + 1}"]
        assert all(torch.count_nonzero(g) == 0 for p, g in zip(params, grads) if id(p) not in reached), i
        assert sum(g.abs().sum() for p, g in zip(params, grads) if id(p) in reached) > 0, i
    # The student's own part reaches every block and the head.
    assert all(torch.count_nonzero(g) > 0 for g in parts["student"])
    zero = make("blockkd", alpha=0.0, beta=0.0, gamma=0.0).train()
    assert all(v == 0.0 for v in zero.diagnostics(x, y, epoch=1.0).values())


@pytest.mark.parametrize("silenced", [0, 1, 2])
def test_diagnostics_of_a_silenced_stone_are_zero(silenced):
    """A connector with zero output cuts its stone off the student: that stone's norm only is zero."""
    d = make("blockkd", gamma=0.5).train()
    bn = [m for m in d.connectors[silenced].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    with torch.no_grad():
        bn.weight.zero_(), bn.bias.zero_()
    x, y = batch()
    out = d.diagnostics(x, y, epoch=1.0)
    for i in range(d.num_blocks):
        assert (out[f"grad_norm_stone{i + 1}"] == 0.0) == (i == silenced), (i, out)
    assert out["grad_norm_student"] > 0


# ----------------------------------------------------------------------------------------- split sampling
@pytest.mark.parametrize("size", [8, 7, 3, 2])
def test_split_shares_are_disjoint_and_cover_the_batch(size):
    d = lite3()
    for _ in range(5):
        shares = d.plan.rows(size)
        assert len(shares) == d.num_blocks
        assert torch.equal(torch.cat(shares).sort().values, torch.arange(size))
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
    draws = {tuple(d.plan.rows(8)[0].sort().values.tolist()) for _ in range(20)}
    assert len(draws) > 1  # random


@pytest.mark.parametrize("batched", [True, False])
def test_split_stones_equal_the_full_path_per_sample(batched):
    """The teacher is in eval mode: a stone's logits on its share are its full-batch logits on those samples
    (with the connectors' BN in eval mode too; in train mode it normalises with the share's statistics)."""
    d = lite3(batched_stones=batched).eval()
    x, _ = batch(8)
    with torch.no_grad():
        feats, _ = d.student_features(x)
        full = d.run_stones(feats, [0, 1, 2])
        shares = d.plan.rows(8)
        part = d.run_stones(feats, [0, 1, 2], rows=shares)
    for i in range(3):
        assert torch.allclose(part[i], full[i][shares[i]], atol=1e-5)


def _with_shares(d, plan, perm):
    """Make ``d.plan.rows`` return the rows of the permutation ``perm``."""
    d.plan = types.SimpleNamespace(rows=lambda b, device="cpu": plan.rows_of(torch.tensor(perm)))


def _every_draw(d, x, y):
    """``[(perm, losses)]``: ``d.forward_train`` on the batch once per permutation of it, each as its shares."""
    import itertools
    draws, plan = [], d.plan
    for perm in itertools.permutations(range(len(y))):
        _with_shares(d, plan, perm)
        draws.append((perm, d.forward_train(x, y, epoch=1.0)[1]))
    d.plan = plan
    return draws


def _full_twin(split, opts):
    """Full Block-KD with ``split``'s weights, both in eval mode (per-sample BN everywhere), on a batch of 4:
    ``(x, y, its losses, its stones' logits, its student's logits)``, the reference of a split objective."""
    full = make("blockkd", **opts)
    full.load_state_dict(split.state_dict())
    split.eval(), full.eval()
    x, y = batch(4)
    with torch.no_grad():
        _, ref = full.forward_train(x, y, epoch=1.0)
        return x, y, ref, full.stones(x), full.student(x)


def _mean_over(draws, key):
    return sum(got[key].item() for _, got in draws) / len(draws)


def test_split_objective_is_unbiased_and_its_cross_term_exact():
    """Over every permutation of a batch of 4 (shares of 2, 1, 1), the stones' task and distill terms average
    to the full objective's; each draw's L_cross is d(Y^S, Ŷ) with Ŷ_j the logits of the stone that saw j."""
    opts = dict(gamma=0.5, stone_warmup_fraction=0.0)
    split = lite3(**opts)
    sizes = [2, 1, 1]
    assert split.plan.share_sizes(4) == sizes
    x, y, ref, stones, s_logits = _full_twin(split, opts)
    with torch.no_grad():
        draws = _every_draw(split, x, y)
        for perm, got in draws:
            for k in ("loss_task_student", "loss_distill_student"):
                assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5)
            owner = {j: i for i, share in enumerate(torch.tensor(perm).split(sizes)) for j in share.tolist()}
            hat = torch.stack([stones[owner[j]][j] for j in range(4)])
            assert got["loss_cross"].item() == pytest.approx(0.5 * split.d(s_logits, hat).item(), rel=1e-5, abs=1e-7)
        for k in ("loss_task_stones", "loss_distill_stones"):
            assert _mean_over(draws, k) == pytest.approx(ref[k].item(), rel=1e-5)
        # E[L_cross] = Σ_i P(j in share i) · d(Y^S, Y^{N_i}) = Σ_i (b_i / 4) · d(Y^S, Y^{N_i}).
        expected = sum(b / 4 * split.d(s_logits, z).item() for b, z in zip(sizes, stones))
        assert _mean_over(draws, "loss_cross") == pytest.approx(0.5 * expected, rel=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_whole_batch_stones_see_every_sample_and_their_cross_term(k):
    """whole_batch_stones: k: the k deepest stones run on the whole batch, the others on their share (the same
    share sizes); over every permutation of a batch of 4 the task and distill terms average to the full
    objective's; each draw's L_cross is d(Y^S, Ŷ) + Σ_i mean over stone i's samples of d(Y^{N_i}, Ŷ), with Ŷ_j
    the mean of the stones that saw j, computed here sample by sample."""
    opts = dict(gamma=0.5, stone_warmup_fraction=0.0)
    split = lite3(whole_batch_stones=k, **opts)
    sizes = [2, 1, 1]
    assert split.plan.share_sizes(4) == sizes
    assert split.plan.batch_sizes(4) == sizes[:3 - k] + [4] * k
    assert split.plan.batch_sizes(128) == {1: [43, 43, 128], 2: [43, 128, 128]}[k]
    rows = split.plan.rows(4)
    assert [len(r) for r in rows[:3 - k]] == sizes[:3 - k] and rows[3 - k:] == [None] * k
    assert torch.equal(torch.cat(rows[:3 - k]).unique(), torch.cat(rows[:3 - k]).sort().values)  # disjoint
    x, y, ref, stones, s_logits = _full_twin(split, opts)
    d = split.d
    with torch.no_grad():
        draws = _every_draw(split, x, y)
        for perm, got in draws:
            owner = {j: i for i, share in enumerate(torch.tensor(perm).split(sizes)) for j in share.tolist()}
            saw = [{owner[j], *range(3 - k, 3)} for j in range(4)]
            hat = torch.stack([sum(stones[i][j] for i in saw[j]) / len(saw[j]) for j in range(4)])
            cross = d(s_logits, hat).item()
            for i in range(3):
                mine = [j for j in range(4) if i in saw[j]]
                if mine:
                    cross += d(stones[i][mine], hat[mine]).item()
            assert got["loss_cross"].item() == pytest.approx(0.5 * cross, rel=1e-4)
        for key in ("loss_task_stones", "loss_distill_stones"):
            assert _mean_over(draws, key) == pytest.approx(ref[key].item(), rel=1e-5)
    # every stone on the whole batch: the split objective is the full one, term by term
    every = lite3(whole_batch_stones=3, **opts)
    every.load_state_dict(split.state_dict())
    every.eval()
    with torch.no_grad():
        _, got = every.forward_train(x, y, epoch=1.0)
    assert {k: v.item() for k, v in got.items()} == pytest.approx({k: v.item() for k, v in ref.items()}, rel=1e-5)
    with pytest.raises(BlockKDError,
                       match=r"whole_batch_stones must be between 0 and the number of stones \(3\), got 4"):
        lite3(whole_batch_stones=4)
    with pytest.raises(BlockKDError, match=r"method\.options\.whole_batch_stones.*num_blocks is 2"):
        lite3(whole_batch_stones=3, num_blocks=2)


def test_split_every_connector_gets_a_gradient_every_step():
    d = lite3().train()
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
    for step in range(3):
        x, y = batch(8)
        opt.zero_grad()
        _, losses = d(x, y, epoch=2.0 + step)  # past the stones' warm-up
        sum(losses.values()).backward()
        for name, p in d.connectors.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (step, name)
        opt.step()
    x, y = batch(2)  # fewer samples than stones: the stone without a share skips the step
    _, losses = d(x, y)
    assert all(torch.isfinite(v) for v in losses.values())


# -------------------------------------------------------------------------------------------- num_stones
def test_lite_defaults_are_the_two_deepest_stones_the_deepest_on_the_whole_batch():
    d = make("blockkd-lite")
    assert (d.opts.num_stones, d.opts.whole_batch_stones) == (2, 1)
    assert blockkd.methods.defaults("blockkd")["whole_batch_stones"] is None  # every stone on the whole batch
    assert blockkd.methods.defaults("blockkd")["num_stones"] is None  # the full method keeps every stone
    assert d.stone_ids == [1, 2] and len(d.connectors) == 2
    assert d.plan.batch_sizes(128) == [64, 128] and d.plan.batch_sizes(7) == [4, 7]
    rows = d.plan.rows(8)
    assert len(rows[0]) == 4 and rows[1] is None
    # with fewer blocks than num_stones, every stone there is
    small = make("blockkd-lite", num_blocks=1)
    assert small.stone_ids == [0] and small.plan.batch_sizes(8) == [8]


def test_num_stones_keeps_the_deeper_stones_with_their_weights():
    """num_stones: 2 builds the two deepest of 3 stones only: their connectors, weights and logits are those of
    the full method's stones 2 and 3, and the loss is the paper's formula over them."""
    opts = dict(alpha=0.35, beta=0.35, gamma=0.5, stone_warmup_fraction=0.0)
    full = make("blockkd", **opts)
    d = make("blockkd", num_stones=2, **opts)
    assert d.stone_ids == [1, 2] and d.stone_weights == [0.5, 1.0] and len(d.connectors) == 2
    # the same modules under the full model's keys, shifted by one stone
    state = {k.replace("connectors.0.", "connectors.x.").replace("connectors.1.", "connectors.0.")
             .replace("connectors.2.", "connectors.1."): v for k, v in full.state_dict().items()}
    d.load_state_dict({k: v for k, v in state.items() if not k.startswith("connectors.x.")})
    full.eval(), d.eval()
    x, y = batch(6)
    with torch.no_grad():
        out, ref = d.eval_logits(x), full.eval_logits(x)
        assert list(out) == ["student", "stone2", "stone3", "ensemble"]
        for key in ("student", "stone2", "stone3"):
            assert torch.allclose(out[key], ref[key], atol=1e-6)
        assert torch.allclose(out["ensemble"], (ref["stone2"] + ref["stone3"]) / 2, atol=1e-6)
        logits, losses = d.forward_train(x, y, epoch=1.0)
        t = d.teacher(x)
    div, stones = reference_divergence("kl", False, 4.0), [out["stone2"], out["stone3"]]
    ens = torch.stack(stones).mean(0)
    ce = lambda z: F.cross_entropy(z.double(), y)
    expected = 0.35 * (ce(logits) + 0.5 * ce(stones[0]) + ce(stones[1])) \
        + 0.35 * (div(logits, t, y) + 0.5 * div(stones[0], t, y) + div(stones[1], t, y)) \
        + 0.5 * (div(logits, ens, y) + sum(div(z, ens, y) for z in stones))
    assert sum(losses.values()).item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(d.diagnostics(x, y, epoch=1.0)) == {"grad_norm_student", "grad_norm_stone2", "grad_norm_stone3"}


def test_num_stones_with_shares():
    """With num_stones the shares and the whole-batch stones range over the stones that exist."""
    d = lite3(num_stones=2)
    assert d.plan.share_sizes(6) == [3, 3] and d.plan.batch_sizes(6) == [3, 3]
    rows = d.plan.rows(6)
    assert len(rows) == 2 and sorted(torch.cat(rows).tolist()) == list(range(6))
    whole = lite3(num_stones=2, whole_batch_stones=1)
    assert whole.plan.batch_sizes(6) == [3, 6]
    x, y = batch(6)
    _, losses = d.train()(x, y, epoch=1.0)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.connectors.parameters())
    assert make("blockkd", num_stones=4).stone_ids == [0, 1, 2]  # at most the n there are
    with pytest.raises(BlockKDError, match="whole_batch_stones"):
        make("blockkd-lite", num_stones=1, whole_batch_stones=2)


def test_num_stones_split_objective_is_unbiased():
    """Over every permutation of a batch of 4 (stones 2 and 3, shares of 2 and 2), the stones' terms average
    to those of full Block-KD with the same num_stones."""
    opts = dict(gamma=0.5, num_stones=2, stone_warmup_fraction=0.0)
    split = lite3(**opts)
    assert split.plan.share_sizes(4) == [2, 2]
    x, y, ref, stones, s_logits = _full_twin(split, opts)
    with torch.no_grad():
        draws = _every_draw(split, x, y)
        for k in ("loss_task_stones", "loss_distill_stones"):
            assert _mean_over(draws, k) == pytest.approx(ref[k].item(), rel=1e-5)
        expected = sum(b / 4 * split.d(s_logits, z).item() for b, z in zip([2, 2], stones))
        assert _mean_over(draws, "loss_cross") == pytest.approx(0.5 * expected, rel=1e-5)
