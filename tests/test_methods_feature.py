"""Feature- and relation-based methods (FitNets, AT, SP, RKD, PKT, NST, KD-SVD, DIST).

Each loss is checked against its paper's formula written out independently (float64, explicit loops,
other ops); each method trains one step on a same-family pair, a heterogeneous pair and a torchvision
pair; extra modules are trained and saved; bad options are refused; every recipe loads.
"""
import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

import blockkd
from blockkd import config
from blockkd.errors import BlockKDError
from blockkd.methods.at import at_loss
from blockkd.methods.dist import dist_parts
from blockkd.methods.feature import embedding
from blockkd.methods.fitnet import hint_loss
from blockkd.methods.kdsvd import _SVD, kdsvd_loss
from blockkd.methods.nst import nst_loss
from blockkd.methods.pkt import pkt_loss
from blockkd.methods.rkd import rkd_angle_loss, rkd_distance_loss
from blockkd.methods.sp import sp_loss
from helpers import step_kwargs

# The methods of the modules whose losses this file checks (the other methods have files of their own; every
# method goes through tests/test_method_contract.py).
FEATURE_METHODS = [m for m in blockkd.methods.names() if blockkd.methods.get(m).__module__ in {
    f.__module__ for f in (at_loss, dist_parts, hint_loss, kdsvd_loss, nst_loss, pkt_loss, rkd_angle_loss, sp_loss)}]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def nested(t):
    """A tensor as nested Python floats (the references below never touch torch ops)."""
    return t.double().tolist()


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


def block_mean(f, size):
    """Average-pool (B, C, H, W) nested lists to size x size by explicit block means (integer factor)."""
    out = []
    for sample in f:
        chans = []
        for ch in sample:
            r = len(ch) // size
            chans.append([[sum(ch[y * r + i][x * r + j] for i in range(r) for j in range(r)) / (r * r)
                           for x in range(size)] for y in range(size)])
        out.append(chans)
    return out


# ------------------------------------------------------------------------------------ (a) formulas
def test_fitnet_hint_is_mean_squared_error():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    ref = sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)
    assert hint_loss(a, b).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_matches_paper_formula(p):
    fs, ft = torch.randn(2, 3, 4, 4), torch.relu(torch.randn(2, 5, 2, 2))  # student map pooled to 2x2
    s, t = block_mean(nested(fs), 2), nested(ft)
    total, count = 0.0, 0
    for s_i, t_i in zip(s, t):
        def amap(f):
            q = [sum(abs(f[c][y][x]) ** p for c in range(len(f))) / len(f) for y in range(2) for x in range(2)]
            n = math.sqrt(sum(v * v for v in q))
            return [v / n for v in q]
        for u, v in zip(amap(s_i), amap(t_i)):
            total += (u - v) ** 2
            count += 1
    assert at_loss(fs, ft, p).item() == pytest.approx(total / count, rel=1e-5)


def test_sp_matches_paper_formula():
    fs, ft = torch.randn(4, 3, 2, 2), torch.randn(4, 6, 1, 1)
    s, t = [r for r in nested(fs.flatten(1))], [r for r in nested(ft.flatten(1))]

    def gram(q):
        g = [[dot(a, b) for b in q] for a in q]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    ref = sum((gt[i][j] - gs[i][j]) ** 2 for i in range(4) for j in range(4)) / 16
    assert sp_loss(fs, ft).item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_distance_matches_paper_formula(squared):
    es, et = torch.randn(5, 4), torch.randn(5, 7) * 3
    s, t = nested(es), nested(et)

    def dists(e):
        d = [[math.dist(a, b) ** (2 if squared else 1) if i != j else 0.0 for j, b in enumerate(e)]
             for i, a in enumerate(e)]
        mu = sum(d[i][j] for i in range(5) for j in range(5) if i != j) / 20
        return [[v / mu for v in row] for row in d]

    ds, dt = dists(s), dists(t)
    ref = sum(huber(ds[i][j] - dt[i][j]) for i in range(5) for j in range(5)) / 25
    assert rkd_distance_loss(es, et, squared).item() == pytest.approx(ref, rel=1e-5)


def test_rkd_angle_matches_paper_formula():
    es, et = torch.randn(4, 3), torch.randn(4, 6)
    s, t = nested(es), nested(et)

    def cosines(e):
        out = {}
        for i, j, k in itertools.product(range(4), repeat=3):
            u = [a - b for a, b in zip(e[j], e[i])]
            v = [a - b for a, b in zip(e[k], e[i])]
            nu, nv = math.sqrt(dot(u, u)), math.sqrt(dot(v, v))
            out[i, j, k] = dot(u, v) / (nu * nv) if nu > 0 and nv > 0 else 0.0
        return out

    cs, ct = cosines(s), cosines(t)
    ref = sum(huber(cs[key] - ct[key]) for key in cs) / len(cs)
    assert rkd_angle_loss(es, et).item() == pytest.approx(ref, rel=1e-5)


