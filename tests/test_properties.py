"""hypothesis properties of attention and lda_route (deterministic profile, small shapes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import assert_close_to_reference, reference_attention

PROFILE = settings(max_examples=25, deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture])
F64 = torch.float64


def _t(gen, *shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float64), kinds=("none", "lag", "banded", "banded_masked",
                                                                   "lowrank", "dense")):
    """Random attention problem: shapes (incl. primes, 1, Lq != Lk), GQA, prior, masks, alpha form."""
    b = draw(st.integers(1, 3))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3]))
    hq = hkv * g
    lq = draw(st.sampled_from([1, 2, 5, 16, 17, 31, 37]))
    lk = draw(st.sampled_from([1, 3, 16, 17, 29, 40]))
    d = draw(st.sampled_from([1, 3, 8, 16]))
    dv = draw(st.sampled_from([d, 5]))
    kind = draw(st.sampled_from(kinds))
    lead = draw(st.sampled_from([(), (1,), (hq,), (1, 1), (b, 1), (1, hq), (b, hq)]))
    causal = draw(st.booleans())
    padding = draw(st.booleans())
    alpha_form = draw(st.sampled_from(["float", "scalar_t", "per_head_t"]))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**16))
    w = draw(st.integers(0, 4))
    r = draw(st.integers(1, 3))
    return dict(b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, dv=dv, kind=kind, lead=lead, causal=causal,
                padding=padding, alpha_form=alpha_form, dtype=dtype, seed=seed, w=w, r=r)


def build(p):
    gen = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]
    q = _t(gen, p["b"], p["hq"], p["lq"], p["d"], dtype=dt)
    k = _t(gen, p["b"], p["hkv"], p["lk"], p["d"], dtype=dt)
    v = _t(gen, p["b"], p["hkv"], p["lk"], p["dv"], dtype=dt)
    lead, lq, lk, w = p["lead"], p["lq"], p["lk"], p["w"]
    kind = p["kind"]
    prior = None
    if kind == "lag":
        prior = RelativeLagPrior(_t(gen, *lead, 2 * w + 1, dtype=dt))
    elif kind == "banded":
        prior = BandedPrior(_t(gen, *lead, lq, 2 * w + 1, dtype=dt))
    elif kind == "banded_masked":
        prior = BandedPrior(_t(gen, *lead, lq, 2 * w + 1, dtype=dt), mask_outside=True)
    elif kind == "lowrank":
        prior = LowRankPrior(_t(gen, *lead, lq, p["r"], dtype=dt), _t(gen, *lead, lk, p["r"], dtype=dt))
    elif kind == "dense":
        prior = DensePrior(_t(gen, *lead, lq, lk, dtype=dt))
    if p["alpha_form"] == "float":
        alpha = 0.75
    elif p["alpha_form"] == "scalar_t":
        alpha = torch.tensor(1.25, dtype=dt)
    else:
        alpha = _t(gen, p["hq"], dtype=dt)
    kpm = (torch.rand(p["b"], lk, generator=gen) < 0.3) if p["padding"] else None
    return q, k, v, prior, alpha, kpm


def _floor(dtype, ref, n=1):
    base = {torch.float64: 1e-11, torch.float32: 1e-5}[dtype]
    finite = ref.detach()[torch.isfinite(ref.detach())]
    return base * max(1.0, float(finite.abs().max()) if finite.numel() else 0.0) * n**0.5


def _force_blocked(mp):
    """Skip the torch backend's CPU fused fast path: run its blocked tile loop (its CUDA path)."""
    from rapkern.backends.torch_blocked import cpu_flash

    mp.setattr(cpu_flash, "usable", lambda plan: False)


@PROFILE
@given(p=problems(), blocked=st.booleans(), prior_grad=st.booleans(), tile=st.sampled_from(["0.001", "32"]))
def test_agrees_with_float64_reference(p, blocked, prior_grad, tile):
    """Output, lse and every gradient within 2x the eager-in-dtype error of the float64 reference."""
    with pytest.MonkeyPatch.context() as mp:
        if blocked:
            _force_blocked(mp)
        mp.setenv("RAPKERN_TORCH_TILE_MB", tile)
        mp.setenv("RAPKERN_TORCH_FUSED_ROWS", ("16" if tile == "0.001" else "1024"))
        _check_agreement(p, prior_grad)


