"""The "triton" backend against the float64 reference, on CPU through the Triton interpreter.

Runs when CUDA is available (on the GPU) or when TRITON_INTERPRET=1 (tests/conftest.py sets it on
machines without CUDA). Shapes are kept tiny because the interpreter runs one program at a time; the
interpreter uses 32x32 tiles, so lengths 1, 17, 97 and 130 straddle block boundaries. The
prior x causal x padding x GQA grid is covered pairwise rather than as a full product.

Every check applies FlashAttention's rule through ``rapkern.testing.assert_close_to_reference``:
error(triton) <= 2 x error(same eager math in the input dtype) + a floor proportional to the
reference's magnitude. bf16 is not tested here (the interpreter's bf16 is broken); see
test_triton_gpu.py.
"""

from __future__ import annotations

import functools
import os

import helpers
import pytest
import torch

import rapkern
from rapkern import dispatch
from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import assert_close_to_reference, reference_attention
from rapkern.validate import check_attention

HAVE_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAVE_CUDA else "cpu"

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (HAVE_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.skipif(
        dispatch.get("triton").availability() is not None,
        reason=f"triton backend unavailable: {dispatch.get('triton').availability()}",
    ),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
PRIOR_KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]

_gen = helpers.gen
_leaf_like = helpers.leaf_like
make_prior = functools.partial(helpers.make_prior, device=DEVICE, dtype=torch.float32)


def _floor(dtype, ref, table=FLOOR, reduce_len=1):
    return helpers.scaled_floor(table, dtype, ref, reduce_len)



def _run(fn, q, k, v, prior, alpha, dt, names, gout, **kw):
    qq, kk, vv = (_leaf_like(t, dt) for t in (q, k, v))
    pr = None if prior is None else prior.with_tensors(*(_leaf_like(t, dt) for t in prior.tensors()))
    al = _leaf_like(alpha, dt) if isinstance(alpha, torch.Tensor) else alpha
    out, lse = fn(qq, kk, vv, prior=pr, alpha=al, return_lse=True, **kw)
    leaves = [qq, kk, vv] + ([] if pr is None else list(pr.tensors())) + (
        [al] if isinstance(alpha, torch.Tensor) else []
    )
    want = [(n, t) for n, t in zip(names, leaves) if t.requires_grad]
    gs = torch.autograd.grad(out, [t for _, t in want], gout.to(out.dtype), allow_unused=True)
    grads = {n: (torch.zeros_like(t) if g is None else g) for (n, t), g in zip(want, gs)}
    return out.detach(), lse.detach(), grads


def skip_if_declined_on_gpu(q, k, v, prior=None, alpha=1.0, **kw):
    """On CUDA the backend declines launches with no verified spill-free kernel config (configs.py);
    such a case is skipped there with that reason (the CPU interpreter still runs it)."""
    if not q.is_cuda:
        return
    from rapkern.backends.triton_attention import TritonBackend
    from rapkern.validate import check_attention

    args = dict(prior=prior, alpha=alpha, causal=False, key_padding_mask=None, scale=None, dropout_p=0.0)
    args.update(kw)
    reasons = TritonBackend().attention_reasons(check_attention(q, k, v, **args))
    if reasons:
        pytest.skip("triton declines on this GPU: " + "; ".join(reasons))


def run_case(q, k, v, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None, seed=0):
    """Kernel vs float64 reference vs eager-in-dtype reference; the 2x rule on out, lse, every grad."""
    skip_if_declined_on_gpu(q, k, v, prior, alpha, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    dtype = q.dtype
    n_prior = 0 if prior is None else len(prior.tensors())
    names = ["q", "k", "v"] + [f"prior[{i}]" for i in range(n_prior)] + (
        ["alpha"] if isinstance(alpha, torch.Tensor) else []
    )
    gout = torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], generator=_gen(seed + 1),
                       dtype=torch.float64).to(q.device)
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    got = _run(rapkern.attention, q, k, v, prior, alpha, dtype, names, gout, backend="triton", **kw)
    ref = _run(reference_attention, q, k, v, prior, alpha, torch.float64, names, gout, **kw)
    low = _run(reference_attention, q, k, v, prior, alpha, dtype, names, gout, compute_dtype=dtype, **kw)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_close_to_reference("out", got[0], ref[0], low[0], _floor(dtype, ref[0]))
    assert_close_to_reference("lse", got[1], ref[1], low[1], _floor(dtype, ref[1], LSE_FLOOR))
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    for n in ref[2]:
        assert got[2][n].dtype == low[2][n].dtype, f"grad {n} dtype {got[2][n].dtype}"
        floor = _floor(dtype, ref[2][n], reduce_len=max(q.shape[2], k.shape[2]))
        assert_close_to_reference(f"d{n}", got[2][n], ref[2][n], low[2][n], floor)
    return got


