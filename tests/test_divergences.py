"""Logit divergences (kl, dkd) and logit standardisation, each against its paper's formula written out."""
import math

import pytest
import torch
import torch.nn.functional as F

import blockkd
from blockkd.errors import BlockKDError
from blockkd.methods.divergences import DIVERGENCES, LogitDivergence, standardize
from helpers import SHAPE, make



# ------------------------------------------------------------------------ references, one sample at a time
def ref_standardize(row):
    """Sun et al. (CVPR 2024): (z − mean) / (std + 1e-7), std with Bessel's correction (the authors' code)."""
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (std + 1e-7) for v in row]


def softmax(row, t):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_kl(s, t, T, ls=False):
    """Hinton et al.: T² · KL(softmax(t/T) ‖ softmax(s/T)), mean over the samples."""
    total = 0.0
    for si, ti in zip(s.tolist(), t.tolist()):
        if ls:
            si, ti = ref_standardize(si), ref_standardize(ti)
        total += kl(softmax(ti, T), softmax(si, T))
    return total / len(s) * T * T


def ref_dkd(s, t, y, T, alpha, beta, ls=False):
    """Zhao et al. (CVPR 2022), eq. 7: α·KL(b^T ‖ b^S) + β·KL(p̂^T ‖ p̂^S), T²-scaled, mean over the samples;
    b = (p_target, 1 − p_target), p̂ = the distribution over the non-target classes renormalised."""
    total = 0.0
    for si, ti, yi in zip(s.tolist(), t.tolist(), y.tolist()):
        if ls:
            si, ti = ref_standardize(si), ref_standardize(ti)
        ps, pt = softmax(si, T), softmax(ti, T)
        bs, bt = [ps[yi], 1 - ps[yi]], [pt[yi], 1 - pt[yi]]
        qs = [v for j, v in enumerate(ps) if j != yi]
        qt = [v for j, v in enumerate(pt) if j != yi]
        qs, qt = [v / sum(qs) for v in qs], [v / sum(qt) for v in qt]
        total += alpha * kl(bt, bs) + beta * kl(qt, qs)
    return total / len(s) * T * T


def logits(n=6, c=7, scale=3.0):
    return torch.randn(n, c, dtype=torch.float64) * scale


# -------------------------------------------------------------------------------------------- formulas
def test_registry():
    assert DIVERGENCES.names() == ["kl", "dkd"]
    with pytest.raises(BlockKDError, match="did you mean 'dkd'"):
        LogitDivergence("dkdd")(logits(), logits())


def test_standardize_matches_formula():
    z = logits()
    ref = torch.tensor([ref_standardize(r) for r in z.tolist()], dtype=torch.float64)
    assert torch.allclose(standardize(z).double(), ref, atol=1e-5)
    out = standardize(z).double()
    assert torch.allclose(out.mean(1), torch.zeros(len(z), dtype=torch.float64), atol=1e-5)
    assert torch.allclose(out.std(1), torch.ones(len(z), dtype=torch.float64), atol=1e-5)
    assert torch.equal(standardize(torch.full((2, 5), 3.0)), torch.zeros(2, 5))  # constant logits: no nan