def _check_agreement(p, prior_grad):
    q, k, v, prior, alpha, kpm = build(p)
    dt = p["dtype"]

    def run(fn, cast, **extra):
        qq, kk, vv = (x.to(cast).requires_grad_() for x in (q, k, v))
        pr = None if prior is None else prior.with_tensors(
            *(t.to(cast).requires_grad_(prior_grad) for t in prior.tensors()))
        al = alpha.to(cast).requires_grad_(prior_grad) if isinstance(alpha, torch.Tensor) else alpha
        out, lse = fn(qq, kk, vv, prior=pr, alpha=al, causal=p["causal"], key_padding_mask=kpm, return_lse=True,
                      **extra)
        leaves = [qq, kk, vv] + ([] if pr is None else list(pr.tensors())) + (
            [al] if isinstance(al, torch.Tensor) else [])
        leaves = [x for x in leaves if x.requires_grad]
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, gout, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        return out.detach(), lse.detach(), grads

    got = run(rapkern.attention, dt, backend="torch")
    ref = run(reference_attention, F64)
    low = run(reference_attention, dt, compute_dtype=dt)
    assert_close_to_reference("out", got[0], ref[0], low[0], _floor(dt, ref[0]))
    lse_mag = ref[1][torch.isfinite(ref[1])].abs().max() if torch.isfinite(ref[1]).any() else torch.tensor(0.0)
    assert_close_to_reference("lse", got[1], ref[1], low[1], 2e-6 * max(1.0, float(lse_mag)))
    n = max(p["lq"], p["lk"])
    for i, (g_, r_, l_) in enumerate(zip(got[2], ref[2], low[2])):
        assert_close_to_reference(f"grad{i}", g_, r_, l_, _floor(dt, r_, n))


@PROFILE
@given(p=problems(dtypes=(F64,), kinds=("dense", "lag", "banded_masked", "lowrank")), c_scale=st.floats(-5, 5))
def test_row_constant_in_prior_changes_nothing(p, c_scale):
    """Adding c[i] to every visible prior entry of row i: same output; lse shifts by alpha*c[i]."""
    q, k, v, prior, alpha, kpm = build(p)
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    kind = p["kind"]
    lq = p["lq"]
    if kind == "lag":  # a constant on the whole table is a constant on every row
        c = torch.full((lq,), c_scale, dtype=F64)
        shifted = RelativeLagPrior(prior.table + c_scale)
    else:
        c = torch.randn(lq, generator=gen, dtype=F64) * c_scale
        if kind == "dense":
            shifted = DensePrior(prior.bias + c[:, None])
        elif kind == "banded_masked":  # only in-band keys are visible, so shifting the band shifts the row
            shifted = BandedPrior(prior.values + c[:, None], mask_outside=True)
        else:  # low rank: an extra rank-1 term c 1ᵀ
            u, vv = prior.u, prior.v
            ones = torch.ones(*vv.shape[:-1], 1, dtype=F64)
            cu = c[:, None].expand(*u.shape[:-1], 1)
            shifted = LowRankPrior(torch.cat([u, cu], -1), torch.cat([vv, ones], -1))
    kw = dict(alpha=alpha, causal=p["causal"], key_padding_mask=kpm, return_lse=True)
    out0, lse0 = rapkern.attention(q, k, v, prior=prior, **kw)
    out1, lse1 = rapkern.attention(q, k, v, prior=shifted, **kw)
    torch.testing.assert_close(out1, out0, atol=1e-10, rtol=1e-9)
    a = alpha.reshape(-1, 1) if isinstance(alpha, torch.Tensor) else alpha
    live = torch.isfinite(lse0)
    assert torch.equal(live, torch.isfinite(lse1))
    want = (lse0.double() + (a * c).expand_as(lse0))[live]
    torch.testing.assert_close(lse1.double()[live], want, atol=1e-5, rtol=1e-6)