def qkv(b, hq, hkv, lq, lk, d, dv=None, *, dtype=torch.float32, seed=0):
    gen = _gen(seed)
    dv = d if dv is None else dv

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE).requires_grad_()

    return rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, dv)


def padding_mask(b, lk, seed=0):
    m = torch.rand(b, lk, generator=_gen(seed + 7)) < 0.3
    m[:, 0] = False
    return m.to(DEVICE)


# Pairwise cover: every prior kind meets each of plain/causal/padding/causal+padding, MHA and GQA, and
# lengths that straddle the 32-wide interpreter tiles (incl. Lq != Lk), with several prior lead shapes.
# (kind, mask, hq, hkv, lq, lk, lead)
GRID = [
    ("none", "plain", 2, 2, 1, 1, ()),
    ("none", "causal+padding", 4, 2, 97, 130, ()),
    ("lag", "plain", 4, 2, 130, 97, (4,)),
    ("lag", "causal", 2, 2, 17, 17, ()),
    ("lag", "padding", 2, 1, 97, 130, (1, 2)),
    ("banded", "causal", 4, 2, 130, 97, (4,)),
    ("banded", "padding", 2, 2, 97, 17, ()),
    ("banded", "causal+padding", 2, 1, 17, 130, (2, 1)),
    ("banded_masked", "plain", 2, 1, 97, 97, (2,)),
    ("banded_masked", "causal+padding", 4, 2, 130, 130, (1, 4)),
    ("lowrank", "plain", 2, 2, 17, 97, (2,)),
    ("lowrank", "causal", 4, 1, 97, 97, ()),
    ("lowrank", "padding", 2, 1, 130, 17, (2, 2)),
    ("dense", "causal", 2, 1, 97, 130, (2,)),
    ("dense", "padding", 4, 2, 17, 17, (2, 1)),
    ("dense", "causal+padding", 2, 2, 130, 97, ()),
]


@pytest.mark.parametrize(
    "kind,mask,hq,hkv,lq,lk,lead", GRID,
    ids=[f"{c[0]}-{c[1]}-H{c[2]}x{c[3]}-Lq{c[4]}-Lk{c[5]}-lead{len(c[6])}" for c in GRID],
)
def test_grid_fp32(kind, mask, hq, hkv, lq, lk, lead):
    b = 2
    q, k, v = qkv(b, hq, hkv, lq, lk, 16, seed=lq * 1000 + lk)
    lead = tuple(b if x == 2 and i == 0 and len(lead) == 2 else x for i, x in enumerate(lead))
    prior = make_prior(kind, lead, lq, lk, gen=_gen(lq + lk), w=3 if lq < 100 else 20)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0][:hq], device=DEVICE, requires_grad=True)
    kpm = padding_mask(b, lk, seed=lq) if "padding" in mask else None
    run_case(q, k, v, prior=prior, alpha=alpha, causal="causal" in mask, key_padding_mask=kpm)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_fp16(kind):
    lq, lk = 41, 70
    q, k, v = qkv(2, 2, 1, lq, lk, 40, dtype=torch.float16, seed=21)
    prior = make_prior(kind, (2,), lq, lk, gen=_gen(22), dtype=torch.float16)
    alpha = torch.tensor([0.9, 0.3], dtype=torch.float16, device=DEVICE, requires_grad=True)
    run_case(q, k, v, prior=prior, alpha=alpha, causal=True, key_padding_mask=padding_mask(2, lk))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_wide_heads_prior_ranges_at_half_blocks(kind, causal):
    """Head dims > 64 (padded to 128) with a prior: the forward runs its prior-reading and boundary key ranges
    at half a key block and reads key padding unmasked below Lk (_fwd_kernel.NARROW); constant ranges
    (lag ends, outside the band) at full blocks. Lengths straddle the blocks; Dv != D."""
    lq, lk = 97, 130
    q, k, v = qkv(2, 2, 1, lq, lk, 72, 80, seed=70)
    prior = make_prior(kind, (2,), lq, lk, gen=_gen(71), w=5)
    alpha = torch.tensor([0.8, -1.1], device=DEVICE, requires_grad=True)
    run_case(q, k, v, prior=prior, alpha=alpha, causal=causal, key_padding_mask=padding_mask(2, lk, seed=72))


