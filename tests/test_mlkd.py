"""MLKD and the second-view data path: the loss against an independent float64 recomputation from the formula
(with and without logit standardisation); one training step on three pairs; the strongly augmented view made by
the loaders and passed by the trainer to the methods that ask for it, and to no other.

The comparison with the authors' own code (run outside the repository, on the same weights and batch) is
reported in docs/methods.md; the reference here is written from the formula of blockkd.methods.mlkd's docstring.
"""
import numpy as np
import pytest
import torch

from blockkd import config, data, methods
from blockkd.data import strong
from blockkd.engine import train
from blockkd.errors import BlockKDError
from blockkd.methods.mlkd import MLKD, below_median_fraction
from helpers import cifar_batch, cifar_pair, three_pairs

CPU = torch.device("cpu")
TOL = dict(rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------------------------ the loss
def ref_mlkd(s_w, s_s, t_w, t_s, y, temps, n_strong, ce_weight, kd_weight, ls):
    """The MLKD loss of the authors' code in float64: masks from the teacher's weak-view softmax at the median."""
    def z(v):
        if not ls:
            return v
        std = ((v - v.mean(1, keepdim=True)) ** 2).sum(1, keepdim=True).div(v.shape[1] - 1).sqrt()
        return (v - v.mean(1, keepdim=True)) / (std + 1e-7)

    def kl(s, t, tau):
        p, q = torch.softmax(z(t) / tau, 1), torch.softmax(z(s) / tau, 1)
        return ((p * (p.log() - q.log())).sum(1) * tau * tau).mean()

    def probs(v, tau):
        return torch.softmax(v / tau, 1)

    p_t = torch.softmax(t_w, 1)
    conf, cls = p_t.max(1).values.numpy(), p_t.sum(0).numpy()
    m, m_c = float(np.mean(conf <= np.median(conf))), float(np.mean(cls <= np.median(cls)))
    kd = cc = bc = 0.0
    for k, tau in enumerate(temps):
        kd += m * kl(s_w, t_w, tau) + (kl(s_s, t_s, tau) if k < n_strong else kl(s_w, t_w, tau))
        ps, pt = probs(s_w, tau), probs(t_w, tau)
        cc += ((pt.T @ pt - ps.T @ ps) ** 2).sum() / ps.shape[1]
        bc += ((pt @ pt.T - ps @ ps.T) ** 2).sum() / ps.shape[0]
    ce = torch.nn.functional.cross_entropy
    return {"loss_ce": ce_weight * (ce(s_w, y) + ce(s_s, y)), "loss_kd": kd_weight * kd,
            "loss_cc": kd_weight * m_c * cc, "loss_bc": kd_weight * m * bc}


@pytest.mark.parametrize("options", [{}, {"logit_standardization": True},
                                     {"temperatures": [1.0, 3.0, 5.0, 2.0, 6.0], "ce_weight": 0.5, "kd_weight": 0.5},
                                     {"temperatures": [2.0, 4.0], "strong_view_temperatures": 1}])
@pytest.mark.parametrize("n", [8, 7])  # an even batch (mask fraction ½) and an odd one (the median is a sample)
def test_mlkd_equals_the_formula(options, n):
    s, t = cifar_pair()
    d = methods.create("mlkd", s, t, **options).train()
    x_w, x_s, y = cifar_batch(n, views=2)
    _, losses = d(x_w, y, epoch=1.0, x_strong=x_s)
    with torch.no_grad():
        logits = [m(v).double() for m in (s, t) for v in (x_w, x_s)]
    o = d.opts
    want = ref_mlkd(*logits, y, o.temperatures, o.strong_view_temperatures, o.ce_weight, o.kd_weight,
                    o.logit_standardization)
    assert set(losses) == set(want)
    for k in want:
        assert float(losses[k]) == pytest.approx(float(want[k]), **TOL), k


def test_mask_fraction_is_the_share_at_most_the_median():
    assert float(below_median_fraction(torch.tensor([0.9, 0.1, 0.5, 0.3]))) == 0.5
    assert float(below_median_fraction(torch.tensor([0.9, 0.1, 0.5]))) == pytest.approx(2 / 3)
    assert float(below_median_fraction(torch.tensor([0.2, 0.2, 0.2, 0.9]))) == 0.75  # ties all count


def test_the_strong_view_matters_and_the_teacher_never_learns():
    s, t = cifar_pair()
    d = methods.create("mlkd", s, t).train()
    x_w, x_s, y = cifar_batch(views=2)
    _, a = d(x_w, y, epoch=1.0, x_strong=x_s)
    _, b = d(x_w, y, epoch=1.0, x_strong=x_w)
    assert float(a["loss_ce"]) != pytest.approx(float(b["loss_ce"]))
    assert float(a["loss_kd"]) != pytest.approx(float(b["loss_kd"]))
    assert float(a["loss_cc"]) == pytest.approx(float(b["loss_cc"]))  # class and batch terms: weak view only
    sum(a.values()).backward()
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize("ls", [False, True])
def test_one_training_step_on_three_pairs(ls):
    for name, s, t, shape, classes in three_pairs():
        d = methods.create("mlkd", s, t, input_shape=shape, logit_standardization=ls).train()
        x, x_s, y = torch.randn(4, *shape), torch.randn(4, *shape), torch.randint(0, classes, (4,))
        opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01)
        before = {k: v.clone() for k, v in d.student.state_dict().items()}
        _, losses = d(x, y, epoch=1.0, x_strong=x_s)
        assert set(losses) == {"loss_ce", "loss_kd", "loss_cc", "loss_bc"}, name
        loss = sum(losses.values())
        assert torch.isfinite(loss), name
        loss.backward()
        assert all(p.grad is None for p in d.teacher.parameters()), name
        opt.step()
        assert [k for k, v in d.student.state_dict().items() if v.dtype.is_floating_point
                and not torch.equal(v, before[k])], name


