"""Causal language models: exact block views of GPT-2 and Llama-style decoders, the token divergences against
their formulas in float64, chunked == unchunked, vocabularies, LM data (packing, prompt masking), Block-KD for
LMs, one step of every LM method through the API and the CLI on the offline fortunes LM task, and the export
read back by ``transformers.pipeline``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import transformers

from blockkd import data, methods
from blockkd.blocks import match, split, text_input
from blockkd.data import lm as lm_data
from blockkd.engine import train
from blockkd.engine.checkpoint import saved_tokenizer
from blockkd.errors import BlockKDError
from blockkd.methods.lm import LOSSES, chunked, token_divergence
from helpers import assert_resumes_exactly, tiny_llama

FORTUNES = Path("/usr/share/games/fortunes")
VOCAB, LENGTH = 300, 32
LM_DATA = {"name": "lm_fortunes", "categories": ["pets", "paradoxum"], "vocab_size": VOCAB, "seq_len": LENGTH,
           "batch_size": 4, "eval_batch_size": 16}


def gpt2(layers: int = 2, width: int = 32) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2,
                                                                vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                                                                eos_token_id=0))


def batch(vocab: int = VOCAB, b: int = 3, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    y = torch.roll(ids, -1, 1)
    y[:, -1] = -100
    y[1, 7:] = -100
    y[2, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask}, y


pytestmark = pytest.mark.usefixtures("fresh_data_home")  # tokenizers trained here are cached in a fresh folder


# ----------------------------------------------------------------------------------------- blocks
def qwen2_sliding() -> transformers.Qwen2ForCausalLM:
    """Qwen2 with a sliding-window layer (window 4) after a full-attention one."""
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, layer_types=["full_attention", "sliding_attention"]))


@pytest.mark.parametrize("make", [lambda: tiny_llama(4, 32), lambda: gpt2(2, 32), qwen2_sliding],
                         ids=["llama", "gpt2", "qwen2-sliding"])
def test_causal_lm_split_equals_forward_with_padding_and_positions(make):
    torch.manual_seed(0)
    model = make().eval()
    view = split(model)
    assert len(view.blocks) == model.config.num_hidden_layers
    x, _ = batch()
    with torch.no_grad():
        want = model(**x, use_cache=False).logits
        assert torch.allclose(view(x), want, atol=1e-5, rtol=0)
        shifted = {**x, "position_ids": (2 * torch.arange(12))[None].expand(3, -1)}  # positions reach every block
        want_p = model(**shifted, use_cache=False).logits
        got_p = view(shifted)
    assert torch.allclose(got_p, want_p, atol=1e-5, rtol=0) and not torch.allclose(want_p, want, atol=1e-3)
    with torch.no_grad():  # the padding mask reaches every layer: changing a padded token changes nothing before it
        other = {k: v.clone() for k, v in x.items()}
        other["input_ids"][1, 10] = (other["input_ids"][1, 10] + 1) % VOCAB
        assert torch.allclose(view(other)[1, :8], view(x)[1, :8], atol=1e-6)


def test_half_depth_half_width_student_pairs_by_depth_with_token_connectors():
    teacher, student = tiny_llama(4, 32), tiny_llama(2, 16)
    s_view, t_view = match(student, teacher, text_input(8))
    assert len(s_view.blocks) == len(t_view.blocks) == 2
    assert s_view.probe(text_input(8)) == [(8, 16), (8, 16)] and t_view.probe(text_input(8)) == [(8, 32), (8, 32)]


# ----------------------------------------------------------------------------------------- divergences
def _reference(kind: str, s: torch.Tensor, t: torch.Tensor, T: float, beta: float, skew: float) -> torch.Tensor:
    """The formulas, written out in float64 with probabilities (not log-probabilities)."""
    p, q = torch.softmax(t.double() / T, -1), torch.softmax(s.double() / T, -1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    d = {"forward_kl": lambda: kl(p, q), "reverse_kl": lambda: kl(q, p),
         "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
         "skew_kl": lambda: kl(p, skew * p + (1 - skew) * q), "skew_rkl": lambda: kl(q, skew * q + (1 - skew) * p),
         "tvd": lambda: 0.5 * (p - q).abs().sum(-1)}[kind]()
    return d * T * T


@pytest.mark.parametrize("kind", LOSSES)
def test_token_divergences_match_their_formulas_in_float64(kind):
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    for T, beta, skew in ((1.0, 0.5, 0.1), (2.0, 0.3, 0.4)):
        got = token_divergence(kind, s, t, temperature=T, beta=beta, skew=skew)
        assert got.dtype == torch.float64
        assert torch.allclose(got, _reference(kind, s, t, T, beta, skew), atol=1e-10, rtol=1e-9)
        same = token_divergence(kind, t, t, temperature=T)
        assert (got >= -1e-12).all() and torch.allclose(same, torch.zeros_like(same), atol=1e-6)
    # TRL's limits of the generalised JSD: β = 0 is forward KL, β = 1 reverse KL
    if kind == "jsd":
        assert torch.equal(token_divergence("jsd", s, t, beta=0.0), token_divergence("forward_kl", s, t))
        assert torch.equal(token_divergence("jsd", s, t, beta=1.0), token_divergence("reverse_kl", s, t))


def test_chunked_loss_equals_unchunked_in_value_and_gradient():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 40), torch.nn.Linear(8, 40)
    hs, ht = torch.randn(23, 8, requires_grad=True), torch.randn(23, 8)
    tgt = torch.randint(0, 40, (23,))

    def part(h, g, y):
        s = head_s(h)
        return F.cross_entropy(s, y, reduction="sum"), token_divergence("jsd", s, head_t(g)).sum()

    full = part(hs, ht, tgt)
    grads_full = torch.autograd.grad(sum(full), [hs, head_s.weight])
    for chunk in (1, 5, 23, 100):
        got = chunked(part, 23, chunk, hs, ht, tgt)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, full))
        grads = torch.autograd.grad(sum(got), [hs, head_s.weight])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, grads_full))


def test_causal_lm_names_fail_in_one_line(tmp_path):
    from blockkd.models.external import create_causal_lm

    with pytest.raises(BlockKDError, match="^cannot load the Hugging Face model hf./nowhere/x: the folder .* does not"):
        create_causal_lm("hf./nowhere/x")
    with pytest.raises(BlockKDError, match="is not a Hugging Face model: language-model data needs"):
        create_causal_lm("resnet8")
    path = tmp_path / "config.json"
    gpt2().config.to_json_file(str(path))
    assert type(create_causal_lm(f"hf-config.{path}")).__name__ == "GPT2LMHeadModel"


# ----------------------------------------------------------------------------------------- methods
def test_lm_kd_losses_count_only_labelled_tokens_and_chunk_exactly():
    torch.manual_seed(0)
    teacher, student = tiny_llama(4, 32), tiny_llama(2, 16)
    x, y = batch()
    out = {}
    for chunk in (3, 1000):
        d = methods.create("lm-kd", student, teacher, text_input(12), loss="reverse_kl", chunk=chunk).train()
        pred, losses = d(x, y)
        out[chunk] = losses
    assert all(torch.allclose(out[3][k], out[1000][k], atol=1e-5) for k in out[3])
    with torch.no_grad():  # the reference: full logits, mean over labelled tokens
        s, t = student(**x, use_cache=False).logits, teacher(**x, use_cache=False).logits
    keep = y != -100
    assert torch.allclose(out[3]["loss_ce"], 0.5 * F.cross_entropy(s[keep], y[keep]), atol=1e-5)
    assert torch.allclose(out[3]["loss_kd"], 0.5 * token_divergence("reverse_kl", s[keep], t[keep]).mean(), atol=1e-5)
    assert pred.shape == y.shape and (pred[~keep] == -1).all() and torch.equal(pred[keep], s[keep].argmax(-1))


def test_different_vocabularies_are_refused_unless_mapped(tmp_path):
    teacher, student = tiny_llama(2, 16, vocab=320), tiny_llama(2, 16)
    with pytest.raises(BlockKDError, match="vocabularies differ .320 vs 300|vocabularies differ .300 vs 320"):
        methods.create("lm-kd", student, teacher, text_input(12))
    x, y = batch()
    d = methods.create("lm-kd", student, teacher, text_input(12), token_mapping="shared")
    _, shared = d.train()(x, y)
    path = tmp_path / "map.json"
    path.write_text(json.dumps([[i, i] for i in range(VOCAB)]))
    _, mapped = methods.create("lm-kd", student, teacher, text_input(12), token_mapping=str(path)).train()(x, y)
    assert torch.allclose(shared["loss_kd"], mapped["loss_kd"]) and shared["loss_kd"] > 0


def test_lm_blockkd_stones_cross_the_teacher_and_train_the_student():
    torch.manual_seed(0)
    teacher, student = tiny_llama(4, 32), tiny_llama(2, 16)
    x, y = batch()
    d = methods.create("lm-blockkd", student, teacher, text_input(12), chunk=4, stone_tokens=None).train()
    assert d.num_blocks == 2 and len(d.connectors) == 2
    _, losses = d(x, y, epoch=1.0)
    assert set(losses) == {"loss_task_student", "loss_distill_student", "loss_task_stones", "loss_distill_stones",
                           "loss_cross"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(c.weight.grad is not None for c in d.connectors.modules() if isinstance(c, torch.nn.Linear))
    with torch.no_grad():  # the deepest stone = connector, then the teacher's head, on the student's last block
        d.eval()
        heads = d.eval_logits(x)
        s_view, t_view = d._views
        feats, _ = s_view.features(x)
        want = t_view.head(d.connectors[1](feats[1]))
    assert set(heads) == {"student", "stone1", "stone2", "ensemble"} and torch.allclose(heads["stone2"], want)
    # the stones' terms on a token sample: the same expectation, fewer tokens
    d2 = methods.create("lm-blockkd-lite", student, teacher, text_input(12), stone_tokens=5).train()
    _, lite = d2(x, y, epoch=1.0)
    assert torch.allclose(lite["loss_task_student"], losses["loss_task_student"]) and lite["loss_task_stones"] > 0


# ----------------------------------------------------------------------------------------- data
class CharTokenizer:
    """A stand-in with ids = character codes + 1, end-of-text 0: makes the expected labels easy to write."""

    eos_token_id = pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}


def test_packing_and_prompt_masking():
    tok = CharTokenizer()
    seq = lm_data.pack(tok, ["abc", "de"], 3)  # abc<eot>de<eot> = 1 2 3 0 4 5 0: windows of 4, stride 3
    assert seq.input_ids.tolist() == [[1, 2, 3], [0, 4, 5]] and seq.labels.tolist() == [[2, 3, 0], [4, 5, 0]]
    assert seq.attention_mask.all()
    p = lm_data.pairs(tok, ["ab", "abcdef"], ["c", "g"], 5)
    assert p.input_ids.tolist() == [[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # loss on the response (and its end-of-text) only; the truncated second pair keeps no response token
    assert p.labels.tolist() == [[-100, 3, 0, -100, -100], [-100] * 5]


def test_jsonl_prompt_response_data_and_text_file(tmp_path):
    rows = [{"prompt": f"Q{i}: what is {i}?", "response": f" It is {i}."} for i in range(40)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bundle = data.build({"name": "lm_jsonl", "train": str(tmp_path / "pairs.jsonl"), "tokenizer": "bytebpe",
                         "vocab_size": VOCAB, "seq_len": 24, "batch_size": 4}, device="cpu")
    x, y = next(iter(bundle.train))
    assert y.shape == x["input_ids"].shape == (4, 24) and bundle.task == "causal_lm"
    tok = bundle.tokenizer
    for lab in y:
        counted = lab[lab != -100]
        assert tok.decode(counted).startswith(" It is") and tok.decode(counted).endswith("<|endoftext|>")
    (tmp_path / "a.txt").write_text("\n\n".join(f"Document number {i} says hello." for i in range(30)))
    text = data.build({"name": "lm_text", "train": str(tmp_path / "a.txt"), "tokenizer": "bytebpe",
                       "vocab_size": VOCAB, "seq_len": 16, "batch_size": 2}, device="cpu")
    x, y = next(iter(text.train))
    assert torch.equal(x["input_ids"][:, 1:], y[:, :-1]) and text.test_size >= 1
    with pytest.raises(BlockKDError, match="response_column='answer' is not a column"):
        data.build({"name": "lm_jsonl", "train": str(tmp_path / "pairs.jsonl"), "tokenizer": "bytebpe",
                    "response_column": "answer"}, device="cpu")


class FakePart:
    """A split of a ``datasets`` dataset: what blockkd.data.lm reads of it."""

    def __init__(self, rows: list[dict]):
        self.rows, self.column_names = rows, list(rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list:
        return [r[column] for r in self.rows]

    def select(self, indices) -> "FakePart":
        return FakePart([self.rows[i] for i in indices])


def test_datasets_by_name_text_and_prompt_response(monkeypatch):
    """lm_hf through a stand-in for the datasets library (not installed by the test extra; no network)."""
    import sys
    import types

    calls = []
    rows = [{"text": f"Line {i} of a story about cats and dogs.", "prompt": f"Q{i}?", "completion": f" A{i}."}
            for i in range(60)]

    def load_dataset(name, config=None):
        calls.append((name, config))
        return {"train": FakePart(rows[:50]), "test": FakePart(rows[50:])}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    common = {"name": "lm_hf", "dataset": "org/stories", "config": "en", "tokenizer": "bytebpe", "vocab_size": VOCAB,
              "batch_size": 2}
    text = data.build({**common, "test_split": "test", "seq_len": 16, "max_samples": 40}, device="cpu")
    assert calls[-1] == ("org/stories", "en") and text.task == "causal_lm" and text.test_size >= 1
    x, y = next(iter(text.train))
    assert torch.equal(x["input_ids"][:, 1:], y[:, :-1]) and (y != -100).all()
    qa = data.build({**common, "text_column": None, "response_column": "completion", "seq_len": 12}, device="cpu")
    x, y = next(iter(qa.train))
    assert all(qa.tokenizer.decode(lab[lab != -100]).startswith(" A") for lab in y)
    with pytest.raises(BlockKDError, match="has no split 'validation'"):
        data.build({**common, "test_split": "validation"}, device="cpu")
    with pytest.raises(BlockKDError, match="column 'story' is not in org/stories train"):
        data.build({**common, "text_column": "story"}, device="cpu")


def test_conversations_go_through_the_chat_template():
    tok = lm_data.train_bytebpe(["hello there, how are you"], VOCAB)
    prompt = [{"role": "user", "content": "Hi?"}]
    assert lm_data.render(prompt, tok, prompt=True) == "Hi?"  # no chat template: the contents
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert lm_data.render(prompt, tok, prompt=True) == "<user>Hi?<assistant>"
    assert lm_data.render([{"role": "assistant", "content": " Fine."}], tok, prompt=False) == " Fine."
    assert lm_data.render("plain", tok, prompt=True) == "plain"


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny Llama-style configs (teacher 4 layers of width 32, student 2 of width 16) and a teacher trained one
    step on the fortunes LM task."""
    folder = tmp_path_factory.mktemp("lm")
    names = {}
    for role, (layers, width) in {"teacher": (4, 32), "student": (2, 16)}.items():
        path = folder / f"{role}.json"
        tiny_llama(layers, width).config.to_json_file(str(path))
        names[role] = f"hf-config.{path}"
    cfg = {"model": {"name": names["teacher"]}, "method": {"name": "lm-ce"}, "data": LM_DATA,
           "train": {"epochs": 1, "max_steps": 2, "device": "cpu"}, "optim": {"name": "adamw", "lr": 1e-3},
           "output": {"dir": str(folder), "name": "teacher", "progress": False, "tensorboard": False, "plot": False}}
    summary = train(cfg)
    return folder, names, summary