def test_fp32_prior_with_fp16_inputs_and_float_alpha():
    """Prior tensors in fp32 while q/k/v are fp16; a Python float alpha; head dims 40/24 (not pow2)."""
    q, k, v = qkv(1, 2, 2, 33, 45, 40, 24, dtype=torch.float16, seed=5)
    prior = make_prior("lowrank", (), 33, 45, gen=_gen(6), dtype=torch.float32, r=3)
    qq, kk, vv = (t.detach() for t in (q, k, v))
    out = rapkern.attention(qq, kk, vv, prior=prior, alpha=0.5, backend="triton")
    ref = reference_attention(qq, kk, vv, prior=prior, alpha=0.5)
    assert (out.double() - ref.double()).abs().max() < 5e-3


def test_large_lag_window_and_wide_band():
    """Lag window and band wider than a tile (W = 40 > 32): the window gather and band reads span tiles."""
    q, k, v = qkv(1, 2, 1, 97, 130, 16, seed=8)
    run_case(q, k, v, prior=make_prior("lag", (2,), 97, 130, gen=_gen(9), w=40), alpha=0.9, causal=False)
    run_case(q, k, v, prior=make_prior("banded_masked", (), 97, 130, gen=_gen(10), w=40), alpha=0.9)


def test_fully_masked_rows():
    """Rows with no visible key: out 0, lse -inf, finite zero grads (padding kills batch 1 entirely;
    a masked band with Lk << Lq leaves late rows with no key)."""
    b, lq, lk = 2, 97, 17
    q, k, v = qkv(b, 2, 2, lq, lk, 16, seed=3)
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    prior = make_prior("banded_masked", (), lq, lk, gen=_gen(4), w=3)
    out, lse, grads = run_case(q, k, v, prior=prior, alpha=1.0, key_padding_mask=kpm)
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.all(out[0, :, lk + 3:] == 0) and torch.all(torch.isneginf(lse[0, :, lk + 3:]))
    assert torch.all(grads["q"][1] == 0)
    for g in grads.values():
        assert torch.isfinite(g).all()


def test_dense_neg_inf_masks_for_alpha_zero():
    q, k, v = qkv(1, 2, 1, 20, 33, 16, seed=12)
    bias = torch.randn(20, 33, generator=_gen(13)).to(DEVICE)
    bias[:, 5:9] = float("-inf")
    bias[3, :] = float("-inf")  # a fully masked row
    prior = DensePrior(bias.requires_grad_())
    alpha = torch.tensor([0.0, 1.1], device=DEVICE, requires_grad=True)
    out, lse, _ = run_case(q, k, v, prior=prior, alpha=alpha, causal=False)
    assert torch.isneginf(lse[0, :, 3]).all()


NAN_PAD = float("nan")


def _cut(t, pad_front=3, pad_back=5):
    """Copy ``t`` into the middle of a NaN-filled buffer with a strided layout, return the view."""
    b, h, l, d = t.shape
    buf = torch.full((b, l + pad_front + pad_back, h, d + 7), NAN_PAD, dtype=t.dtype, device=t.device)
    view = buf[:, pad_front:pad_front + l, :, 2:2 + d].permute(0, 2, 1, 3)
    view.copy_(t.detach())
    return view.requires_grad_()