@PROFILE
@given(p=problems(kinds=("lag", "banded", "banded_masked", "lowrank")))
def test_compact_prior_equals_materialized_dense(p):
    """A lag / banded / low-rank prior equals DensePrior(prior.materialize(...)), values and gradients."""
    q, k, v, prior, alpha, kpm = build(p)
    dense = prior.materialize(p["b"], p["hq"], p["lq"], p["lk"])
    leaves = [x.requires_grad_() for x in (q, k, v)]
    kw = dict(alpha=alpha, causal=p["causal"], key_padding_mask=kpm, return_lse=True)
    a = rapkern.attention(q, k, v, prior=prior, **kw)
    b = rapkern.attention(q, k, v, prior=DensePrior(dense), **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if p["dtype"] == torch.float32 else dict(atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    ga = torch.autograd.grad(a[0].sum(), leaves)
    gb = torch.autograd.grad(b[0].sum(), leaves)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


@PROFILE
@given(p=problems(), perm_seed=st.integers(0, 1000))
def test_permuting_batch_permutes_output(p, perm_seed):
    """Permute the batch of q, k, v, the padding mask and per-batch prior tensors: out and lse follow."""
    q, k, v, prior, alpha, kpm = build(p)
    b = p["b"]
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(perm_seed))

    def pb(t, trailing):
        if t.dim() - trailing == 2 and t.shape[0] == b:
            return t[perm]
        return t

    trailing = 1 if p["kind"] == "lag" else 2
    prior_p = None if prior is None else prior.with_tensors(*(pb(t, trailing) for t in prior.tensors()))
    kw = dict(alpha=alpha, causal=p["causal"], return_lse=True)
    out, lse = rapkern.attention(q, k, v, prior=prior, key_padding_mask=kpm, **kw)
    out_p, lse_p = rapkern.attention(q[perm], k[perm], v[perm], prior=prior_p,
                                     key_padding_mask=None if kpm is None else kpm[perm], **kw)
    tol = dict(atol=1e-6, rtol=1e-5) if p["dtype"] == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out_p, out[perm], **tol)
    torch.testing.assert_close(lse_p, lse[perm], **tol)


@PROFILE
@given(p=problems())
def test_gqa_equals_repeated_kv(p):
    """Query head h uses kv head h // (Hq/Hkv): same as repeating k, v along heads."""
    q, k, v, prior, alpha, kpm = build(p)
    g = p["hq"] // p["hkv"]
    kw = dict(prior=prior, alpha=alpha, causal=p["causal"], key_padding_mask=kpm)
    a = rapkern.attention(q, k, v, **kw)
    b = rapkern.attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), **kw)
    tol = dict(atol=1e-6, rtol=1e-5) if p["dtype"] == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a, b, **tol)


@PROFILE
@given(p=problems(dtypes=(F64,)), blocked=st.booleans())
def test_masks_equal_dense_neg_inf(p, blocked):
    """causal and key_padding_mask equal a dense -inf bias added on top of the prior (alpha = 1)."""
    with pytest.MonkeyPatch.context() as mp:
        if blocked:
            _force_blocked(mp)
        _check_masks(p)