def test_the_bytebpe_tokenizer_travels_with_the_checkpoint(runs, tmp_path, monkeypatch):
    """The teacher's checkpoint holds its byte-level BPE; on another machine (an empty cache, where a new
    training is refused) the data built with it gives the same ids, with end-of-text as eos and padding."""
    folder, _, _ = runs
    here = data.build(LM_DATA, device="cpu")
    saved = saved_tokenizer(folder / "teacher")
    assert saved is not None and saved.read_text() == here.tokenizer.backend_tokenizer.to_str()
    monkeypatch.setenv("BLOCKKD_DATA", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(lm_data, "train_bytebpe", lambda *a, **k: pytest.fail("the tokenizer was trained again"))
    there = data.build(LM_DATA, device="cpu", tokenizer_file=saved)
    assert there.tokenizer.eos_token == there.tokenizer.pad_token == lm_data.EOT
    assert torch.equal(there.train.data.input_ids, here.train.data.input_ids)


def test_teacher_run_reports_perplexity_and_exports_for_the_pipeline(runs):
    folder, names, summary = runs
    run = folder / "teacher"
    assert summary["last"]["test_perplexity"] == pytest.approx(math.exp(json.loads(
        (run / "metrics.jsonl").read_text().splitlines()[-1])["test_loss"]), rel=1e-6)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= summary["last"]["test_top1"] <= 100 and 0 <= row["train_top1"] <= 100
    assert (run / "samples.md").read_text().count("---") == 3  # four samples
    pipe = transformers.pipeline("text-generation", model=str(run / "hf"), device="cpu")
    out = pipe("The cat", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The cat") and len(out[0]["generated_text"]) > len("The cat")


@pytest.mark.parametrize("method,options", [("lm-ce", {}), *[("lm-kd", {"loss": k}) for k in LOSSES],
                                            ("lm-blockkd", {}), ("lm-blockkd", {"stones_per_step": 1}),
                                            ("lm-blockkd-lite", {})])
def test_one_step_of_every_lm_method_through_the_api(runs, method, options):
    folder, names, _ = runs
    bundle = data.build(LM_DATA, device="cpu")
    student = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        names["student"][len("hf-config."):]))
    teacher = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
        names["teacher"][len("hf-config."):]))
    d = methods.create(method, student, None if method == "lm-ce" else teacher, bundle.input_shape, **options)
    opt = torch.optim.AdamW(list(d.trainable_parameters()), lr=1e-2)
    x, y = next(iter(bundle.train))
    before = [p.detach().clone() for p in student.parameters()]
    _, losses = d.train()(x, y, epoch=0.5)
    sum(losses.values()).backward()
    opt.step()
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_a_classifier_method_on_lm_data_is_refused_in_one_line(runs, tmp_path):
    folder, names, _ = runs
    cfg = {"model": {"name": names["student"]},
           "teacher": {"name": names["teacher"], "checkpoint": str(folder / "teacher")},
           "method": {"name": "kd"}, "data": LM_DATA, "train": {"epochs": 1, "device": "cpu"},
           "output": {"dir": str(tmp_path), "name": "kd", "progress": False, "tensorboard": False}}
    with pytest.raises(BlockKDError,
                       match="^method kd does not fit data lm_fortunes: .* lm-blockkd, lm-blockkd-lite, lm-ce, lm-kd"):
        train(cfg)