def test_pkt_matches_paper_formula():
    es, et = torch.randn(5, 4), torch.randn(5, 8)
    eps = 1e-7

    def probs(e):
        e = [[x / (math.sqrt(dot(r, r)) + eps) for x in r] for r in nested(e)]
        k = [[(dot(a, b) + 1) / 2 for b in e] for a in e]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(es), probs(et)
    ref = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(5) for j in range(5)) / 25
    assert pkt_loss(es, et).item() == pytest.approx(ref, rel=1e-4)


def test_nst_matches_paper_formula():
    fs, ft = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)  # student map pooled to 2x2
    s, t = block_mean(nested(fs), 2), nested(ft)

    def unit_channels(f):
        rows = [[v for row in ch for v in row] for ch in f]
        return [[v / math.sqrt(dot(r, r)) for v in r] for r in rows]

    def mean_kernel(a_all, b_all):
        vals = [dot(a, b) ** 2 for A, B in zip(a_all, b_all) for a in A for b in B]
        return sum(vals) / len(vals)

    S, T = [unit_channels(f) for f in s], [unit_channels(f) for f in t]
    ref = mean_kernel(T, T) + mean_kernel(S, S) - 2 * mean_kernel(S, T)
    assert nst_loss(fs, ft).item() == pytest.approx(ref, rel=1e-4, abs=1e-7)


def _ref_right_singular(f, n):
    """Top-n (values, vectors) of each sample's (C·H, W) matrix via the eigenvectors of XᵀX in float64,
    values L2-normalised over the n, each vector's largest entry made positive."""
    b, c, h, w = f.shape
    out = []
    for x in f.double().reshape(b, c * h, w):
        evals, evecs = torch.linalg.eigh(x.t() @ x)
        order = evals.argsort(descending=True)[:n]
        sv = evals[order].clamp_min(0).sqrt().tolist()
        vecs = []
        for col in evecs[:, order].t().tolist():
            big = max(col, key=abs)
            vecs.append([v if big > 0 else -v for v in col])
        norm = math.sqrt(sum(v * v for v in sv))
        out.append(([v / norm for v in sv], vecs))
    return out


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_matches_paper_formula(k):
    g_s = [torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4)]
    g_t = [torch.rand(2, 5, 8, 8), torch.rand(2, 6, 4, 4)]
    total, prev = 0.0, None
    for f_s, f_t in zip(g_s, g_t):
        teacher, student = _ref_right_singular(f_t, k), _ref_right_singular(f_s, k + 3)
        cur = []
        for (s_t, v_t), (_, v_s) in zip(teacher, student):
            aligned = []
            for vt in v_t:  # each teacher vector picks the most collinear student vector, signed
                cos = [dot(vs, vt) for vs in v_s]
                j = max(range(len(cos)), key=lambda i: abs(cos[i]))
                aligned.append([math.copysign(1, cos[j]) * v for v in v_s[j]])
            cur.append(([[s * v for v in vec] for s, vec in zip(s_t, aligned)],
                        [[s * v for v in vec] for s, vec in zip(s_t, v_t)]))
        if prev is not None:
            for (vs, vt), (ps, pt) in zip(cur, prev):
                for m in range(k):
                    for a in range(len(vs[m])):
                        for c in range(len(ps[m])):
                            rs = math.exp(-(vs[m][a] - ps[m][c]) ** 2 / 8)
                            rt = math.exp(-(vt[m][a] - pt[m][c]) ** 2 / 8)
                            total += (rs - rt) ** 2
        prev = cur
    assert kdsvd_loss(g_s, g_t, k).item() == pytest.approx(total / 2, rel=1e-3, abs=1e-8)


def test_kdsvd_does_not_depend_on_singular_vector_signs():
    g_s = [torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4)]
    g_t = [torch.rand(2, 5, 8, 8), torch.rand(2, 6, 4, 4)]
    flipped = [torch.flip(g, dims=[0]) for g in g_s], [torch.flip(g, dims=[0]) for g in g_t]
    assert kdsvd_loss(g_s, g_t).item() == pytest.approx(kdsvd_loss(*flipped).item(), rel=1e-4)


def _top_svd(svd, a, k=2):
    """A function of the top k singular values and vectors only, invariant to the vectors' signs."""
    u, s, v = svd(a)
    return s[..., :k], v[..., :k] @ v[..., :k].mT, u[..., :k] @ u[..., :k].mT


