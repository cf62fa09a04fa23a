"""rapkern.nn.BiasedMultiheadAttention: parity with nn.MultiheadAttention (no prior), priors against a float64
eager computation (masks, appended keys, gradients), dropout distribution, state_dict both ways, the
TransformerEncoderLayer fast path, argument errors and track_stats."""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from torch import nn

import rapkern
from rapkern import BandedPrior, RelativeLagPrior
from rapkern.nn import BandPrior, BiasedMultiheadAttention, FixedPrior, Gate, LagPrior

E, H, N, L, S = 16, 4, 2, 5, 7
KDIM, VDIM = 12, 10


def lag_prior(heads, max_lag, seed=0):
    """A learnable per-head lag table with random entries."""
    return LagPrior(heads, max_lag, init=torch.randn(heads, 2 * max_lag + 1, generator=helpers.gen(seed)))


def band_prior(heads, seq_len, width, seed=3):
    """A sliding window (mask_outside) with random learnable band values."""
    m = BandPrior(heads, seq_len, width, mask_outside=True)
    with torch.no_grad():
        m.values.copy_(torch.randn(m.values.shape, generator=helpers.gen(seed)))
    return m


def learnable_gate(heads):
    return Gate(heads, init=torch.linspace(0.0, 1.5, heads), mode="learnable")


class _WrongRows(nn.Module):
    """A custom prior module that ignores the lengths it is asked for."""

    def forward(self, lq, lk):
        return BandedPrior(torch.zeros(H, 4, 3))


def _randomize(m, seed):
    g = helpers.gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return m


def _pair(seed=0, **kw):
    ref = _randomize(nn.MultiheadAttention(E, H, **kw), seed)
    mine = BiasedMultiheadAttention(E, H, **kw)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _inputs(layout, kind, seed=1, batch_first=None):
    """query, key, value in the module's layout; 'cross' uses kdim/vdim and Lk != Lq."""
    g = helpers.gen(seed)
    lk, kd, vd = (L, E, E) if kind == "self" else (S, KDIM, VDIM)

    def make(n, e):
        shape = (n, e) if layout == "unbatched" else ((N, n, e) if layout == "batch_first" else (n, N, e))
        return torch.randn(*shape, generator=g)

    q = make(L, E)
    if kind == "self":
        return q, q, q, lk
    return q, make(lk, kd), make(lk, vd), lk


MASKS = [
    "none", "bool_2d", "float_2d", "bool_3d", "float_3d", "kpm_bool", "kpm_float", "kpm_float_neginf",
    "causal_hint", "causal_hint+kpm_bool", "float_2d+kpm_bool", "bool_2d+kpm_float",
]


def _masks(name, lk, unbatched, seed=2):
    """(key_padding_mask, attn_mask, is_causal); every query row keeps at least one visible real key."""
    g = helpers.gen(seed)
    n = 1 if unbatched else N
    kpm = attn = None
    causal = False
    for part in name.split("+"):
        if part == "bool_2d":
            attn = torch.rand(L, lk, generator=g) < 0.4
            attn[:, 0] = False
        elif part == "float_2d":
            attn = torch.randn(L, lk, generator=g)
        elif part == "bool_3d":
            attn = torch.rand(n * H, L, lk, generator=g) < 0.4
            attn[..., 0] = False
        elif part == "float_3d":
            attn = torch.randn(n * H, L, lk, generator=g)
        elif part == "kpm_bool":
            kpm = torch.zeros(n, lk, dtype=torch.bool)
            kpm[-1, -2:] = True
        elif part == "kpm_float":
            kpm = torch.randn(n, lk, generator=g)
        elif part == "kpm_float_neginf":
            kpm = torch.randn(n, lk, generator=g)
            kpm[-1, -2:] = float("-inf")
        elif part == "causal_hint":
            attn = torch.ones(L, lk, dtype=torch.bool).triu(1)
            causal = True
    if unbatched and kpm is not None:
        kpm = kpm[0]
    return kpm, attn, causal