def test_gpt2_pair_runs_lm_blockkd():
    torch.manual_seed(0)
    d = methods.create("lm-blockkd", gpt2(2, 16), gpt2(4, 32), text_input(12), epochs=4).train()  # student, teacher
    x, y = batch()
    _, losses = d(x, y, epoch=1.0)  # the stones at full weight (stone_warmup_fraction 0.25 of 4 epochs)
    sum(losses.values()).backward()
    assert d.num_blocks == 2 and all(torch.isfinite(v) for v in losses.values())


STONE_LOSSES = ("loss_task_stones", "loss_distill_stones", "loss_cross")


def lm_blockkd_step(student, teacher, x, y, *, epoch: float = 1.0, **options):
    """One training step of lm-blockkd (connectors initialised from seed 0, dropout from seed 1: equal between
    calls) with the gradient into each student block's output (``block``: all its uses), into each connector's
    input (``stone``: the stone's copy of the feature at its block) and into each later block's input (``next``,
    by the index of the block before it: the student's copy); the losses and the student's and connectors'
    parameter gradients."""
    torch.manual_seed(0)
    d = methods.create("lm-blockkd", student, teacher, text_input(12), epochs=4, **options).train()
    student.zero_grad(set_to_none=True)
    s_view = d._views[0]
    out: dict[str, dict[int, torch.Tensor]] = {"block": {}, "stone": {}, "next": {}}

    def watch(t: torch.Tensor, kind: str, i: int) -> None:  # None: the hooks leave inputs and outputs as they are
        t.register_hook(lambda g: out[kind].__setitem__(i, g.detach().clone()))

    hooks = [b.register_forward_hook(lambda m, a, o, i=i: watch(o, "block", i)) for i, b in enumerate(s_view.blocks)]
    hooks += [b.register_forward_pre_hook(lambda m, a, i=i: watch(a[0], "next", i - 1))
              for i, b in enumerate(s_view.blocks) if i]
    hooks += [c.register_forward_pre_hook(lambda m, a, i=i: watch(a[0], "stone", i))
              for i, c in zip(d.stone_ids, d.connectors)]
    torch.manual_seed(1)
    _, losses = d(x, y, epoch=epoch)
    sum(losses.values()).backward()
    for h in hooks:
        h.remove()
    params = {"student": [p.grad.clone() for p in student.parameters()],
              "connectors": [p.grad.clone() for p in d.connectors.parameters()]}
    return d, out, losses, params