def _torch_svd(a):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u, s, vh.mT


@pytest.mark.parametrize("shape", [(3, 12, 6), (3, 5, 9)])
def test_kdsvd_svd_gradient_is_torchs_where_that_is_finite(shape):
    a = torch.randn(*shape, dtype=torch.double, requires_grad=True)
    weights = [torch.randn_like(t) for t in _top_svd(_torch_svd, a)]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(_top_svd(svd, a), weights)), a)[0]
             for svd in (_torch_svd, _SVD.apply)]
    assert torch.allclose(*grads, atol=1e-10)
    assert torch.autograd.gradcheck(lambda a: _top_svd(_SVD.apply, a), (a,))


def test_kdsvd_svd_gradient_is_finite_and_right_on_a_rank_deficient_map():
    """Two zero columns: repeated zero singular values, where torch's own backward gives NaN (0/0); the top
    vectors' gradient is still well defined, and ours matches finite differences (the TF original's fix)."""
    a = torch.randn(3, 12, 6, dtype=torch.double)
    a[..., 4:] = 0
    a.requires_grad_()
    top = lambda svd: _top_svd(svd, a)[:2]  # noqa: E731
    weights = [torch.randn_like(t) for t in top(_torch_svd)]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(top(svd), weights)), a)[0]
             for svd in (_torch_svd, _SVD.apply)]
    assert not grads[0].isfinite().all() and grads[1].isfinite().all()
    assert torch.autograd.gradcheck(lambda a: _top_svd(_SVD.apply, a)[:2], (a,))
    # and through the loss: a student whose last map is rank-deficient gets finite gradients
    f_s = [torch.rand(2, 3, 8, 8), torch.rand(2, 4, 4, 4)]
    f_s[1][..., 2:] = 0
    f_s = [f.requires_grad_() for f in f_s]
    kdsvd_loss(f_s, [torch.rand(2, 5, 8, 8), torch.rand(2, 6, 4, 4)]).backward()
    assert all(f.grad.isfinite().all() for f in f_s)


def test_dist_matches_paper_formula():
    zs, zt = torch.randn(5, 6), torch.randn(5, 6) * 2
    tau = 4.0

    def softmax_rows(z):
        rows = []
        for r in nested(z):
            e = [math.exp(v / tau) for v in r]
            rows.append([v / sum(e) for v in e])
        return rows

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))

    ys, yt = softmax_rows(zs), softmax_rows(zt)
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / 5
    intra = 1 - sum(pearson([r[c] for r in ys], [r[c] for r in yt]) for c in range(6)) / 6
    got_inter, got_intra = dist_parts(zs, zt, tau)
    assert got_inter.item() == pytest.approx(inter * tau ** 2, rel=1e-4)
    assert got_intra.item() == pytest.approx(intra * tau ** 2, rel=1e-4)


# ------------------------------------------------------------------------ (b) one training step
PAIRS = {
    "resnet32x4->resnet8x4": ("resnet32x4", "resnet8x4", (3, 32, 32), 100),
    "vgg13->MobileNetV2": ("vgg13", "MobileNetV2", (3, 32, 32), 100),
    "torchvision.resnet34->resnet18": ("torchvision.resnet34", "torchvision.resnet18", (3, 64, 64), 10),
}
_MODELS: dict = {}


def models(pair):
    """(student copy, shared frozen teacher): models are built once per pair, students copied per test."""
    if pair not in _MODELS:
        t, s, shape, nc = PAIRS[pair]
        _MODELS[pair] = (blockkd.models.create(s, num_classes=nc), blockkd.models.create(t, num_classes=nc))
    student, teacher = _MODELS[pair]
    return copy.deepcopy(student), teacher


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_one_training_step(method, pair):
    _, _, shape, nc = PAIRS[pair]
    student, teacher = models(pair)
    d = blockkd.methods.create(method, student, teacher, input_shape=shape)
    d.train()
    assert not d.teacher.training
    x, y = torch.randn(4, *shape), torch.randint(0, nc, (4,))
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    params = list(d.trainable_parameters())
    ids = {id(p) for p in params}
    assert all(id(p) in ids for p in student.parameters())
    assert not any(id(p) in ids for p in teacher.parameters())
    extra = [p for n, p in d.named_parameters() if not n.startswith(("student.", "teacher."))]
    assert all(id(p) in ids for p in extra)

    logits, losses = d(x, y, epoch=25.0, **step_kwargs(d, 4))  # after any warm-up
    assert logits.shape == (4, nc)
    assert losses and all(k.startswith("loss_") for k in losses)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values()), losses

    # The distillation terms alone reach the student (and the extra modules), never the teacher.
    distill = sum(v for k, v in losses.items() if k != "loss_ce")
    distill.backward(retain_graph=True)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), method
    for p in extra:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert all(p.grad is None for p in teacher.parameters())

    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opt.zero_grad()
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    before = [p.detach().clone() for p in student.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters()))
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    d.eval()
    assert d(x).shape == (4, nc)


