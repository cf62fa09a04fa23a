"""lda_route on the "torch" backend against the float64 reference (2x rule), plus its semantics."""

from __future__ import annotations

import math

import pytest
import torch

import rapkern
from rapkern.testing import assert_close_to_reference, reference_lda_route

FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


@pytest.fixture(params=["one-block", "many-blocks"])
def many_blocks(request, monkeypatch):
    """One block, or the smallest query blocks (16 rows) x cluster blocks of 2 (RAPKERN_ROUTE_CLUSTER_BLOCK),
    so the online softmax and the merged top-k lists run across several blocks."""
    if request.param == "many-blocks":
        monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.000001")
        monkeypatch.setenv("RAPKERN_ROUTE_CLUSTER_BLOCK", "2")
    else:
        monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "1024")
        monkeypatch.delenv("RAPKERN_ROUTE_CLUSTER_BLOCK", raising=False)


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def _floor(dtype, ref, n):
    return FLOOR[dtype] * max(1.0, float(ref.detach().abs().max())) * math.sqrt(n)


def run_route(q, c, a, *, tau=0.1, top_k=None, normalize=True, return_weights=False, cluster_mask=None, seed=0,
              backend="torch"):
    """Kernel vs float64 reference vs eager reference in the input dtype: output, weights and grads (and the
    gradient of ``tau`` when it is a tensor that requires grad)."""
    dtype = q.dtype
    tau_leaf = isinstance(tau, torch.Tensor) and tau.requires_grad

    def go(fn, dt, **extra):
        qq, cc, aa = (x.detach().to(dt).requires_grad_() for x in (q, c, a))
        tt = tau.detach().to(torch.float64 if dt == torch.float64 else tau.dtype).requires_grad_() if tau_leaf else tau
        res = fn(qq, cc, aa, tau=tt, top_k=top_k, normalize=normalize, return_weights=return_weights,
                 cluster_mask=cluster_mask, **extra)
        out = res[0] if return_weights else res
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        grads = torch.autograd.grad(out, (qq, cc, aa, tt) if tau_leaf else (qq, cc, aa), g.to(out.dtype))
        return res, grads

    got, gg = go(rapkern.lda_route, dtype, backend=backend)
    ref, gr = go(reference_lda_route, torch.float64)
    low, gl = go(reference_lda_route, dtype, compute_dtype=dtype)
    n_red = max(q.shape[-2], c.shape[-2])
    if return_weights:
        outs = [(got[0], ref[0], low[0])]
        if top_k is None:
            outs.append((got[1], ref[1], low[1]))
        else:
            outs.append((got[1][0], ref[1][0], low[1][0]))
            assert torch.equal(got[1][1], ref[1][1]), "top-k indices differ from the reference"
    else:
        outs = [(got, ref, low)]
    for i, (x, r, lo) in enumerate(outs):
        assert x.dtype == dtype
        assert_close_to_reference(f"out{i}", x.detach(), r.detach(), lo.detach(), _floor(dtype, r, 1))
    for name, x, r, lo in zip(("dq", "dcentroids", "danswers"), gg, gr, gl):
        assert x.dtype == dtype
        assert_close_to_reference(name, x, r, lo, _floor(dtype, r, n_red))
    if tau_leaf:
        x, r, lo = gg[3], gr[3], gl[3]
        assert x.dtype == tau.dtype and x.shape == tau.shape
        assert_close_to_reference("dtau", x, r, lo, _floor(dtype, r, q.shape[-2] * c.shape[-2]))
    return got, gg


SHAPES = [  # (G or None, N, n, d, e)
    (None, 1, 1, 4, 3),
    (None, 17, 5, 8, 3),
    (None, 97, 13, 16, 7),
    (3, 33, 9, 16, 5),
    (2, 203, 31, 24, 8),
]
SHAPE_IDS = [f"G{g}-N{n}-n{c}-d{d}-e{e}" for g, n, c, d, e in SHAPES]


def _inputs(shape, dtype=torch.float32, seed=0):
    g, n, c, d, e = shape
    lead = () if g is None else (g,)
    return (_rand(*lead, n, d, dtype=dtype, seed=seed), _rand(*lead, c, d, dtype=dtype, seed=seed + 1),
            _rand(*lead, c, e, dtype=dtype, seed=seed + 2))