def test_strided_nan_padded_inputs():
    """(B, L, H, D) layouts cut out of NaN-padded buffers: an out-of-bounds read would show up as NaN."""
    q, k, v = qkv(2, 4, 2, 45, 70, 40, seed=30)
    qs, ks, vs = _cut(q), _cut(k), _cut(v)
    assert qs.stride(-1) == 1 and not qs.is_contiguous()
    prior_t = torch.full((2, 4, 45 + 6, 8), NAN_PAD, device=DEVICE)
    vals = prior_t[:, :, 3:48, 1:8]  # banded values (B, Hq, Lq, 7) with non-unit row strides
    vals.copy_(torch.randn(vals.shape, generator=_gen(31)))
    prior = BandedPrior(vals.requires_grad_())
    run_case(qs, ks, vs, prior=prior, alpha=0.8, causal=True, key_padding_mask=padding_mask(2, 70))
    lag_buf = torch.full((4, 20), NAN_PAD, device=DEVICE)
    lag = lag_buf[:, ::2][:, 1:8]  # non-unit last stride
    lag.copy_(torch.randn(lag.shape, generator=_gen(32)))
    run_case(qs, ks, vs, prior=RelativeLagPrior(lag.requires_grad_()), alpha=0.8)


def _all_grads(q, k, v, prior, alpha, **kw):
    skip_if_declined_on_gpu(q, k, v, prior, alpha, **kw)
    leaves = [q, k, v, alpha] + list(prior.tensors())
    out = rapkern.attention(q, k, v, prior=prior, alpha=alpha, backend="triton", **kw)
    g = torch.randn(out.shape, generator=_gen(99)).to(out)
    return [out] + list(torch.autograd.grad(out, leaves, g))


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_run_twice_bitwise(kind):
    q, k, v = qkv(2, 4, 2, 70, 97, 16, seed=40)
    prior = make_prior(kind, (1, 4), 70, 97, gen=_gen(41))
    alpha = torch.tensor([0.5, 0.0, 1.0, -2.0], device=DEVICE, requires_grad=True)
    a = _all_grads(q, k, v, prior, alpha, causal=True)
    b = _all_grads(q, k, v, prior, alpha, causal=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


class TestDropout:
    def _qkv(self, lq=30, lk=24):
        return qkv(1, 2, 1, lq, lk, 16, seed=50)

    def test_p0_equals_no_dropout_and_seeded_reproducible(self):
        q, k, v = self._qkv()
        prior = make_prior("lag", (), 30, 24, gen=_gen(51))
        skip_if_declined_on_gpu(q, k, v, prior, dropout_p=0.3)
        base = rapkern.attention(q, k, v, prior=prior, backend="triton")
        same = rapkern.attention(q, k, v, prior=prior, dropout_p=0.0, backend="triton")
        assert torch.equal(base, same)
        torch.manual_seed(7)
        a = rapkern.attention(q, k, v, prior=prior, dropout_p=0.3, backend="triton")
        torch.manual_seed(7)
        b = rapkern.attention(q, k, v, prior=prior, dropout_p=0.3, backend="triton")
        c = rapkern.attention(q, k, v, prior=prior, dropout_p=0.3, backend="triton")
        assert torch.equal(a, b) and not torch.equal(a, c)

    def test_keep_fraction_and_backward_matches_explicit_mask(self):
        """With Dv = Lk and v = I, out is the dropped probability matrix P_d itself: its kept fraction
        is about 1 - p, and for any v the kernel's grads (q, k, v, lag table, alpha) must equal those of
        out = P_d(q, k, B) v with the same keep mask, computed explicitly in float64."""
        lq, lk, p, w = 64, 48, 0.25, 5
        q, k, _ = qkv(1, 2, 1, lq, lk, 16, seed=52)
        table = torch.randn(2, 2 * w + 1, generator=_gen(55)).to(DEVICE).requires_grad_()
        alpha = torch.tensor([0.8, -0.5], device=DEVICE, requires_grad=True)
        prior = RelativeLagPrior(table)
        eye = torch.eye(lk, device=DEVICE).expand(1, 1, lk, lk).contiguous()
        skip_if_declined_on_gpu(q, k, eye, prior, alpha, dropout_p=p)
        torch.manual_seed(3)
        pd = rapkern.attention(q, k, eye, prior=prior, alpha=alpha, dropout_p=p, backend="triton").detach()
        kept = (pd > 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.05
        keep = (pd > 0).double()
        vv = torch.randn(1, 1, lk, 24, generator=_gen(53)).to(DEVICE).requires_grad_()
        torch.manual_seed(3)
        out = rapkern.attention(q, k, vv, prior=prior, alpha=alpha, dropout_p=p, backend="triton")
        g = torch.randn(out.shape, generator=_gen(54)).to(DEVICE)
        got = torch.autograd.grad(out, [q, k, vv, table, alpha], g)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, vv, table, alpha)]
        qd, kd, vd, td, ad = leaves
        lag = (torch.arange(lq)[:, None] - torch.arange(lk)[None, :]).clamp(-w, w) + w
        bias = td[:, lag.to(DEVICE)]  # (Hq, Lq, Lk)
        probs = torch.softmax(qd @ kd.transpose(-1, -2) / 4.0 + ad[:, None, None] * bias, -1)
        ref = (probs * keep / (1 - p)) @ vd
        want = torch.autograd.grad(ref, leaves, g.double())
        assert (out.double() - ref).abs().max() < 1e-4
        for name, a, b in zip(["q", "k", "v", "table", "alpha"], got, want):
            assert (a.double() - b).abs().max() < 1e-4 * max(1.0, b.abs().max().item()), name