def test_feature_points_are_mdistillers_on_cifar_resnets():
    """AT/NST/KD-SVD read each stage's output (mdistiller's feats[1:]), RKD/PKT what the classifier sees."""
    student, teacher = models("resnet32x4->resnet8x4")
    seen = {}

    def keep(name):
        return lambda module, args, out: seen.__setitem__(name, out)

    hooks = [getattr(m, f"layer{i}").register_forward_hook(keep(f"{who}{i}"))
             for who, m in (("s", student), ("t", teacher)) for i in (1, 2, 3)]
    hooks += [m.fc.register_forward_pre_hook(lambda module, args, who=who: seen.__setitem__(who + "fc", args[0]))
              for who, m in (("s", student), ("t", teacher))]
    try:
        x = torch.randn(2, 3, 32, 32)
        for method in ("at", "rkd"):
            s_feats, _, t_feats, _ = blockkd.methods.create(method, student, teacher).eval().features(x)
            assert all(torch.equal(f, seen[f"s{i}"]) for i, f in zip((1, 2, 3), s_feats))
            assert all(torch.equal(f, seen[f"t{i}"]) for i, f in zip((1, 2, 3), t_feats))
            assert torch.allclose(embedding(s_feats[-1]), seen["sfc"], atol=1e-6)
            assert torch.allclose(embedding(t_feats[-1]), seen["tfc"], atol=1e-6)
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------ (c) extra modules are saved
def test_fitnet_regressor_is_trained_and_saved():
    student, teacher = models("vgg13->MobileNetV2")
    d = blockkd.methods.create("fitnet", student, teacher)
    assert d.hint_index == 1  # the middle of three matched blocks, as mdistiller's HINT_LAYER 2
    assert (d.student_shapes[1], d.teacher_shapes[1]) == ((16, 8, 8), (256, 8, 8))
    state = d.train_state_dict()
    reg = [k for k in state if k.startswith("regressor.")]
    assert reg and not any(k.startswith("teacher.") for k in state)
    assert set(dict(d.regressor.named_parameters())) <= {k.removeprefix("regressor.") for k in reg}
    clone = blockkd.methods.create("fitnet", copy.deepcopy(student), teacher)
    clone.load_train_state_dict(state)
    assert torch.equal(clone.regressor.proj[0].weight, d.regressor.proj[0].weight)


@pytest.mark.parametrize("method", ["at", "sp", "rkd", "pkt", "nst", "kdsvd", "dist"])
def test_methods_without_extra_modules_save_only_the_student(method):
    student, teacher = models("resnet32x4->resnet8x4")
    state = blockkd.methods.create(method, student, teacher).train_state_dict()
    assert set(state) == {f"student.{k}" for k in student.state_dict()}


# ------------------------------------------------------------------------ (d) bad options refused
@pytest.mark.parametrize("method, options, message", [
    ("fitnet", {"hint_block": 0}, "method.options.hint_block"),
    ("fitnet", {"hint_block": 4}, "hint_block must be between 1 and the number of matched blocks"),
    ("fitnet", {"connector": "conv5x5"}, "method.options.connector"),
    ("at", {"p": 0}, "method.options.p"),
    ("sp", {"feat_weight": -1}, "method.options.feat_weight"),
    ("rkd", {"squared": "yes"}, "method.options.squared"),
    ("pkt", {"feat_weight": "big"}, "method.options.feat_weight"),
    ("nst", {"ce_weight": -0.5}, "method.options.ce_weight"),
    ("kdsvd", {"k": 0}, "method.options.k"),
    ("kdsvd", {"k": 1.5}, "method.options.k"),
    ("dist", {"temperature": 0}, "method.options.temperature"),
    ("dist", {"tau": 4}, "did you mean"),
])
def test_bad_options_are_refused(method, options, message):
    student, teacher = models("resnet32x4->resnet8x4")
    with pytest.raises(BlockKDError, match=message):
        blockkd.methods.create(method, student, teacher, **options)