def _rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")  # torch's, on bool+float
@pytest.mark.parametrize("extras", ["plain", "bias_kv+zero_attn"])
@pytest.mark.parametrize("weights", ["no_weights", "avg_weights", "head_weights"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("layout", ["seq_first", "batch_first", "unbatched"])
def test_parity_without_prior(layout, kind, mask, weights, extras):
    kw = dict(batch_first=layout == "batch_first")
    if kind == "cross":
        kw.update(kdim=KDIM, vdim=VDIM)
    if extras != "plain":
        kw.update(add_bias_kv=True, add_zero_attn=True)
    ref, mine = _pair(**kw)
    q, k, v, lk = _inputs(layout, kind)
    kpm, attn, causal = _masks(mask, lk, layout == "unbatched")
    args = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=causal, need_weights=weights != "no_weights",
                average_attn_weights=weights == "avg_weights")
    out_r, w_r = ref(q, k, v, **args)
    out_m, w_m = mine(q, k, v, **args)
    if mask == "causal_hint" and extras != "plain" and weights == "no_weights":
        # torch's SDPA path alone hides appended keys here (causal over S+E keys); its weights path, like ours, not
        out_r = ref(q, k, v, **{**args, "need_weights": True})[0]
    assert out_m.shape == out_r.shape and _rel_err(out_m, out_r) <= 1e-5
    if weights == "no_weights":
        assert w_m is None and w_r is None
    else:
        assert w_m.shape == w_r.shape and float((w_m - w_r).detach().abs().max()) <= 1e-6


@pytest.mark.parametrize("extras", [dict(), dict(add_bias_kv=True), dict(add_zero_attn=True), dict(bias=False)])
@pytest.mark.parametrize("mask", ["none", "kpm_float_neginf", "float_3d", "causal_hint"])
def test_gradient_parity_in_training(extras, mask):
    """Train mode, dropout 0: output and every gradient match torch (the LSE merge of appended keys included)."""
    ref, mine = _pair(batch_first=True, **extras)
    ref.train(), mine.train()
    q, _, _, lk = _inputs("batch_first", "self")
    kpm, attn, causal = _masks(mask, lk, False)
    if causal and extras:
        attn, causal = attn.float().masked_fill(attn, float("-inf")), False  # appended keys: see causal test
    outs = []
    for m in (ref, mine):
        x = q.clone().requires_grad_(True)
        out = m(x, x, x, key_padding_mask=kpm, attn_mask=attn, is_causal=causal, need_weights=False)[0]
        (out * torch.linspace(-1, 1, E)).sum().backward()
        outs.append((out, x.grad, {n: p.grad for n, p in m.named_parameters()}))
    (o_r, gx_r, gp_r), (o_m, gx_m, gp_m) = outs
    assert _rel_err(o_m, o_r) <= 1e-5 and _rel_err(gx_m, gx_r) <= 1e-5
    assert gp_r.keys() == gp_m.keys()
    for name in gp_r:
        assert _rel_err(gp_m[name], gp_r[name]) <= 1e-5, name


def test_fully_masked_rows_give_zero_attention():
    """torch gives NaN for a row with no visible key; here the attention output is 0 (so out = out_proj.bias)."""
    _, mine = _pair(batch_first=True)
    q, _, _, _ = _inputs("batch_first", "self")
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True
    attn = torch.zeros(L, L, dtype=torch.bool)
    attn[2] = True
    for need_weights in (False, True):
        out, w = mine(q, q, q, key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[1], mine.out_proj.bias.expand(L, E), rtol=0, atol=1e-6)
        torch.testing.assert_close(out[0, 2], mine.out_proj.bias, rtol=0, atol=1e-6)
        if need_weights:
            assert float(w[1].detach().abs().max()) == 0.0 and float(w[0, 2].detach().abs().max()) == 0.0


def _dropout_probe(cls, need_weights, bias_kv, p=0.5):
    """One query row, values one-hot per key, identity v/out projections: output coordinate j is the
    dropped-out weight of key j. Returns (outputs in train mode (R, S'), undropped weights (S',))."""
    s = 6
    m = cls(8, 1, dropout=p, add_bias_kv=bias_kv, batch_first=True)
    with torch.no_grad():
        g = helpers.gen(5)
        m.in_proj_weight[:16].copy_(torch.randn(16, 8, generator=g) * 0.3)  # moderate logits: no weight ~ 0
        m.in_proj_weight[16:].copy_(torch.eye(8))
        m.in_proj_bias.zero_()
        m.out_proj.weight.copy_(torch.eye(8))
        m.out_proj.bias.zero_()
        if bias_kv:
            m.bias_v.copy_(torch.eye(8)[s])  # the bias key's value is one-hot on coordinate s
    reps = 600
    key = torch.randn(1, s, 8, generator=helpers.gen(6)).expand(reps, s, 8)
    value = torch.eye(8)[:s].expand(reps, s, 8)
    query = torch.randn(1, 4, 8, generator=helpers.gen(7)).expand(reps, 4, 8)
    m.eval()
    ref = m(query[:1], key[:1], value[:1], need_weights=True)[1][0]  # (4, s + bias_kv): undropped weights
    m.train()
    torch.manual_seed(0)
    out = m(query, key, value, need_weights=need_weights)[0]
    cols = s + int(bias_kv)
    return out[..., :cols].reshape(-1, cols), ref[:, :cols].repeat(reps, 1)


@pytest.mark.parametrize("bias_kv", [False, True], ids=["plain", "bias_kv"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("cls", [nn.MultiheadAttention, BiasedMultiheadAttention], ids=["torch", "rapkern"])
def test_dropout_distribution(cls, need_weights, bias_kv):
    """Each weight is dropped with probability p and kept ones are scaled by 1/(1-p), independently: the same
    distribution as torch (run through the same checks), not the same mask."""
    p = 0.5
    out, ref = _dropout_probe(cls, need_weights, bias_kv, p)
    kept = (out - ref / (1 - p)).abs() <= 1e-5
    dropped = out.abs() <= 1e-7
    assert bool((kept | dropped).all()), "every output is either 0 or the undropped weight / (1-p)"
    rate = float(dropped.double().mean())
    assert abs(rate - p) < 0.03, rate  # 14400 draws: 0.03 is > 7 standard deviations
    per_key = dropped.double().mean(0)  # each key, the appended bias key included, is dropped at rate p
    assert float((per_key - p).abs().max()) < 0.06, per_key


# -- priors against a float64 eager computation ---------------------------------------------------------------


def _eager(m, query, key, value, *, prior=None, alpha=1.0, kpm=None, attn_mask=None, causal=False):
    """float64 multi-head attention with m's weights, batch-first inputs: the spelled-out semantics."""
    dd = lambda t: None if t is None else t.double()
    b, lq, _ = query.shape
    lk = key.shape[1]
    d = E // H
    if m._qkv_same_embed_dim:
        wq, wk, wv = dd(m.in_proj_weight).chunk(3)
    else:
        wq, wk, wv = dd(m.q_proj_weight), dd(m.k_proj_weight), dd(m.v_proj_weight)
    bq, bk, bv = dd(m.in_proj_bias).chunk(3) if m.in_proj_bias is not None else (0.0, 0.0, 0.0)
    heads = lambda x: x.reshape(x.shape[0], x.shape[1], H, d).transpose(1, 2)
    q, k, v = heads(dd(query) @ wq.T + bq), heads(dd(key) @ wk.T + bk), heads(dd(value) @ wv.T + bv)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if prior is not None:
        bias = prior.with_tensors(*(t.double() for t in prior.tensors())).materialize(b, H, lq, lk)
        a = dd(alpha).reshape(-1, 1, 1) if isinstance(alpha, torch.Tensor) else alpha
        hole = bias == float("-inf")
        s = s + (bias.masked_fill(hole, 0) * a).masked_fill(hole, float("-inf"))
    if attn_mask is not None:
        am = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(b, H, lq, lk)
        s = s.masked_fill(am, float("-inf")) if am.dtype == torch.bool else s + dd(am)
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None], float("-inf")) if kpm.dtype == torch.bool else s + dd(kpm)[:, None, None]
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    if m.bias_k is not None:  # appended keys: no prior, no mask
        kb, vb = (dd(t).reshape(1, H, 1, d).expand(b, H, 1, d) for t in (m.bias_k, m.bias_v))
        s, v = torch.cat([s, q @ kb.transpose(-1, -2) / math.sqrt(d)], -1), torch.cat([v, vb], 2)
    if m.add_zero_attn:
        s, v = torch.cat([s, s.new_zeros(b, H, lq, 1)], -1), torch.cat([v, v.new_zeros(b, H, 1, d)], 2)
    dead = (s == float("-inf")).all(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(dead, 0), -1).masked_fill(dead, 0)
    out = (probs @ v).transpose(1, 2).reshape(b, lq, E)
    return out @ dd(m.out_proj.weight).T + dd(m.out_proj.bias), probs


PRIOR_CASES = ["lag+gate", "lag+float_gate", "band_masked", "lag_shared_head"]


def _prior_module(name, lq):
    if name == "lag+gate":
        return lag_prior(H, 3), learnable_gate(H)
    if name == "lag+float_gate":
        return lag_prior(H, 2, seed=4), 0.7
    if name == "band_masked":
        return band_prior(H, lq, 1), torch.tensor([1.0, 0.0, 0.5, 2.0])
    return lag_prior(1, 4, seed=5), None


def _alpha_of(gate):
    if gate is None:
        return 1.0
    return gate() if isinstance(gate, nn.Module) else gate


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("extras", ["plain", "bias_kv", "zero_attn", "bias_kv+zero_attn"])
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "kpm_float_neginf", "causal_hint", "float_3d", "bool_2d"])
@pytest.mark.parametrize("weights", ["no_weights", "head_weights"])
@pytest.mark.parametrize("case", PRIOR_CASES)
def test_prior_matches_float64_eager(case, weights, mask, extras, dtype):
    """out = softmax(QKᵀ/√d + α·B + masks) V with appended keys given no prior term and no mask (not even a band).
    float64 runs agree to 1e-10, float32 to 1e-5 relative; prior table, band values and α get the gradient."""
    prior, gate = _prior_module(case, L)
    m = _randomize(BiasedMultiheadAttention(E, H, batch_first=True, add_bias_kv="bias_kv" in extras,
                                            add_zero_attn="zero_attn" in extras, dtype=dtype), 11)
    m.prior, m.gate = prior.to(dtype), gate.to(dtype) if isinstance(gate, (nn.Module, torch.Tensor)) else gate
    q, _, _, _ = _inputs("batch_first", "self")
    q = q.to(dtype)
    kpm, attn, causal = _masks(mask, L, False)
    x = q.clone().requires_grad_(True)
    out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=attn, is_causal=causal, need_weights=weights != "no_weights",
               average_attn_weights=False)
    x64 = q.double().requires_grad_(True)
    ref, probs = _eager(m, x64, x64, x64, prior=prior(L, L), alpha=_alpha_of(m.gate), kpm=kpm, attn_mask=attn,
                        causal=causal)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    if dtype == torch.float64 and extras != "plain" and weights == "no_weights":
        tol = 1e-6  # appended keys merge through rapkern's LSE, which is float32 even for float64 inputs
    assert out.dtype == dtype and _rel_err(out.double(), ref) <= tol
    if w is not None:
        assert float((w.double() - probs).detach().abs().max()) <= tol
    probe = torch.linspace(-1, 1, E, dtype=torch.float64)
    leaves = [x] + [p for p in (*prior.parameters(), *(m.gate.parameters() if isinstance(m.gate, nn.Module) else ()))]
    got = torch.autograd.grad((out.double() * probe).sum(), leaves)
    want = torch.autograd.grad((ref * probe).sum(), [x64] + leaves[1:])
    for i, (a, r) in enumerate(zip(got, want)):
        assert r.abs().max() > 0 and _rel_err(a.double(), r) <= 10 * tol, i