def test_listed_and_bad_inputs_refused():
    assert "mlkd" in methods.names() and methods.get("mlkd").paper and methods.describe("mlkd")
    s, t = cifar_pair()
    d = methods.create("mlkd", s, t).train()
    x, _, y = cifar_batch(4, views=2)
    with pytest.raises(BlockKDError, match="x_strong"):
        d(x, y, epoch=1.0)
    with pytest.raises(BlockKDError, match="method.options.temperatures"):
        methods.create("mlkd", s, t, temperatures=[])
    with pytest.raises(BlockKDError, match="method.options.temperatures"):
        methods.create("mlkd", s, t, temperatures=[4.0, 0.0])


# ----------------------------------------------------------------------------------- the second view
def test_rand_augment_operations_keep_shape_and_range_and_change_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    for op, _, hi in strong.OPS:
        y = op(x.float(), torch.full((6,), float(hi)))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 255, op.__name__
    changed = {op.__name__ for op, lo, hi in strong.OPS
               if not torch.equal(op(x.float(), torch.full((6,), 0.25 * lo + 0.75 * hi)), x.float())}
    assert changed == {op.__name__ for op, _, _ in strong.OPS} - {"identity"}
    assert torch.equal(strong.posterize(x.float(), torch.full((6,), 4.0)), (x & 0xF0).float())  # PIL: keep 4 bits
    assert torch.equal(strong.solarize(x.float(), torch.full((6,), 128.0)),
                       torch.where(x < 128, x, 255 - x).float())
    a, b = strong.rand_augment(x, g), strong.rand_augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(strong.rand_augment(x, torch.Generator().manual_seed(5)),
                       strong.rand_augment(x, torch.Generator().manual_seed(5)))  # all draws from the generator
    assert not torch.equal(a, x.float()) and b.shape == x.shape
    gray = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)  # Fashion-MNIST: one channel
    assert strong.rand_augment(gray, torch.Generator().manual_seed(1)).shape == gray.shape


def _synthetic():
    return data.build({"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 48, "test_size": 16,
                       "batch_size": 16}, device=CPU, seed=2)


@pytest.mark.parametrize("with_index", [False, True])
def test_device_loader_second_view(with_index):
    b = _synthetic()
    b.train.with_index = with_index
    plain = list(b.train)
    assert all(len(items) == 2 + with_index for items in plain)  # no second view unless asked: no extra cost
    b.train.strong_view = True
    views = list(b.train)
    again = list(b.train)
    for one, two, replay in zip(plain, views, again):
        assert len(two) == 3 + with_index
        assert all(torch.equal(u, v) for u, v in zip(one, two[:-1]))  # first view, labels (and indices) unchanged
        assert two[-1].shape == two[0].shape and two[-1].dtype == torch.float32
        assert not torch.equal(two[-1], two[0])  # the second view differs from the first
        assert torch.equal(replay[-1], two[-1])  # drawn from (seed, epoch, rank): an epoch replays exactly
    assert all(len(items) == 2 for items in b.test)  # evaluation never gets one


def test_image_folder_second_view(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(2):
        (tmp_path / "train" / f"c{k}").mkdir(parents=True)
        (tmp_path / "val" / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)).save(
                tmp_path / "train" / f"c{k}" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 22, 3), dtype=np.uint8)).save(tmp_path / "val" / f"c{k}" / "0.png")
    b = data.build({"name": "imagefolder", "root": str(tmp_path), "image_size": 16, "batch_size": 3,
                    "num_workers": 0}, device=CPU, seed=1)
    assert all(len(items) == 2 for items in b.train)
    b.train.strong_view = True
    b.train.set_epoch(0)
    for x, y, x_strong in b.train:
        assert x_strong.shape == x.shape and not torch.equal(x_strong, x) and y.shape == (3,)