def _problem(q, k, v, **kw):
    base = dict(prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None, dropout_p=0.0)
    base.update(kw)
    return check_attention(q, k, v, **base)


def test_reasons():
    be = dispatch.get("triton")
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert be.attention_reasons(_problem(q, q, q)) == []
    d64 = q.double()
    assert any("dtype" in r for r in be.attention_reasons(_problem(d64, d64, d64)))
    big = torch.randn(1, 2, 8, 257, device=DEVICE)
    assert any("<= 256" in r for r in be.attention_reasons(_problem(big, big, big)))
    ok256 = torch.randn(1, 2, 8, 256, device=DEVICE)
    assert be.attention_reasons(_problem(ok256, ok256, ok256)) == []
    qt = torch.randn(1, 2, 16, 8, device=DEVICE).transpose(-1, -2)  # served: copied to unit last stride
    assert be.attention_reasons(_problem(qt, qt, qt)) == []
    u = torch.randn(8, 129, device=DEVICE)
    lr = LowRankPrior(u, u)
    assert any("rank" in r for r in be.attention_reasons(_problem(q, q, q, prior=lr)))
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run"):
        rapkern.attention(d64, d64, d64, backend="triton")


@pytest.mark.skipif(HAVE_CUDA, reason="CPU-only dispatch behaviour")
def test_cpu_needs_interpreter_and_auto_skips_triton(monkeypatch):
    be = dispatch.get("triton")
    q = torch.randn(1, 2, 8, 16)
    p = _problem(q, q, q)
    assert dispatch.choose("attention", p, "auto").name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)" in be.attention_reasons(p)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qb = q.bfloat16()
    assert any("bfloat16" in r for r in be.attention_reasons(_problem(qb, qb, qb)))


@pytest.mark.skipif(HAVE_CUDA, reason="interpreter block sizes only")
def test_forward_and_backward_blocks_may_differ(monkeypatch):
    """The autotuner picks forward and backward tiles independently: dropout bits and every gradient
    must not depend on the tile shape. Forward runs 64x16 tiles, backward 16x64 here."""
    from rapkern.backends.triton_attention import configs as C

    monkeypatch.setattr(C, "INTERPRET_FWD", (64, 16, 4, 1))
    monkeypatch.setattr(C, "INTERPRET_BWD", (16, 64, 4, 1))
    TestDropout().test_keep_fraction_and_backward_matches_explicit_mask()
    q, k, v = qkv(1, 2, 1, 97, 70, 16, seed=60)
    run_case(q, k, v, prior=make_prior("lag", (2,), 97, 70, gen=_gen(61), w=20), alpha=0.6, causal=True,
             key_padding_mask=padding_mask(1, 70))