def test_defaults_are_the_published_ones():
    d = blockkd.methods.defaults
    assert d("fitnet") == {"ce_weight": 1.0, "feat_weight": 100.0, "hint_block": None, "connector": "conv1x1_bn_relu"}
    assert d("at") == {"p": 2.0, "ce_weight": 1.0, "feat_weight": 1000.0}
    assert d("sp") == {"ce_weight": 1.0, "feat_weight": 3000.0}
    assert d("rkd") == {"ce_weight": 1.0, "feat_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
                        "squared": False, "eps": 1e-12}
    assert d("pkt") == {"ce_weight": 1.0, "feat_weight": 30000.0}
    assert d("nst") == {"ce_weight": 1.0, "feat_weight": 50.0}
    assert d("kdsvd") == {"k": 1, "ce_weight": 1.0, "feat_weight": 1.0}
    assert d("dist") == {"temperature": 4.0, "beta": 2.0, "gamma": 2.0, "ce_weight": 1.0}
    for m in FEATURE_METHODS:
        assert blockkd.methods.get(m).paper and blockkd.methods.needs_teacher(m)


class _Dense(torch.nn.Module):
    """A model whose blocks output vectors: no feature maps."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x)))


blockkd.blocks.register_splitter(_Dense)(lambda m: ([m.a, m.b], m.fc))


@pytest.mark.parametrize("method", ["fitnet", "at", "nst", "kdsvd"])
def test_map_methods_refuse_models_without_feature_maps(method):
    with pytest.raises(BlockKDError, match="feature maps|cannot bring"):
        blockkd.methods.create(method, _Dense(), _Dense(), input_shape=(3, 8, 8))


@pytest.mark.parametrize("method", ["sp", "rkd", "pkt", "dist"])
def test_relation_methods_serve_models_without_feature_maps(method):
    d = blockkd.methods.create(method, _Dense(), _Dense(), input_shape=(3, 8, 8))
    _, losses = d.train()(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)), epoch=0.0)
    assert all(torch.isfinite(v) for v in losses.values())


# ------------------------------------------------------------------------------------ recipes
CIFAR_PAIRS = sorted(p.name for p in (CONFIGS / "cifar100").iterdir()
                     if p.is_dir() and p.name not in ("teachers", "methods"))


PAIR_OPTIONS = {("vgg13_vgg8", "fitnet"): {"hint_block": 3}}  # mdistiller's HINT_LAYER 2: VGG's block2 (8x8)


# Every method with a recipe in each CIFAR-100 pair folder, but the logit methods, whose recipes test_config.py
# checks (per-pair DKD beta, tuned Block-KD). OWN_KEYS: keys a recipe sets for its pair or data set (mdistiller's
# per-pair ReviewKD weight and its warm-up in epochs; CRD's memory bank, one row per training sample).
LOGIT_METHODS = {"ce", "kd", "dkd", "blockkd", "blockkd-lite"}
PUBLISHED = [m for m in blockkd.methods.names() if m not in LOGIT_METHODS
             and all((CONFIGS / "cifar100" / pair / f"{m}.yaml").is_file() for pair in CIFAR_PAIRS)]
OWN_KEYS = {"reviewkd": {"weight", "warmup"}, "crd": {"num_data", "nce_k"}}


@pytest.mark.parametrize("method", PUBLISHED)
def test_recipes_load_with_the_published_options(method, baseline_sweeps):
    for pair in CIFAR_PAIRS:
        defaults = {**blockkd.methods.defaults(method), **PAIR_OPTIONS.get((pair, method), {})}
        cfg = config.load(CONFIGS / "cifar100" / pair / f"{method}.yaml")
        defaults.update({k: cfg["method"]["options"][k] for k in OWN_KEYS.get(method, ())})
        kd = config.load(CONFIGS / "cifar100" / pair / "kd.yaml")
        teacher, student = kd["teacher"]["name"], kd["model"]["name"]
        assert (cfg["method"]["name"], cfg["model"]["name"], cfg["teacher"]["name"]) == (method, student, teacher)
        assert {**defaults, **cfg["method"]["options"]} == defaults, pair
    fm = config.load(CONFIGS / "fashion_mnist" / f"{method}.yaml")
    assert fm["method"]["name"] == method and fm["data"]["name"] == "fashion_mnist"
    # A Fashion-MNIST recipe differs in one key at most: the distillation weight, once results/tuning-baselines.json
    # holds its sweep on the validation split (test_benchmarks checks the value against it); until then, none.
    own = {baseline_sweeps[method]["key"] if method in baseline_sweeps else None, *OWN_KEYS.get(method, ())}
    assert {k: v for k, v in fm["method"]["options"].items() if k not in own} == {
        k: v for k, v in blockkd.methods.defaults(method).items() if k not in own}