@pytest.mark.parametrize("cap", [0.02, 0.1])
def test_lm_blockkd_stone_grad_cap_bounds_each_stone_s_pull_at_its_block(cap):
    """stone_grad_cap (blockkd.methods.stone_grad, as in the image Block-KD): at each stone's block the gradient
    into the student's feature is g_own + s·g_stone, s = min(1, cap·‖g_own‖ / ‖g_stone‖), so the stone's share
    ‖s·g_stone‖ <= cap·‖g_own‖; g_own is what the rest of the objective sends there (the next block's input, at
    the deepest block the unbounded step's total less the stone's). Here the stones pull ~0.1x the student's
    own terms: cap 0.02 binds at both stones, 0.1 at least at one."""
    torch.manual_seed(0)
    student, teacher = gpt2(2, 16), gpt2(4, 32)
    x, y = batch()
    d, bounded, _, grads = lm_blockkd_step(student, teacher, x, y, stone_grad_cap=cap)
    _, free, _, free_grads = lm_blockkd_step(student, teacher, x, y, stone_grad_cap=None)
    assert d.stone_ids == [0, 1]
    last = d.stone_ids[-1]
    binding = []
    for i in d.stone_ids:
        stone = bounded["stone"][i]  # the stone's own gradient, before the bound
        own = bounded["next"][i] if i < last else free["block"][i] - stone
        assert own.norm() > 2 * stone.norm() > 0  # here the student's own terms pull harder than a stone
        s = min(1.0, cap * float(own.norm()) / float(stone.norm()))
        assert torch.allclose(bounded["block"][i], own + s * stone, rtol=1e-4, atol=1e-7), i
        assert float((bounded["block"][i] - own).norm()) <= cap * float(own.norm()) * (1 + 1e-4) + 1e-8
        binding.append(s < 1)
    assert all(binding) if cap == 0.02 else any(binding)  # the bound acted (here: 0.1 at the deepest stone only)
    # the bound acts on the student only: the connectors' gradients are those of the unbounded step
    same = lambda part, **tol: all(torch.allclose(a, b, **tol) for a, b in zip(grads[part], free_grads[part]))  # noqa: E731
    assert same("connectors", rtol=1e-5, atol=1e-8) and not same("student", rtol=1e-4, atol=1e-7)