def test_float_mask_and_prior_are_summed():
    """A prior module and a float attn_mask: α·B + mask (materialized once as a dense prior)."""
    m = _randomize(BiasedMultiheadAttention(E, H, batch_first=True, prior=lag_prior(H, 2), gate=0.5), 3)
    q, _, _, _ = _inputs("batch_first", "self")
    _, attn, _ = _masks("float_2d", L, False)
    out = m(q, q, q, attn_mask=attn, need_weights=False)[0]
    ref, _ = _eager(m, q, q, q, prior=m.prior(L, L), alpha=0.5, attn_mask=attn)
    assert _rel_err(out.double(), ref) <= 1e-5
    ref_no_mask, _ = _eager(m, q, q, q, prior=m.prior(L, L), alpha=0.5)
    assert _rel_err(out.double(), ref_no_mask) > 1e-2  # the mask did count


def test_cross_attention_with_prior_and_lq_ne_lk():
    m = _randomize(BiasedMultiheadAttention(E, H, kdim=KDIM, vdim=VDIM, batch_first=True,
                                            prior=lag_prior(H, 3), gate=learnable_gate(H)), 4)
    q, k, v, _ = _inputs("batch_first", "cross")
    out = m(q, k, v, need_weights=False)[0]
    ref, _ = _eager(m, q, k, v, prior=m.prior(L, S), alpha=m.gate())
    assert _rel_err(out.double(), ref) <= 1e-5