def _check_masks(p):
    q, k, v, prior, _, kpm = build(p)
    b, hq, lq, lk = p["b"], p["hq"], p["lq"], p["lk"]
    bias = torch.zeros(b, hq, lq, lk, dtype=F64) if prior is None else \
        prior.materialize(b, hq, lq, lk).expand(b, hq, lq, lk).clone()
    if p["causal"]:
        bias = bias.masked_fill(torch.arange(lk)[None, :] > torch.arange(lq)[:, None], float("-inf"))
    if kpm is not None:
        bias = bias.masked_fill(kpm[:, None, None, :], float("-inf"))
    a, la = rapkern.attention(q, k, v, prior=prior, causal=p["causal"], key_padding_mask=kpm, return_lse=True)
    d, ld = rapkern.attention(q, k, v, prior=DensePrior(bias), return_lse=True)
    torch.testing.assert_close(a, d, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(la, ld, atol=1e-6, rtol=1e-6)
    # dead rows (-inf lse) are exactly zero and never NaN
    dead = torch.isneginf(la)
    assert (a[dead] == 0).all() and not torch.isnan(a).any()


@PROFILE
@given(p=problems(dtypes=(F64,)), tile=st.sampled_from(["0.001", "0.01", "1024"]))
def test_tile_size_does_not_matter(p, tile):
    q, k, v, prior, alpha, kpm = build(p)
    kw = dict(prior=prior, alpha=alpha, causal=p["causal"], key_padding_mask=kpm, return_lse=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAPKERN_TORCH_TILE_MB", tile)
        mp.setenv("RAPKERN_TORCH_FUSED_ROWS", ("16" if tile == "0.001" else "1024"))
        a = rapkern.attention(q, k, v, **kw)
        mp.setenv("RAPKERN_TORCH_TILE_MB", "0.001")
        mp.setenv("RAPKERN_TORCH_FUSED_ROWS", "16")
        b = rapkern.attention(q, k, v, **kw)
    torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(a[1], b[1], atol=1e-6, rtol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# lda_route


@st.composite
def routes(draw):
    grouped = draw(st.booleans())
    g = draw(st.integers(1, 3))
    n_q = draw(st.sampled_from([1, 2, 7, 17, 33]))
    n = draw(st.integers(1, 9))
    # d = 1 is left out: cos is exactly +-1, its true gradient is 0 and the float32 result is pure
    # cancellation (eps x |d cos|), which no magnitude-relative floor can judge
    d = draw(st.sampled_from([2, 5, 8]))
    e = draw(st.sampled_from([1, 3]))
    top_k = draw(st.one_of(st.none(), st.integers(1, n)))
    tau = draw(st.sampled_from([0.05, 0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    lead = (g,) if grouped else ()
    return dict(q=_t(gen, *lead, n_q, d), c=_t(gen, *lead, n, d), a=_t(gen, *lead, n, e), top_k=top_k, tau=tau)


@PROFILE
@given(r=routes(), shift=st.floats(-3, 3))
def test_route_invariant_to_shifting_all_centroids_dot(r, shift):
    """normalize=False: adding t to every centroid adds q·t to every score of a row -> same weights."""
    q, c, a = r["q"], r["c"], r["a"]
    t = torch.full((c.shape[-1],), shift, dtype=F64)
    out0, w0 = rapkern.lda_route(q, c, a, tau=r["tau"], normalize=False, return_weights=True)
    out1, w1 = rapkern.lda_route(q, c + t, a, tau=r["tau"], normalize=False, return_weights=True)
    torch.testing.assert_close(out1, out0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(w1, w0, atol=1e-9, rtol=1e-9)


@PROFILE
@given(r=routes(), normalize=st.booleans())
def test_route_weights_are_a_distribution(r, normalize):
    res = rapkern.lda_route(r["q"], r["c"], r["a"], tau=r["tau"], top_k=r["top_k"], normalize=normalize,
                            return_weights=True)
    out, w = res
    if r["top_k"] is not None:
        w, idx = w
        assert idx.shape == w.shape and idx.shape[-1] == r["top_k"]
        assert (idx >= 0).all() and (idx < r["c"].shape[-2]).all()
        # indices distinct per row
        srt = idx.sort(-1).values
        assert (srt[..., 1:] != srt[..., :-1]).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1], dtype=F64))
    assert out.shape == r["q"].shape[:-1] + (r["a"].shape[-1],)


@PROFILE
@given(r=routes())
def test_route_permuting_queries_permutes_output(r):
    q = r["q"]
    perm = torch.randperm(q.shape[-2], generator=torch.Generator().manual_seed(0))
    kw = dict(tau=r["tau"], top_k=r["top_k"])
    out = rapkern.lda_route(q, r["c"], r["a"], **kw)
    out_p = rapkern.lda_route(q[..., perm, :], r["c"], r["a"], **kw)
    torch.testing.assert_close(out_p, out[..., perm, :], atol=1e-12, rtol=1e-12)


@PROFILE
@given(r=routes())
def test_route_agrees_with_reference(r):
    """Output and gradients of the float32 kernel within 2x the float32 eager error of the float64 reference."""
    from rapkern.testing import reference_lda_route

    kw = dict(tau=r["tau"], top_k=r["top_k"])
    gout = torch.randn(r["q"].shape[:-1] + (r["a"].shape[-1],), generator=torch.Generator().manual_seed(0),
                       dtype=F64)

    def run(fn, dt, **extra):
        q, c, a = (x.to(dt).requires_grad_() for x in (r["q"], r["c"], r["a"]))
        out = fn(q, c, a, **kw, **extra)
        return (out.detach(), *torch.autograd.grad(out, (q, c, a), gout.to(dt)))

    got = run(rapkern.lda_route, torch.float32)
    ref = run(reference_lda_route, F64)
    low = run(reference_lda_route, torch.float32, compute_dtype=torch.float32)
    n = max(r["q"].shape[-2], r["c"].shape[-2])
    for name, x, y, z in zip(("out", "dq", "dc", "da"), got, ref, low):
        assert_close_to_reference(name, x, y, z, _floor(torch.float32, y, 1 if name == "out" else n))