def test_lm_blockkd_without_a_cap_the_fork_changes_no_gradient():
    """stone_grad_cap null: no fork, the gradients of the plain forward; a cap that never binds forks at each
    stone's block (the stone reads its own copy) and gives the same gradients."""
    torch.manual_seed(0)
    student, teacher = gpt2(2, 16), gpt2(4, 32)
    x, y = batch()
    _, free, free_losses, free_grads = lm_blockkd_step(student, teacher, x, y, stone_grad_cap=None)
    _, loose, losses, grads = lm_blockkd_step(student, teacher, x, y, stone_grad_cap=1e6)
    assert all(torch.equal(free_losses[k], losses[k]) for k in losses)
    for i in (0, 1):
        assert torch.equal(free["stone"][i], free["block"][i])  # unforked: the connector reads the block's output
        assert not torch.allclose(loose["stone"][i], loose["block"][i])  # forked: its own copy
        assert torch.allclose(loose["block"][i], free["block"][i], rtol=1e-5, atol=1e-8)
    for part in ("student", "connectors"):
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads[part], free_grads[part]))


def test_lm_blockkd_stones_ramp_in_over_a_fraction_of_training():
    """stone_warmup_fraction 0.25 of 4 epochs: the stones' terms and L_cross are 0 at epoch 0, half at 0.5, at
    full weight from epoch 1 (= those of stone_warmup_fraction 0); the student's own terms never ramp. The ramp
    follows the training length (8 epochs: half at epoch 1); unknown, it assumes 8 epochs and says so once."""
    torch.manual_seed(0)
    student, teacher = gpt2(2, 16), gpt2(4, 32)
    x, y = batch()

    def losses(epoch: float, epochs=4, **options):
        torch.manual_seed(0)  # the same connectors
        d = methods.create("lm-blockkd", student, teacher, text_input(12), epochs=epochs, **options).train()
        torch.manual_seed(1)  # the same dropout
        return d(x, y, epoch=epoch)[1]

    full = losses(0.0, stone_warmup_fraction=0.0)
    assert all(full[k] > 0 for k in STONE_LOSSES)
    for epoch, share in [(0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (3.0, 1.0)]:
        ramped = losses(epoch)
        for k in STONE_LOSSES:
            assert torch.allclose(ramped[k], share * full[k], rtol=1e-5, atol=0), (epoch, k)
        for k in ("loss_task_student", "loss_distill_student"):
            assert torch.allclose(ramped[k], full[k], rtol=1e-6), (epoch, k)
    assert losses(0.0)["loss_cross"].detach().item() == 0.0
    assert torch.allclose(losses(1.0, epochs=8)["loss_task_stones"], 0.5 * full["loss_task_stones"], rtol=1e-5)
    torch.manual_seed(0)
    d = methods.create("lm-blockkd", student, teacher, text_input(12)).train()
    with pytest.warns(UserWarning, match=r"training length is unknown.*over 2 epochs.*pass epochs="):
        assert d.ramp(1.0) == pytest.approx(0.5)
    assert d.ramp(2.0) == 1.0  # warned once


@pytest.mark.parametrize("recipe", ["blockkd", "blockkd-lite"])
def test_lm_blockkd_stone_warmup_was_removed(recipe):
    """stone_warmup (epochs) is now stone_warmup_fraction, as in the image Block-KD: a recipe naming it gets one
    line naming it; a run saved with it resumes where its value is stone_warmup_fraction x train.epochs."""
    from types import SimpleNamespace

    from blockkd import config
    from blockkd.engine.trainer import Trainer

    path = Path(__file__).parents[1] / f"configs/lm_fortunes/{recipe}.yaml"
    with pytest.raises(BlockKDError) as e:
        config.load(path, ["method.options.stone_warmup=1"])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("method.options.stone_warmup was removed in blockkd 0.2 (replaced by "
                                   "stone_warmup_fraction")
    with pytest.raises(BlockKDError, match=r"^method\.options\.stone_warmup was removed"):
        methods.create(f"lm-{recipe}", gpt2(2, 16), gpt2(4, 32), text_input(12), stone_warmup=1.0)
    cfg = config.load(path)  # 4 epochs, stone_warmup_fraction 0.25
    saved = {"method": {"name": f"lm-{recipe}"}}
    Trainer.refuse_removed_options(SimpleNamespace(cfg=cfg), {"method.options.stone_warmup": 1.0}, saved)
    with pytest.raises(BlockKDError, match=r"^this run was trained with method\.options\.stone_warmup=0\.0, removed"):
        Trainer.refuse_removed_options(SimpleNamespace(cfg=cfg), {"method.options.stone_warmup": 0.0}, saved)


RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs/lm_fortunes").glob("*.yaml")
                 if p.stem not in ("base", "pair", "teacher") and not p.stem.endswith("-cached"))  # test_lm_cache.py


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_step_through_the_cli_from_the_recipes(runs, recipe, capsys):
    from blockkd.cli import main

    folder, names, _ = runs
    root = Path(__file__).resolve().parents[1]
    args = ["train", str(root / f"configs/lm_fortunes/{recipe}.yaml"), f"model.name={names['student']}",
            f"teacher.name={names['teacher']}", f"teacher.checkpoint={folder / 'teacher'}",
            "data.categories=[pets, paradoxum]", f"data.vocab_size={VOCAB}", f"data.seq_len={LENGTH}",
            "data.batch_size=4", "data.eval_batch_size=16", "train.max_steps=1", "train.device=cpu",
            f"output.dir={folder}", "output.progress=false", "output.tensorboard=false", "output.plot=false"]
    assert main(args) == 0
    run = folder / f"lm-fortunes-{recipe}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["last"]["test_perplexity"] > 1
    method = {"ce": "lm-ce", "blockkd": "lm-blockkd", "blockkd-lite": "lm-blockkd-lite"}.get(recipe, "lm-kd")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["method"] == method and row["train_loss"] > 0
    if method == "lm-kd":  # the recipe's divergence ran
        loss = {"gkd": "jsd"}.get(recipe, recipe)  # gkd: JSD on the student's own continuations too
        assert f"loss: {loss}" in (run / "config.yaml").read_text() and row["train_loss_kd"] > 0
    if method.startswith("lm-blockkd"):
        assert "test_top1_stone1" in summary["last"] and row["train_loss_distill_stones"] > 0