def test_compact_arguments_reach_rapkern(monkeypatch):
    """need_weights=False with a lag prior, causal hint and a float key padding mask: rapkern.attention gets a
    compact prior, causal=True and a bool key_padding_mask (the float part folded into q/k), no dense bias."""
    seen = {}
    real = rapkern.attention

    def spy(q, k, v, **kw):
        seen.update(kw, q_shape=tuple(q.shape))
        return real(q, k, v, **kw)

    monkeypatch.setattr(rapkern, "attention", spy)
    m = BiasedMultiheadAttention(E, H, batch_first=True, prior=lag_prior(H, 2))
    q, _, _, _ = _inputs("batch_first", "self")
    kpm, attn, causal = _masks("causal_hint+kpm_float_neginf", L, False)
    m(q, q, q, key_padding_mask=kpm, attn_mask=attn, is_causal=causal, need_weights=False)
    assert isinstance(seen["prior"], RelativeLagPrior) and seen["causal"] is True
    assert seen["key_padding_mask"].dtype == torch.bool and seen["q_shape"] == (N, H, L, E // H + 1)


# -- state_dict, fast path, errors, stats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw", [dict(), dict(kdim=KDIM, vdim=VDIM), dict(add_bias_kv=True, bias=False), dict(add_zero_attn=True)],
    ids=["packed", "kdim_vdim", "bias_kv_no_bias", "zero_attn"],
)
def test_state_dict_both_ways(kw):
    torch_mha = _randomize(nn.MultiheadAttention(E, H, **kw), 8)
    ours = _randomize(BiasedMultiheadAttention(E, H, **kw), 9)
    assert list(torch_mha.state_dict()) == list(ours.state_dict())
    ours.load_state_dict(torch_mha.state_dict())
    back = nn.MultiheadAttention(E, H, **kw)
    back.load_state_dict(ours.state_dict())
    for key, val in torch_mha.state_dict().items():
        assert torch.equal(back.state_dict()[key], val) and torch.equal(ours.state_dict()[key], val)
    extra = ["gate", "prior.table"]
    with_prior = BiasedMultiheadAttention(E, H, **kw, prior=lag_prior(H, 2), gate=torch.ones(H))
    res = with_prior.load_state_dict(torch_mha.state_dict(), strict=False)
    assert sorted(res.missing_keys) == extra and res.unexpected_keys == []
    res = nn.MultiheadAttention(E, H, **kw).load_state_dict(with_prior.state_dict(), strict=False)
    assert sorted(res.unexpected_keys) == extra and res.missing_keys == []