@pytest.mark.parametrize("return_weights", [False, True], ids=["out", "out+weights"])
@pytest.mark.parametrize("top_k", [None, 1, 3], ids=["dense", "top1", "top3"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_route_fp32(shape, normalize, top_k, return_weights, many_blocks):
    n = shape[2]
    top_k = None if top_k is None else min(top_k, n)
    q, c, a = _inputs(shape, seed=shape[1])
    run_route(q, c, a, tau=0.1 if normalize else 1.0, top_k=top_k, normalize=normalize, return_weights=return_weights)


@pytest.mark.parametrize("top_k", [None, 4, 13], ids=["dense", "top4", "top_n"])
@pytest.mark.parametrize("return_weights", [False, True], ids=["out", "out+weights"])
def test_route_fp64(top_k, return_weights, many_blocks):
    q, c, a = _inputs((2, 41, 13, 8, 3), dtype=torch.float64, seed=3)
    run_route(q, c, a, tau=0.05, top_k=top_k, return_weights=return_weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
def test_route_half(dtype, top_k, many_blocks):
    q, c, a = _inputs((2, 37, 11, 16, 5), dtype=dtype, seed=4)
    got, _ = run_route(q, c, a, tau=0.2, top_k=top_k)
    assert got.dtype == dtype
    run_route(q, c, a, tau=0.2, top_k=top_k, return_weights=True)


@pytest.mark.parametrize("cluster_block", ["1", "2", "4", "9", "4096"])
def test_one_block_equals_many(monkeypatch, cluster_block):
    q, c, a = _inputs((2, 150, 9, 8, 4), dtype=torch.float64, seed=5)
    res = {}
    for tile in ("64", "0.000001"):
        monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", tile)
        monkeypatch.setenv("RAPKERN_ROUTE_CLUSTER_BLOCK", "4096" if tile == "64" else cluster_block)
        for top_k in (None, 1, 3, 9):
            out = rapkern.lda_route(q, c, a, top_k=top_k)
            res[tile, top_k] = (out, *torch.autograd.grad(out.square().sum(), (q, c, a)))
    for top_k in (None, 1, 3, 9):
        for x, y in zip(res["64", top_k], res["0.000001", top_k]):
            torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-12)


def test_weights_semantics():
    """Dense weights: softmax(cos/τ), rows sum to 1, out = w · answers; shapes (…, N, n)."""
    q, c, a = _inputs((None, 9, 6, 5, 3), dtype=torch.float64, seed=6)
    out, w = rapkern.lda_route(q, c, a, tau=0.3, return_weights=True)
    assert w.shape == (9, 6) and out.shape == (9, 3)
    cos = torch.nn.functional.cosine_similarity(q[:, None, :], c[None, :, :], dim=-1)
    torch.testing.assert_close(w, torch.softmax(cos / 0.3, -1))
    torch.testing.assert_close(w.sum(-1), torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close(out, w @ a)
    # plain dot product when normalize=False
    _, w2 = rapkern.lda_route(q, c, a, tau=2.0, normalize=False, return_weights=True)
    torch.testing.assert_close(w2, torch.softmax(q @ c.T / 2.0, -1))


def test_topk_semantics():
    q, c, a = _inputs((2, 7, 6, 5, 3), dtype=torch.float64, seed=7)
    out, (w, idx) = rapkern.lda_route(q, c, a, tau=0.3, top_k=2, return_weights=True)
    assert w.shape == (2, 7, 2) and idx.shape == (2, 7, 2) and idx.dtype == torch.int64
    s = torch.nn.functional.cosine_similarity(q[:, :, None, :], c[:, None, :, :], dim=-1) / 0.3
    top = s.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, torch.softmax(top.values, -1))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 7, dtype=torch.float64))
    torch.testing.assert_close(out, (w[..., None] * torch.gather(a[:, None].expand(2, 7, 6, 3), 2,
                                                                  idx[..., None].expand(2, 7, 2, 3))).sum(2))
    # top_k = n equals the dense route
    torch.testing.assert_close(rapkern.lda_route(q, c, a, tau=0.3, top_k=6), rapkern.lda_route(q, c, a, tau=0.3))


