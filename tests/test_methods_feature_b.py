"""Feature distillers OFD, ReviewKD, CRD, VID; pre-ReLU block features; the MobileNetV1 zoo model.

Loss formulas are checked against independent computations (explicit loops, float64) on small fixed
tensors; each method trains one full step on a homogeneous, a heterogeneous and a torchvision pair.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import blockkd
from blockkd.blocks import match, split
from blockkd.errors import BlockKDError
from blockkd.methods.crd import ContrastMemory, nce_loss
from blockkd.methods.ofd import bn_margin, gaussian_margin, ofd_partial_l2
from blockkd.methods.reviewkd import hcl
from blockkd.methods.vid import vid_nll
import helpers
from helpers import step_kwargs

SMALL = {"crd": {"num_data": 64, "nce_k": 16}}  # a small bank keeps the CRD tests fast
EXTRA = {"ofd": ["connectors."], "reviewkd": ["abfs."], "vid": ["regressors.", "log_scales."],
         "crd": ["embed_s.", "embed_t."]}
BUFFERS = {"ofd": ["margin0"], "reviewkd": [], "vid": [],
           "crd": ["contrast.memory_s", "contrast.memory_t", "contrast.labels", "contrast.z", "contrast.step"]}
METHODS = list(EXTRA)  # the methods with modules of their own; EXTRA and BUFFERS say which


def create(name, num_classes=10):
    return blockkd.models.create(name, num_classes=num_classes)  # torchvision.<name> included


def make(method, teacher="resnet32x4", student="resnet8x4", shape=(3, 64, 64), **options):
    return helpers.make(method, student, teacher, shape=shape, **{**SMALL.get(method, {}), **options})


# ----------------------------------------------------------------------------------- pre-ReLU features
def named_bn(model, point):
    names = {id(m): k for k, m in model.named_modules()}
    return None if point is None or point.bn is None else names[id(point.bn)]


@pytest.mark.parametrize("name,shape,bns", [
    # The BN before each stage's final ReLU, as mdistiller's get_bn_before_relu (resnet8x4: the branch's
    # bn2, not the projection shortcut's BN, which runs after it).
    ("resnet8x4", (3, 32, 32), ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),
    ("resnet20", (3, 32, 32), ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"]),
    ("ResNet18", (3, 32, 32), ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"]),
    ("ResNet50", (3, 32, 32), ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"]),
    ("ShuffleV1", (3, 32, 32), ["layer1.3.bn3", "layer2.7.bn3", "layer3.3.bn3"]),
    ("vgg8", (3, 32, 32), ["block0.1", "block1.1", "block2.1", "block4.1"]),
    ("torchvision.resnet18", (3, 64, 64), ["layer1.1.bn2", "layer2.1.bn2", "layer3.1.bn2", "layer4.1.bn2"]),
    ("torchvision.resnet50", (3, 64, 64), ["layer1.2.bn3", "layer2.3.bn3", "layer3.5.bn3", "layer4.2.bn3"]),
])
def test_preact_features_are_exact_for_relu_ended_blocks(name, shape, bns):
    model = create(name).eval()
    view = split(model)
    points = view.preact_points(shape)
    assert all(p is not None for p in points)
    assert [named_bn(model, p) for p in points] == bns
    x = torch.randn(2, *shape)
    with torch.no_grad():
        post, logits = view.features(x)
        pre, logits_pre = view.features(x, preact=True)
    assert torch.equal(logits, logits_pre) and torch.equal(logits, model(x))
    for a, b in zip(pre, post):
        assert torch.equal(torch.relu(a), b)
        assert (a < 0).any()  # really before the ReLU


@pytest.mark.parametrize("name,relu_ended,bns", [
    # WRN: pre-activation blocks, the residual stream between stages has no ReLU; the last stage ends in bn1+relu.
    ("wrn_16_2", [False, False, True], [None, None, "bn1"]),
    # MobileNetV2: linear bottlenecks, except the last stage, which ends in conv2 (conv+BN+ReLU).
    ("MobileNetV2", [False, False, False, True], [None, None, None, "conv2.1"]),
])
def test_blocks_without_a_final_relu_give_their_output(name, relu_ended, bns):
    model = create(name).eval()
    view = split(model)
    points = view.preact_points((3, 32, 32))
    assert [p is not None for p in points] == relu_ended
    assert [named_bn(model, p) for p in points] == bns
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        post, _ = view.features(x)
        pre, _ = view.preact_features(x)
    for a, b, ended in zip(pre, post, relu_ended):
        assert torch.equal(torch.relu(a) if ended else a, b)


def test_preact_features_train_mode_gradients_and_modes():
    model = create("resnet8x4").train()
    view = split(model)
    pre, logits = view.preact_features(torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())  # the probe restored the modes
    (sum(f.sum() for f in pre) + logits.sum()).backward()
    assert model.conv1.weight.grad is not None
    post, _ = split(model).features(torch.randn(2, 3, 32, 32))  # the plain path is untouched
    assert len(post) == 3


# ------------------------------------------------------------------------------------ loss formulas
def phi(z):
    return math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_ofd_margin_is_the_truncated_gaussian_mean():
    mean = torch.tensor([0.0, 1.0, -0.5, 10.0, 0.3])
    std = torch.tensor([1.0, 2.0, -0.7, 1.0, 0.0])  # a negative γ counts by its magnitude; 10σ: no mass
    got = gaussian_margin(mean, std)
    for m, s, g in zip(mean.tolist(), std.tolist(), got.tolist()):
        s = max(abs(s), 1e-12)
        p = cdf(-m / s)
        want = m - s * phi(-m / s) / p if p > 0.001 else -3 * s
        assert g == pytest.approx(want, rel=1e-5, abs=1e-6)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.copy_(std)
        bn.bias.copy_(mean)
    assert torch.equal(bn_margin(bn), got)


def test_ofd_partial_l2_matches_the_three_cases():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    margin = torch.tensor([-0.5, -1.0, -0.2])
    total = 0.0
    for b in range(2):
        for c in range(3):
            m = margin[c].item()
            for h in range(2):
                for w in range(2):
                    sv, tv = s[b, c, h, w].item(), t[b, c, h, w].item()
                    if tv > 0:  # positive teacher response: plain L2
                        total += (sv - tv) ** 2
                    elif tv > m:  # small negative response: only where the student is above it
                        total += (sv - tv) ** 2 if sv > tv else 0.0
                    else:  # below the margin: the margin is the target, only where the student is above
                        total += (sv - m) ** 2 if sv > m else 0.0
    assert ofd_partial_l2(s, t, margin).item() == pytest.approx(total / 2, rel=1e-5)


def pool_mean(x, l):
    """Adaptive average pooling to l x l, written out (float64), for maps divisible by l."""
    n, c, h, w = x.shape
    out = torch.zeros(n, c, l, l, dtype=torch.float64)
    for i in range(l):
        for j in range(l):
            out[:, :, i, j] = x[:, :, i * h // l:(i + 1) * h // l, j * w // l:(j + 1) * w // l].double().mean((2, 3))
    return out


def test_reviewkd_hcl_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    terms = [((s.double() - t.double()) ** 2).mean().item()]
    weights = [1.0]
    for l in (4, 2, 1):
        terms.append(((pool_mean(s, l) - pool_mean(t, l)) ** 2).mean().item())
        weights.append(weights[-1] / 2)
    want = sum(w * v for w, v in zip(weights, terms)) / sum(weights)
    assert hcl(s, t).item() == pytest.approx(want, rel=1e-5)
    # A 4x4 map skips the 4x4 level; a 1x1 map has only the plain MSE.
    s4, t4 = s[:, :, :4, :4], t[:, :, :4, :4]
    terms = [((s4.double() - t4.double()) ** 2).mean().item()] + [
        ((pool_mean(s4, l) - pool_mean(t4, l)) ** 2).mean().item() for l in (2, 1)]
    assert hcl(s4, t4).item() == pytest.approx((terms[0] + terms[1] / 2 + terms[2] / 4) / 1.75, rel=1e-5)
    s1, t1 = s[:, :, :1, :1], t[:, :, :1, :1]
    assert hcl(s1, t1).item() == pytest.approx(((s1.double() - t1.double()) ** 2).mean().item(), rel=1e-6)


def test_vid_nll_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    mu, t = torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    alpha = torch.tensor([0.5, -1.0, 2.0])
    eps = 1e-5
    total, count = 0.0, 0
    for b in range(2):
        for c in range(3):
            var = math.log(1 + math.exp(alpha[c].item())) + eps
            for h in range(2):
                for w in range(2):
                    total += 0.5 * ((mu[b, c, h, w].item() - t[b, c, h, w].item()) ** 2 / var + math.log(var))
                    count += 1
    assert vid_nll(mu, t, alpha, eps).item() == pytest.approx(total / count, rel=1e-5)


def test_vid_variance_starts_at_init_pred_var():
    d = make("vid", shape=(3, 32, 32), init_pred_var=3.0)
    for alpha in d.log_scales:
        assert torch.allclose(F.softplus(alpha) + d.opts.eps, torch.full_like(alpha, 3.0))


def test_crd_nce_loss_matches_hand_computation():
    scores = torch.tensor([[0.9, 0.1, 0.3, 0.05], [0.2, 0.4, 0.01, 0.6]])
    n, k, eps = 50, 3, 1e-7
    pn = 1.0 / n
    total = 0.0
    for row in scores.tolist():
        total += math.log(row[0] / (row[0] + k * pn + eps))
        total += sum(math.log(k * pn / (p + k * pn + eps)) for p in row[1:])
    assert nce_loss(scores, n).item() == pytest.approx(-total / 2, rel=1e-5)


def test_crd_memory_scores_normaliser_and_momentum_update():
    torch.manual_seed(0)
    mem = ContrastMemory(dim=4, num_data=10, k=3, temperature=0.5, momentum=0.25, seed=0)
    bank_s, bank_t = mem.memory_s.clone().double(), mem.memory_t.clone().double()
    v_s, v_t = F.normalize(torch.randn(2, 4), dim=1), F.normalize(torch.randn(2, 4), dim=1)
    index, y = torch.tensor([3, 7]), torch.tensor([0, 1])
    rows = mem.draw(index, y, exact=False)
    out_s, out_t = mem(v_s, v_t, index, y, exact=False)
    assert rows[:, 0].tolist() == [3, 7]
    raw_s = [[math.exp(sum(a * b for a, b in zip(bank_t[j].tolist(), v_s[i].tolist())) / 0.5) for j in rows[i].tolist()]
             for i in range(2)]
    z_s = sum(map(sum, raw_s)) / 8 * 10  # Z = mean score · N, set on the first step
    assert out_s.double().flatten().tolist() == pytest.approx([r / z_s for row in raw_s for r in row], rel=1e-5)
    assert mem.z[0].item() == pytest.approx(z_s, rel=1e-5)
    for i, j in enumerate(index.tolist()):
        for bank, old, v in ((mem.memory_s, bank_s, v_s), (mem.memory_t, bank_t, v_t)):
            mixed = [0.25 * a + 0.75 * b for a, b in zip(old[j].tolist(), v[i].tolist())]
            norm = math.sqrt(sum(m * m for m in mixed))
            assert bank[j].tolist() == pytest.approx([m / norm for m in mixed], rel=1e-5)
    assert mem.labels[3].item() == 0 and mem.labels[7].item() == 1 and mem.step.item() == 1


@pytest.mark.parametrize("exact", [True, False])
def test_crd_negatives_are_other_classes_with_replacement_when_few(exact):
    mem = ContrastMemory(dim=4, num_data=20, k=500, temperature=0.07, momentum=0.5, seed=0)
    mem.labels.copy_(torch.arange(20) % 3)
    mem.labels[19] = -1  # not seen yet: counts as another class
    index, y = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    rows = mem.draw(index, y, exact)
    assert (mem.labels[rows[:, 1:]] != y[:, None]).all()
    for i in range(3):  # more negatives than other-class samples: every one of them is drawn
        allowed = {j for j in range(20) if mem.labels[j].item() != y[i].item()}
        assert set(rows[i, 1:].tolist()) == allowed
    if exact:
        assert torch.equal(rows[:, 0], index)
    else:
        assert torch.equal(mem.labels[rows[:, 0]], y)
    assert torch.equal(rows, mem.draw(index, y, exact))  # the step seeds the draw


def test_crd_negatives_without_replacement_never_same_class_or_self():
    mem = ContrastMemory(dim=4, num_data=40, k=20, temperature=0.07, momentum=0.5, seed=0)
    mem.labels.copy_(torch.arange(40) % 2)
    mem.labels[5] = -1  # sample 5 not recorded yet: still never its own negative
    index, y = torch.tensor([0, 5, 7]), torch.tensor([0, 1, 1])
    rows = mem.draw(index, y, exact=True)
    for i in range(3):
        neg = rows[i, 1:].tolist()
        assert len(set(neg)) == 20 and index[i].item() not in neg
        assert all(mem.labels[j].item() != y[i].item() for j in neg)
    assert not torch.equal(rows, mem.draw(index, y, exact=True, rank=1))  # ranks draw independently


# ------------------------------------------------------------------------------------ one full step
PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "MobileNetV2"), ("torchvision.resnet34", "torchvision.resnet18")]


@pytest.mark.parametrize("teacher,student", PAIRS)
@pytest.mark.parametrize("method", METHODS)
def test_one_training_step(method, teacher, student):
    d = make(method, teacher, student).train()
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    params = list(d.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    logits, losses = d(x, y, epoch=25.0, **step_kwargs(d, 4))
    assert logits.shape == (4, 10)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    opt.zero_grad()
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    extra = [(n, p) for n, p in d.named_parameters() if any(n.startswith(e) for e in EXTRA[method])]
    assert extra
    for n, p in extra:
        assert p.grad is not None, n
    student_before = [p.detach().clone() for p in d.student.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(student_before, d.student.parameters()))
    assert all(torch.equal(v, d.teacher.state_dict()[k]) for k, v in teacher_before.items())
    d.eval()
    assert torch.equal(d(x), d.student(x))


@pytest.mark.filterwarnings("ignore:OFD")  # WRN: margins from data at blocks 1-2 (tested below)
@pytest.mark.parametrize("teacher,student", [("resnet32x4", "ShuffleV1"), ("wrn_40_2", "wrn_16_2")])
@pytest.mark.parametrize("method", METHODS)
def test_more_pairs_train_at_cifar_size(method, teacher, student):
    d = make(method, teacher, student, shape=(3, 32, 32)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _, losses = d(x, y, epoch=25.0, **step_kwargs(d, 2))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in d.teacher.parameters())


def test_reviewkd_student_preact_option():
    d = make("reviewkd", shape=(3, 32, 32), student_preact=True).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _, losses = d(x, y, epoch=25.0)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.abfs.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_extra_modules_and_buffers_are_in_the_train_state(method):
    d = make(method, shape=(3, 32, 32))
    state = d.train_state_dict()
    assert not any(k.startswith("teacher.") for k in state)
    for prefix in EXTRA[method] + BUFFERS[method]:
        assert any(k.startswith(prefix) for k in state), prefix
    trainable = {id(p) for p in d.trainable_parameters()}
    assert all(id(p) in trainable for n, p in d.named_parameters() if any(n.startswith(e) for e in EXTRA[method]))


@pytest.mark.parametrize("method,bad,match_text", [
    ("ofd", {"kernel_size": 2}, "kernel_size"),
    ("reviewkd", {"warmup": -1}, "warmup"),
    ("crd", {"nce_k": 64, "num_data": 64}, "nce_k"),
    ("vid", {"init_pred_var": 0}, "init_pred_var"),
])
def test_bad_option_is_refused(method, bad, match_text):
    with pytest.raises(BlockKDError, match=match_text):
        make(method, shape=(3, 32, 32), **bad)


def test_reviewkd_warmup_ramps_the_hcl_term():
    d = make("reviewkd", shape=(3, 32, 32)).train()
    d.eval()  # BN in eval mode: the two passes see the same features
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    _, early = d.forward_train(x, y, epoch=5.0)
    _, late = d.forward_train(x, y, epoch=40.0)
    assert early["loss_reviewkd"].item() == pytest.approx(late["loss_reviewkd"].item() / 4, rel=1e-4)
    assert d.opts.weight == 1.0 and d.opts.warmup == 20.0


def test_ofd_margins_from_bn_and_fallback_from_data():
    d = make("ofd", shape=(3, 32, 32))
    t_points = d._views[1].preact_points()
    for i, p in enumerate(t_points):
        assert torch.equal(getattr(d, f"margin{i}"), bn_margin(p.bn))
    with pytest.warns(UserWarning, match="block\\(s\\) \\[1, 2\\]"):
        w = make("ofd", "wrn_40_2", "wrn_16_2", shape=(3, 32, 32)).train()
    assert torch.isnan(w.margin0).all() and not torch.isnan(w.margin2).any()
    w(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert not torch.isnan(w.margin0).any() and (w.margin0 < 0).all()


def test_crd_needs_the_index_and_resumes_exactly():
    d = make("crd", shape=(3, 32, 32)).train()
    assert d.needs_index
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with pytest.raises(BlockKDError, match="index"):
        d(x, y)
    with pytest.raises(BlockKDError, match="num_data"):
        d(x, y, index=torch.tensor([0, 1, 2, 64]))
    d.eval()  # BN in eval mode so that two distillers agree exactly
    d.training = True
    d(x, y, index=torch.arange(4))
    saved = {k: v.clone() for k, v in d.train_state_dict().items()}
    _, first = d(x, y, index=torch.arange(4, 8))
    other = make("crd", shape=(3, 32, 32))
    other.load_train_state_dict(saved)
    other.teacher.load_state_dict(d.teacher.state_dict())
    other.eval()
    other.training = True
    _, second = other(x, y, index=torch.arange(4, 8))
    assert first["loss_crd"].item() == pytest.approx(second["loss_crd"].item(), rel=1e-6)
    assert torch.equal(d.contrast.memory_s, other.contrast.memory_s)


def test_crd_distributed_path_single_process(tmp_path):
    import torch.distributed as dist
    d = make("crd", shape=(3, 32, 32)).eval()
    d.training = True
    ref = make("crd", shape=(3, 32, 32)).eval()
    ref.load_train_state_dict(d.train_state_dict())
    ref.teacher.load_state_dict(d.teacher.state_dict())
    ref.training = True
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    _, want = ref(x, y, index=torch.arange(4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _, got = d(x, y, index=torch.arange(4))
    finally:
        dist.destroy_process_group()
    assert got["loss_crd"].item() == pytest.approx(want["loss_crd"].item(), rel=1e-6)
    assert torch.equal(d.contrast.memory_t, ref.contrast.memory_t)


# ------------------------------------------------------------------------------------ MobileNetV1
def mobilenet_v1_reference_keys_and_params(num_classes=1000):
    """mdistiller's ImageNet MobileNetV1 written out: conv_bn(3, 32, 2), 13 conv_dw, AvgPool2d(7), fc."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["model.0.0.weight"] + [f"model.0.1.{k}" for k in bn]
    params = 3 * 32 * 9 + 2 * 32
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    for i, (cin, cout) in enumerate(zip(widths, widths[1:]), start=1):
        keys += [f"model.{i}.0.weight"] + [f"model.{i}.1.{k}" for k in bn]
        keys += [f"model.{i}.3.weight"] + [f"model.{i}.4.{k}" for k in bn]
        params += cin * 9 + 2 * cin + cin * cout + 2 * cout
    keys += ["fc.weight", "fc.bias"]
    params += 1024 * num_classes + num_classes
    return keys, params


def test_mobilenet_v1_has_the_original_keys_and_size():
    model = blockkd.models.create("MobileNetV1", num_classes=1000)
    keys, params = mobilenet_v1_reference_keys_and_params()
    assert list(model.state_dict()) == keys
    assert blockkd.models.num_params(model) == params == 4_231_976  # the published ~4.2M
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_mobilenet_v1_blocks_pair_with_resnet50():
    model = blockkd.models.create("MobileNetV1", num_classes=10).eval()
    view = split(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(view(x), model(x))
    assert [s[0] for s in view.probe((3, 64, 64))] == [128, 256, 512, 1024]
    # Each stage ends in a pointwise conv + BN + ReLU: that BN is mdistiller's get_bn_before_relu.
    assert [named_bn(model, p) for p in view.preact_points((3, 64, 64))] == [
        "model.3.4", "model.5.4", "model.11.4", "model.13.4"]
    s_view, t_view = match(model, create("torchvision.resnet50"), (3, 64, 64))
    assert len(s_view) == len(t_view) == 4