def test_pickles_with_its_prior(tmp_path):
    m = _randomize(BiasedMultiheadAttention(E, H, prior=lag_prior(H, 2), gate=learnable_gate(H)), 12)
    torch.save(m, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    q, _, _, _ = _inputs("seq_first", "self")
    assert torch.equal(back(q, q, q)[0], m(q, q, q)[0])
    assert len(back._forward_pre_hooks) == 1  # the fast-path guard survives pickling


def test_is_an_nn_multihead_attention():
    m = BiasedMultiheadAttention(E, H)
    assert isinstance(m, nn.MultiheadAttention)
    assert "track_stats" not in repr(m) and "BiasedMultiheadAttention" in repr(m)


def _encoder_layer(prior):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    sa = BiasedMultiheadAttention(E, H, batch_first=True, dropout=0.1, prior=prior)
    sa.load_state_dict(layer.self_attn.state_dict(), strict=False)
    plain = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.1, batch_first=True)
    plain.load_state_dict(layer.state_dict())
    layer.self_attn = sa
    return layer.eval(), plain.eval()


@pytest.mark.parametrize("kpm", [False, True], ids=["no_padding", "padding"])
def test_encoder_layer_fast_path_keeps_the_prior(kpm):
    """Eval + no_grad is where TransformerEncoderLayer would run its fused kernel and bypass the prior."""
    layer, plain = _encoder_layer(lag_prior(H, 3))
    x = torch.randn(N, L, E, generator=helpers.gen(3))
    mask = torch.zeros(N, L, dtype=torch.bool)
    mask[1, -2:] = True
    pad = mask if kpm else None
    with torch.no_grad():
        fast = layer(x, src_key_padding_mask=pad)
        no_prior = plain(x, src_key_padding_mask=pad)
    slow = layer(x, src_key_padding_mask=pad)  # grad enabled and parameters require grad: no fused path
    assert _rel_err(fast, slow) <= 1e-6
    assert _rel_err(fast, no_prior) > 1e-2


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_encoder_nested_tensor_path_keeps_the_prior(monkeypatch):
    """nn.TransformerEncoder (eval, no_grad, padding) converts its input to a nested tensor before the layers."""
    calls = []
    real = BiasedMultiheadAttention._forward_nested
    monkeypatch.setattr(BiasedMultiheadAttention, "_forward_nested", lambda *a: calls.append(1) or real(*a))
    layer, plain = _encoder_layer(lag_prior(H, 3))
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(N, L, E, generator=helpers.gen(4))
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[1, -2:] = True
    with torch.no_grad():
        nested = enc(x, src_key_padding_mask=pad)
    assert len(calls) == 2  # both layers saw the nested tensor
    dense = enc(x, src_key_padding_mask=pad)
    assert _rel_err(nested[~pad], dense[~pad]) <= 1e-5
    assert float(nested[pad].abs().max()) == 0.0  # torch's nested path pads with zeros