@pytest.mark.parametrize("ls", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_kl_matches_formula(ls, T):
    s, t = logits(), logits(scale=5.0)
    got = LogitDivergence("kl", T, ls)(s.float(), t.float())
    assert got.item() == pytest.approx(ref_kl(s, t, T, ls), rel=1e-4)


@pytest.mark.parametrize("ls", [False, True])
@pytest.mark.parametrize("T, alpha, beta", [(4.0, 1.0, 8.0), (2.0, 0.5, 2.0), (1.0, 0.0, 1.0)])
def test_dkd_matches_formula(ls, T, alpha, beta):
    s, t = logits(), logits(scale=5.0)
    y = torch.randint(0, s.shape[1], (len(s),))
    d = LogitDivergence("dkd", T, ls, dkd_alpha=alpha, dkd_beta=beta)
    assert d(s.float(), t.float(), y).item() == pytest.approx(ref_dkd(s, t, y, T, alpha, beta, ls), rel=1e-4)
    with pytest.raises(ValueError, match="labels"):
        d(s.float(), t.float())


@pytest.mark.parametrize("kind", ["kl", "dkd"])
def test_standardized_loss_is_invariant_to_shift_and_scale_per_sample(kind):
    """z-scoring makes each sample's loss blind to a constant added to, or a positive factor on, its logits."""
    s, t = logits().float(), logits(scale=5.0).float()
    y = torch.randint(0, s.shape[1], (len(s),))
    d = LogitDivergence(kind, 2.0, True)
    shift_s, shift_t = torch.randn(len(s), 1) * 10, torch.randn(len(s), 1) * 10
    scale_s, scale_t = torch.rand(len(s), 1) * 5 + 0.2, torch.rand(len(s), 1) * 5 + 0.2
    base = d(s, t, y).item()
    assert d(s + shift_s, t + shift_t, y).item() == pytest.approx(base, rel=1e-5)
    assert d(s * scale_s, t * scale_t, y).item() == pytest.approx(base, rel=1e-5)
    assert d(s * scale_s + shift_s, t, y).item() == pytest.approx(base, rel=1e-5)
    # Without standardisation the scale matters: the test above is not vacuous.
    plain = LogitDivergence(kind, 2.0, False)
    assert plain(s * scale_s, t, y).item() != pytest.approx(plain(s, t, y).item(), rel=1e-3)


def test_mean_over_samples():
    """Every divergence is a mean of per-sample terms (what split sampling's unbiasedness relies on)."""
    s, t = logits(8).float(), logits(8).float()
    y = torch.randint(0, s.shape[1], (8,))
    for kind in ("kl", "dkd"):
        d = LogitDivergence(kind, 4.0, True)
        whole = d(s, t, y)
        per = torch.stack([d(s[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(8)])
        assert whole.item() == pytest.approx(per.mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------- methods, end to end
def one_step(d):
    d.train()
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05)
    logits_s, losses = d(x, y, epoch=5.0)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.student.parameters())
    opt.step()
    return x, y, logits_s, losses


def test_kd_with_logit_standardization_trains_and_matches_formula():
    d = make("kd", logit_standardization=True, temperature=2.0, ce_weight=0.1, kd_weight=9.0)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    d.train()
    s_logits, losses = d(x, y)
    with torch.no_grad():
        t_logits = d.teacher(x)
    assert losses["loss_kd"].item() == pytest.approx(9.0 * ref_kl(s_logits.detach(), t_logits, 2.0, True), rel=1e-4)
    assert losses["loss_ce"].item() == pytest.approx(0.1 * F.cross_entropy(s_logits, y).item(), rel=1e-5)
    one_step(d)


def test_dkd_with_logit_standardization_trains_and_matches_formula():
    d = make("dkd", logit_standardization=True, temperature=2.0, alpha=1.0, beta=2.0, warmup=0.0)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    d.train()
    s_logits, losses = d(x, y, epoch=1.0)
    with torch.no_grad():
        t_logits = d.teacher(x)
    s_logits = s_logits.detach()
    got = losses["loss_tckd"] + losses["loss_nckd"]
    assert got.item() == pytest.approx(ref_dkd(s_logits, t_logits, y, 2.0, 1.0, 2.0, True), rel=1e-4)
    assert losses["loss_nckd"].item() == pytest.approx(ref_dkd(s_logits, t_logits, y, 2.0, 0.0, 2.0, True), rel=1e-4)
    one_step(d)


def test_options_are_declared_once_and_checked():
    for method in ("kd", "dkd"):
        assert blockkd.methods.defaults(method)["logit_standardization"] is False
    # Block-KD's divergence options lost (docs/blockkd.md, "Removed options"): naming one is one line.
    removed = {"divergence", "dkd_alpha", "dkd_beta", "logit_standardization"}
    assert not removed & set(blockkd.methods.defaults("blockkd"))
    with pytest.raises(BlockKDError, match=r"method\.options\.divergence was removed"):
        make("blockkd", divergence="dkd")
    with pytest.raises(BlockKDError, match=r"logit_standardization"):
        make("kd", logit_standardization="yes")

