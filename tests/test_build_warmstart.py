"""Mode B: warm_start_qk makes the initial logits of nn.MultiheadAttention reproduce the prior on held-out windows."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from rapkern.build import qk_prior_correlation, warm_start_qk

E, H, L = 32, 4, 12
GAIN = 16.0  # the prior's share of the logits grows with gain: the head's other dims stay random


def _windows(n, pos, seed, dim=E):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, dim, generator=g) + pos  # content + a fixed positional part


def _prior(seed=0, rank=3):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(L, rank, generator=g), torch.randn(L, rank, generator=g)
    M = u @ v.T
    return M / M.abs().max()


@pytest.fixture
def setup():
    torch.manual_seed(0)
    pos = 2.0 * torch.randn(L, E)
    return nn.MultiheadAttention(E, H, batch_first=True), pos


def test_initial_logits_reproduce_the_prior_on_held_out_windows(setup):
    mha, pos = setup
    M = _prior()
    held_out = _windows(200, pos, seed=2)
    before = qk_prior_correlation(mha, M, held_out)
    rep = warm_start_qk(mha, M, 4, _windows(400, pos, seed=1), gain=GAIN)
    after = qk_prior_correlation(mha, M, held_out)
    assert max(abs(c) for c in before) < 0.2  # random init: no relation to the prior
    assert min(after) > 0.7, after  # every warm-started head carries it
    assert rep["heads"] == [0, 1, 2, 3] and rep["rank"] == 4
    assert rep["scale"] == pytest.approx(1 / math.sqrt(E // H))
    assert rep["energy_kept"][0] == pytest.approx(1.0)  # the prior has rank 3 <= 4
    assert min(rep["r2_q"]) > 0.5


def test_the_prior_share_grows_with_gain(setup):
    _, pos = setup
    M, fit, held_out = _prior(), _windows(400, pos, seed=1), _windows(200, pos, seed=2)
    corr = []
    for gain in (1.0, 4.0, 16.0):
        torch.manual_seed(0)
        mha = nn.MultiheadAttention(E, H, batch_first=True)
        warm_start_qk(mha, M, 4, fit, gain=gain)
        corr.append(float(np.mean(qk_prior_correlation(mha, M, held_out))))
    assert corr[0] < corr[1] < corr[2]


def test_logits_are_those_the_module_uses(setup):
    """qk_prior_correlation's logits, softmaxed, are the module's own attention weights."""
    mha, pos = setup
    M = _prior(1)
    X = _windows(3, pos, seed=3)
    warm_start_qk(mha, M, 4, _windows(100, pos, seed=4))
    _, w = mha(X, X, X, need_weights=True, average_attn_weights=False)
    D = E // H
    q = X @ mha.in_proj_weight[:E].T + mha.in_proj_bias[:E]
    k = X @ mha.in_proj_weight[E:2 * E].T + mha.in_proj_bias[E:2 * E]
    q, k = (t.view(3, L, H, D).transpose(1, 2) for t in (q, k))
    torch.testing.assert_close(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1), w)


def test_only_the_chosen_rows_change(setup):
    mha, pos = setup
    W0 = mha.in_proj_weight.detach().clone()
    warm_start_qk(mha, _prior(), 2, _windows(100, pos, seed=5), heads=[1, 3])
    W1 = mha.in_proj_weight.detach()
    D = E // H
    changed = torch.zeros(3 * E, dtype=torch.bool)
    for h in (1, 3):
        changed[h * D:h * D + 2] = True  # W_Q rows
        changed[E + h * D:E + h * D + 2] = True  # W_K rows
    assert torch.equal(W1[~changed], W0[~changed])  # other rows, heads and W_V keep their random init
    assert not torch.equal(W1[changed], W0[changed])


def test_separate_key_projection_when_kdim_differs():
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H, kdim=16, vdim=16, batch_first=True)
    assert mha.in_proj_weight is None
    pq, pk = 2.0 * torch.randn(L, E), 2.0 * torch.randn(L, 16)
    M = _prior(2)
    fit = (_windows(400, pq, 6), _windows(400, pk, 7, dim=16))
    test = (_windows(200, pq, 8), _windows(200, pk, 9, dim=16))
    assert max(abs(c) for c in qk_prior_correlation(mha, M, test)) < 0.2
    warm_start_qk(mha, M, 4, fit, gain=GAIN)
    assert min(qk_prior_correlation(mha, M, test)) > 0.5  # 16-d keys separate 12 positions less cleanly


def test_per_head_priors():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    pos = 2.0 * torch.randn(L, E)
    Ms = torch.stack([_prior(3), -_prior(3)])
    warm_start_qk(mha, Ms, 4, _windows(400, pos, 10), heads=[0, 2], gain=GAIN)
    c = qk_prior_correlation(mha, Ms, _windows(100, pos, 11), heads=[0, 2])
    assert min(c) > 0.7
    flipped = qk_prior_correlation(mha, Ms[[1, 0]], _windows(100, pos, 11), heads=[0, 2])
    assert max(flipped) < -0.7


def test_biased_multihead_attention_if_available():
    from rapkern import nn as rnn

    try:
        mod = rnn.BiasedMultiheadAttention(embed_dim=E, num_heads=H)
    except TypeError:
        pytest.skip("rapkern.nn.BiasedMultiheadAttention is not available yet")
    pos = 2.0 * torch.randn(L, E)
    warm_start_qk(mod, _prior(), 4, _windows(400, pos, 12), gain=GAIN)
    assert min(qk_prior_correlation(mod, _prior(), _windows(100, pos, 13))) > 0.7


def test_bad_inputs(setup):
    mha, pos = setup
    X = _windows(10, pos, 0)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, head_dim = 8\], got 9"):
        warm_start_qk(mha, _prior(), 9, X)
    with pytest.raises(ValueError, match=r"prior_matrix must have shape \(L, L\) = \(12, 12\)"):
        warm_start_qk(mha, torch.zeros(5, 5), 2, X)
    with pytest.raises(ValueError, match=r"embeddings \(query\) must have shape \(N, L, 32\)"):
        warm_start_qk(mha, _prior(), 2, X[..., :8])
    with pytest.raises(ValueError, match=r"heads must be distinct head indices in \[0, 4\)"):
        warm_start_qk(mha, _prior(), 2, X, heads=[4])
    with pytest.raises(TypeError, match="module must be an attention module"):
        warm_start_qk(nn.Linear(4, 4), _prior(), 2, X)
    with pytest.raises(TypeError, match="embeddings must be a tensor"):
        warm_start_qk(mha, _prior(), 2, np.zeros((2, L, E)))
    W0 = mha.in_proj_weight.detach().clone()
    with pytest.raises(ValueError, match="gain must be a positive number"):
        warm_start_qk(mha, _prior(), 2, X, gain=0)
    assert torch.equal(mha.in_proj_weight, W0)  # a refused call changes nothing


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
def test_hugging_face_attention_layers(family):
    """BERT's query/key and Llama's q_proj/k_proj (4 query heads on 2 key heads): the initial logits the layer
    computes from its own projections follow the prior on held-out windows, far above the random start."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=1,
                                      intermediate_size=64, vocab_size=50)
        layer = transformers.BertModel(cfg).encoder.layer[0].attention.self
        heads = None
    else:
        cfg = transformers.LlamaConfig(hidden_size=E, num_attention_heads=H, num_key_value_heads=2,
                                       num_hidden_layers=1, intermediate_size=64, vocab_size=50)
        layer = transformers.LlamaModel(cfg).layers[0].self_attn
        heads = [0, 1]  # one key head: both query heads share its rows and the prior
    pos = 2.0 * torch.randn(L, E)
    before = qk_prior_correlation(layer, _prior(), _windows(100, pos, 21), heads=heads)
    warm_start_qk(layer, _prior(), 4, _windows(400, pos, 20), heads=heads, gain=GAIN)
    after = qk_prior_correlation(layer, _prior(), _windows(100, pos, 21), heads=heads)
    assert max(abs(c) for c in before) < 0.3 and min(after) > 0.7
    # the logits the layer itself computes (its own q/k linears and scaling) carry the prior
    x = _windows(50, pos, 22)
    proj_q, proj_k = (layer.query, layer.key) if family == "bert" else (layer.q_proj, layer.k_proj)
    D = E // H
    with torch.no_grad():
        logits = layer.scaling * proj_q(x)[..., :D] @ proj_k(x)[..., :D].transpose(1, 2)  # head 0, key head 0
    m = _prior() - _prior().mean()
    z = logits - logits.mean((1, 2), keepdim=True)
    corr = float(((z * m).sum((1, 2)) / (z.norm(dim=(1, 2)) * m.norm())).mean())
    assert corr > 0.7
    if family != "bert":
        with pytest.raises(ValueError, match="share a key head"):
            warm_start_qk(layer, torch.stack([_prior(), _prior(1)]), 4, _windows(50, pos, 20), heads=[0, 1])