def _recipe(tmp_path, method):
    return config.validate({
        "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "allow_random": True},
        "method": {"name": method},
        "data": {"name": "synthetic", "image_size": 16, "num_classes": 10, "train_size": 32, "test_size": 16,
                 "batch_size": 16, "eval_batch_size": 16},
        "train": {"epochs": 1, "device": "cpu", "amp": "off"},
        "output": {"dir": str(tmp_path), "name": method, "progress": False, "tensorboard": False, "plot": False}})


def test_trainer_passes_the_second_view_to_the_methods_that_ask(tmp_path, monkeypatch):
    seen = []
    original = MLKD.forward_train

    def spy(self, x, y, *, epoch, **extra):
        seen.append((x.clone(), extra.get("x_strong")))
        return original(self, x, y, epoch=epoch, **extra)

    monkeypatch.setattr(MLKD, "forward_train", spy)
    result = train(_recipe(tmp_path, "mlkd"))
    assert len(seen) == 2 and result["last"]["test_top1"] is not None
    for x, x_strong in seen:
        assert x_strong is not None and x_strong.shape == x.shape and not torch.equal(x_strong, x)

    from blockkd.methods.kd import KD
    plain = []
    original_kd = KD.forward_train
    monkeypatch.setattr(KD, "forward_train", lambda self, x, y, *, epoch, **extra: (
        plain.append(extra), original_kd(self, x, y, epoch=epoch, **extra))[1])
    train(_recipe(tmp_path, "kd"))
    assert plain == [{}, {}]  # a method that does not ask gets one view



def test_rand_augment_operations_follow_pil():
    """Each operation against PIL's own (the authors' augmentation runs in PIL): the colour operations within one
    grey level, histogram and bit operations and translations exact, rotations and shears but at exact ties of
    nearest-neighbour sampling."""
    from PIL import Image, ImageEnhance, ImageOps

    img = (np.cumsum(np.random.default_rng(0).integers(0, 256, (32, 32, 3)), 1) // 32).astype(np.uint8)
    pil = Image.fromarray(img)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float()

    def diff(expected, op, v):
        got = op(x, torch.tensor([float(v)])).round()
        return (torch.from_numpy(np.array(expected)).permute(2, 0, 1)[None].float() - got).abs()

    affine = lambda *m: pil.transform(pil.size, Image.AFFINE, m)  # noqa: E731
    within_one = [(ImageOps.autocontrast(pil), strong.auto_contrast, 0),
                  (ImageEnhance.Brightness(pil).enhance(0.6), strong.brightness, 0.6),
                  (ImageEnhance.Color(pil).enhance(0.3), strong.color, 0.3),
                  (ImageEnhance.Contrast(pil).enhance(0.3), strong.contrast, 0.3),
                  (ImageEnhance.Sharpness(pil).enhance(0.2), strong.sharpness, 0.2)]
    exact = [(ImageOps.equalize(pil), strong.equalize, 0), (ImageOps.posterize(pil, 5), strong.posterize, 5.7),
             (ImageOps.solarize(pil, 100), strong.solarize, 100),
             (affine(1, 0, -8, 0, 1, 0), strong.translate_x, -0.25),
             (affine(1, 0, 0, 0, 1, 6.4), strong.translate_y, 0.2)]
    nearly = [(pil.rotate(20), strong.rotate, 20), (affine(1, 0.2, 0, 0, 1, 0), strong.shear_x, 0.2),
              (affine(1, 0, 0, -0.1, 1, 0), strong.shear_y, -0.1)]
    for expected, op, v in within_one:
        assert diff(expected, op, v).max() <= 1, op.__name__
    for expected, op, v in exact:
        assert diff(expected, op, v).max() == 0, op.__name__
    for expected, op, v in nearly:
        assert (diff(expected, op, v) > 1).float().mean() < 0.1, op.__name__


def test_data_without_a_second_view_is_refused_in_one_line(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("BLOCKKD_DATA", str(tmp_path / "data"))
    bert = transformers.BertConfig(vocab_size=400, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32)
    bert.to_json_file(str(tmp_path / "bert.json"))
    name = f"hf-config.{tmp_path / 'bert.json'}"
    cfg = config.validate({
        "model": {"name": name}, "teacher": {"name": name, "allow_random": True}, "method": {"name": "mlkd"},
        "data": {"name": "fortunes", "categories": ["computers", "food"], "max_per_class": 20, "max_length": 32,
                 "vocab_size": 400, "batch_size": 8},
        "train": {"epochs": 1, "device": "cpu", "amp": "off"},
        "output": {"dir": str(tmp_path), "name": "text", "progress": False, "tensorboard": False, "plot": False}})
    with pytest.raises(BlockKDError, match="needs a strongly augmented second view.*data.name='fortunes'"):
        train(cfg)