@pytest.mark.parametrize(
    "prior, msg",
    [
        (band_prior(H, 4, 1), r"lq = 5 exceeds the seq_len = 4 this BandPrior was built for"),
        (FixedPrior(RelativeLagPrior(torch.zeros(2, 3))), r"RelativeLagPrior.table leading dims \(2,\) do not"),
        (_WrongRows(), r"BandedPrior.values must have Lq = 5 rows \(dim -2\), got 4"),
    ],
    ids=["built_shorter", "wrong_heads", "wrong_rows"],
)
def test_prior_errors_before_any_computation(prior, msg, monkeypatch):
    """A prior built for a shorter sequence (or otherwise not fitting) raises before the projections run."""
    monkeypatch.setattr(BiasedMultiheadAttention, "_project", lambda *a: pytest.fail("computed before checking"))
    q = torch.randn(N, L, E)
    with pytest.raises(ValueError, match=msg):
        m = BiasedMultiheadAttention(E, H, batch_first=True)
        m.prior = prior  # set after construction, so the forward-time checks are exercised
        m(q, q, q)
    m = BiasedMultiheadAttention(E, H, batch_first=True, prior=band_prior(H, 5, 1))  # the boundary: L = seq_len
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 5\), got \(2, 4\)"):
        m(q, q, q, key_padding_mask=torch.zeros(N, 4, dtype=torch.bool))


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        (dict(prior=lag_prior(2, 1)), ValueError, r"prior.num_heads must be num_heads = 4 \(or 1"),
        (dict(prior=lag_prior(H, 1), gate=Gate(3)), ValueError, "gate.num_heads must be num_heads = 4, got 3"),
        (dict(prior=lag_prior(H, 1), gate=torch.ones(3)), ValueError, r"gate must have shape \(\) or \(num_heads,\)"),
        (dict(prior=lag_prior(H, 1), gate=torch.ones(H, dtype=torch.int64)), TypeError, "floating tensor"),
        (dict(prior=lag_prior(H, 1), gate=True), TypeError, "gate must be None, a float"),
        (dict(prior=lag_prior(H, 1), gate=float("nan")), ValueError, "gate must be finite"),
        (dict(gate=0.5), ValueError, "gate was given without a prior"),
        (dict(prior=RelativeLagPrior(torch.zeros(3))), TypeError, "wrap the RelativeLagPrior object"),
        (dict(prior=lambda lq, lk: None), TypeError, "prior must be None or an nn.Module"),
        (dict(track_stats=1), TypeError, "track_stats must be a bool"),
    ],
    ids=["prior_heads", "gate_heads", "gate_shape", "gate_dtype", "gate_bool", "gate_nan", "gate_no_prior",
         "prior_object", "prior_callable", "track_stats"],
)
def test_constructor_errors(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        BiasedMultiheadAttention(E, H, **kw)


def test_constructor_boundaries_pass():
    BiasedMultiheadAttention(E, H, prior=lag_prior(1, 1), gate=torch.tensor(0.5))  # shared prior, α ()
    BiasedMultiheadAttention(E, H, prior=lag_prior(H, 1), gate=0)  # α = 0: prior off


def test_forward_errors():
    m = BiasedMultiheadAttention(E, H, prior=lag_prior(H, 1))
    q = torch.randn(L, N, E)
    cases = [
        (dict(attn_mask=None, is_causal=True), ValueError, "Need attn_mask if specifying the is_causal hint"),
        (dict(attn_mask=torch.zeros(L, L + 1)), ValueError, r"attn_mask of 2 dims must have shape \(5, 5\)"),
        (dict(attn_mask=torch.zeros(N * H, L, L + 1)), ValueError, r"attn_mask of 3 dims must have shape \(8, 5, 5\)"),
        (dict(attn_mask=torch.zeros(L, L, dtype=torch.int64)), TypeError, "attn_mask must be a bool or floating"),
        (dict(key_padding_mask=torch.full((N, L), float("nan"))), ValueError, "must not contain NaN or \\+inf"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            m(q, q, q, **kw)
    with pytest.raises(ValueError, match="query must have embed_dim = 16 features, got 8"):
        m(q[..., :8], q, q)
    with pytest.raises(ValueError, match="query must be 3-D"):
        m(q[None], q[None], q[None])
    bad_gate = BiasedMultiheadAttention(E, H, prior=lag_prior(H, 1), gate=_BadGate())
    with pytest.raises(ValueError, match=r"gate must give α of shape \(\) or \(num_heads,\) = \(4,\), got \(2, 2\)"):
        bad_gate(q, q, q)


class _BadGate(nn.Module):
    def forward(self):
        return torch.ones(2, 2)


def _stats_ref(probs):
    return torch.special.entr(probs).sum(-1), probs.sum(-2)


@pytest.mark.parametrize("path", ["weights", "appended_keys", "rapkern_stats"])
def test_track_stats(path):
    if path == "rapkern_stats" and not hasattr(rapkern, "attention_stats"):
        pytest.skip("rapkern.attention_stats has not landed yet")
    extras = path == "appended_keys"
    m = _randomize(BiasedMultiheadAttention(E, H, batch_first=True, add_bias_kv=extras, prior=lag_prior(H, 2),
                                            gate=learnable_gate(H), track_stats=True, dropout=0.3), 6)
    q, _, _, _ = _inputs("batch_first", "self")
    kpm, _, _ = _masks("kpm_bool", L, False)
    nw = path == "weights"
    m(q, q, q, key_padding_mask=kpm, need_weights=nw)
    _, probs = _eager(m, q, q, q, prior=m.prior(L, L), alpha=m.gate(), kpm=kpm)
    entropy, key_mass = _stats_ref(probs)
    st = m.last_stats
    assert st.entropy.shape == (N, H, L) and st.key_mass.shape == (N, H, L + int(extras))
    assert not st.entropy.requires_grad and not st.key_mass.requires_grad
    assert _rel_err(st.entropy.double(), entropy) <= 1e-5 and _rel_err(st.key_mass.double(), key_mass) <= 1e-5
    m(q[0], q[0], q[0], need_weights=nw)  # unbatched: stats without the batch dim
    assert m.last_stats.entropy.shape == (H, L)