def _tie_case(n_q=40, seed=0):
    """Integer-valued q and centroids with normalize=False: every score is exact, so duplicates tie exactly."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-4, 5, (n_q, 4), generator=g).double()
    base = torch.randint(-4, 5, (3, 4), generator=g).double()
    c = torch.cat([base, base, base])  # centroid i, i+3, i+6 identical
    return q, base, c


def _expected_tie_indices(scores_base, k):
    """Python sort of every centroid (duplicate i + 3m has base i's score) by (-score, index)."""
    rows = []
    for row in scores_base.tolist():
        full = [(-row[j % 3], j) for j in range(9)]
        rows.append([j for _, j in sorted(full)][:k])
    return torch.tensor(rows)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_topk_ties_go_to_lower_index(k, many_blocks):
    """Exactly tied scores: the lower index is kept, in every query block and on both code paths."""
    q, base, c = _tie_case()
    a = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    out, (w, idx) = rapkern.lda_route(q, c, a, top_k=k, normalize=False, tau=1.0, return_weights=True)
    want = _expected_tie_indices(q @ base.T, k)
    assert torch.equal(idx, want)
    out2 = rapkern.lda_route(q, c, a, top_k=k, normalize=False, tau=1.0)  # blocked autograd path
    torch.testing.assert_close(out2, out, atol=1e-12, rtol=0)
    (da,) = torch.autograd.grad(out2.sum(), a)
    used = torch.zeros(9, dtype=torch.bool)
    used[want.flatten()] = True
    assert (da[~used] == 0).all(), "a centroid outside the chosen top-k received gradient"


def test_zero_query_and_zero_centroid_no_nan():
    """cos of a zero vector is 0 (not NaN): uniform weights over the clusters."""
    q = torch.zeros(3, 4, requires_grad=True)
    c = torch.randn(5, 4)
    c[2] = 0
    c.requires_grad_()
    a = torch.randn(5, 2, requires_grad=True)
    out, w = rapkern.lda_route(q, c, a, return_weights=True)
    torch.testing.assert_close(w, torch.full((3, 5), 0.2))
    out2 = rapkern.lda_route(q, c, a)
    grads = torch.autograd.grad(out2.sum(), (q, c, a))
    assert all(torch.isfinite(g).all() for g in grads)


def test_scale_invariance_of_cosine():
    """With normalize=True, scaling q or a centroid by a positive factor changes nothing."""
    q, c, a = _inputs((None, 8, 5, 6, 2), dtype=torch.float64, seed=9)
    base = rapkern.lda_route(q, c, a)
    scale = torch.rand(5, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(rapkern.lda_route(q * 7.0, c * scale, a), base)


def test_extreme_tau_is_stable():
    """tiny tau: softmax saturates to the argmax, no overflow/NaN (also in backward)."""
    q, c, a = _inputs((None, 20, 6, 5, 3), dtype=torch.float32, seed=10)
    out = rapkern.lda_route(q, c, a, tau=1e-6)
    idx = ((q / q.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).T).argmax(-1)
    torch.testing.assert_close(out, a[idx].detach())
    grads = torch.autograd.grad(out.sum(), (q, c, a))
    assert all(torch.isfinite(g).all() for g in grads)
    run_route(q, c, a, tau=1e-3, normalize=False)


def test_group_dim_independent():
    """(G, N, d) routes each group on its own: equal to G separate 2-D calls."""
    q, c, a = _inputs((3, 10, 4, 6, 2), dtype=torch.float64, seed=11)
    both = rapkern.lda_route(q, c, a, top_k=2)
    for gi in range(3):
        torch.testing.assert_close(both[gi], rapkern.lda_route(q[gi], c[gi], a[gi], top_k=2))


def test_run_twice_bitwise(many_blocks):
    q, c, a = _inputs((2, 70, 17, 8, 5), seed=12)
    res = []
    for _ in range(2):
        out = rapkern.lda_route(q, c, a, top_k=5)
        res.append((out, *torch.autograd.grad(out.square().sum(), (q, c, a))))
    assert all(torch.equal(x, y) for x, y in zip(*res))


# Meta-tests: the reference checks catch a slightly wrong routing kernel.


def _mutant_tau(monkeypatch):
    from rapkern.backends.torch_blocked import routing as R

    orig = R._Plan.scores
    monkeypatch.setattr(R._Plan, "scores", lambda self, *a: orig(self, *a) * 1.001)


def _mutant_topk_ties_to_higher(monkeypatch):
    """Equal scores go to the higher index."""
    from rapkern.backends.torch_blocked import routing as R

    orig = R.stable_topk

    def stable_topk(s, k):
        v, pos = orig(s.flip(-1), k)
        return v, s.shape[-1] - 1 - pos

    monkeypatch.setattr(R, "stable_topk", stable_topk)


def _mutant_danswers(monkeypatch):
    from rapkern.backends.torch_blocked import routing as R

    orig = R.TopkRouteFunction.backward

    def backward(ctx, dout):
        k, dq, dc, da, bias = orig(ctx, dout)
        return k, dq, dc, da * 1.0005, bias

    monkeypatch.setattr(R.TopkRouteFunction, "backward", staticmethod(backward))


@pytest.mark.parametrize("mutant", [_mutant_tau, _mutant_topk_ties_to_higher, _mutant_danswers],
                         ids=["scores-x1.001", "topk-ties-to-higher", "danswers-x1.0005"])
def test_checks_detect_a_wrong_route_kernel(mutant, monkeypatch):
    q, base, c = _tie_case(n_q=20)
    q, c = q.float().requires_grad_(), c.float().requires_grad_()
    a = _rand(9, 3, dtype=torch.float32, seed=1)
    kw = dict(tau=2.0, top_k=4, normalize=False)  # 3 tied copies of the best and one of the next: scale matters
    run_route(q, c, a, **kw)
    mutant(monkeypatch)
    with pytest.raises(AssertionError):
        run_route(q, c, a, **kw)