def test_memory_benchmark_chunked_peak_does_not_grow_with_the_sequence():
    """benchmarks/lm_memory.py: the naive loss's peak grows with tokens x vocabulary, the chunked one's does not
    (real CPU tensors, tiny sizes), and the meta device counts the same bytes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_memory", Path(__file__).parents[1] / "benchmarks/lm_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    naive = [bench.loss_peak(500, s, 16, None, "cpu") for s in (64, 256)]
    chunk = [bench.loss_peak(500, s, 16, 32, "cpu") for s in (64, 256)]
    assert naive[1] >= 4 * 256 * 500 * 4 and naive[1] / naive[0] > 3.5  # several (L, V) float32 tensors at once
    assert chunk[1] < 1.1 * chunk[0] and chunk[1] < naive[1] / 4
    assert bench.loss_peak(500, 256, 16, 32, "meta") == chunk[1]


def test_lm_blockkd_run_resumes_exactly(runs, tmp_path):
    """Two epochs in one go == one epoch, then resumed for the second: the LM loader's order, the stones' token
    draws (torch's RNG, saved in the checkpoint) and the optimizer state all replay."""
    folder, names, _ = runs

    def cfg(name: str, epochs: int) -> dict:
        # stone_warmup_fraction 0: the ramp's length follows train.epochs, which the resumed run changes
        options = {"stone_tokens": 8, "stone_warmup_fraction": 0.0}
        return {"model": {"name": names["student"]}, "method": {"name": "lm-blockkd", "options": options},
                "teacher": {"name": names["teacher"], "checkpoint": str(folder / "teacher")},
                "data": {**LM_DATA, "train_subset": 12}, "optim": {"name": "adamw", "lr": 1e-3},
                "schedule": {"name": "constant"}, "train": {"epochs": epochs, "device": "cpu", "seed": 3},
                "output": {"dir": str(tmp_path), "name": name, "progress": False, "tensorboard": False,
                           "plot": False}}

    assert_resumes_exactly(cfg, tmp_path)
