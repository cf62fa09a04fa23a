"""lda_route's extensions on every CPU backend: a tensor tau with gradient, cluster_mask, a 2-D table shared
by a batch of queries; each against the float64 reference (2x rule) and against first principles."""

from __future__ import annotations

import pytest
import torch
from test_routing_torch import _inputs, _rand, run_route

import rapkern
from rapkern.testing import reference_lda_route

BACKENDS = ["torch", "reference"]
F64 = torch.float64


@pytest.fixture(params=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    if request.param == "many-blocks":
        monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.000001")
        monkeypatch.setenv("RAPKERN_ROUTE_CLUSTER_BLOCK", "3")
    else:
        monkeypatch.delenv("RAPKERN_TORCH_TILE_MB", raising=False)
        monkeypatch.delenv("RAPKERN_ROUTE_CLUSTER_BLOCK", raising=False)


def _mask(g, n, seed, p=0.4):
    m = torch.rand(*((g,) if g else ()), n, generator=torch.Generator().manual_seed(seed)) < p
    m[..., 0] = False  # at least one present cluster per group
    return m


# ---------------------------------------------------------------------------------------------------------
# tau as a tensor


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_gradient(backend, normalize, top_k, blocks):
    q, c, a = _inputs((2, 37, 11, 8, 5), seed=20)
    tau = torch.tensor(0.3 if normalize else 2.0, requires_grad=True)
    _, grads = run_route(q, c, a, tau=tau, top_k=top_k, normalize=normalize, backend=backend)
    assert grads[3].abs() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_gradient_by_finite_difference(backend):
    """d out/d tau against a central difference in float64 (independent of the reference)."""
    q, c, a = (x.detach() for x in _inputs((None, 9, 6, 5, 3), dtype=F64, seed=21))
    tau = torch.tensor(0.4, dtype=F64, requires_grad=True)
    out = rapkern.lda_route(q, c, a, tau=tau, backend=backend)
    (g,) = torch.autograd.grad(out.sum(), tau)
    h = 1e-6
    fd = (rapkern.lda_route(q, c, a, tau=0.4 + h).sum() - rapkern.lda_route(q, c, a, tau=0.4 - h).sum()) / (2 * h)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


def test_tau_tensor_without_grad_equals_float():
    q, c, a = _inputs((None, 9, 6, 5, 3), dtype=F64, seed=22)
    torch.testing.assert_close(rapkern.lda_route(q, c, a, tau=torch.tensor(0.25)), rapkern.lda_route(q, c, a, tau=0.25))


def test_tau_half_precision_grad_dtype():
    """tau keeps its own dtype: an fp32 temperature for fp16 inputs gets an fp32 gradient."""
    q, c, a = _inputs((None, 17, 6, 8, 3), dtype=torch.float16, seed=23)
    tau = torch.tensor(0.2, requires_grad=True)
    run_route(q, c, a, tau=tau, top_k=None)


# ---------------------------------------------------------------------------------------------------------
# cluster_mask


@pytest.mark.parametrize("return_weights", [False, True], ids=["out", "out+weights"])
@pytest.mark.parametrize("top_k", [None, 1, 4], ids=["dense", "top1", "top4"])
@pytest.mark.parametrize("shape", [(None, 23, 9, 8, 5), (3, 19, 10, 6, 4)], ids=["2d", "G3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_mask_against_reference(backend, shape, top_k, return_weights, blocks):
    q, c, a = _inputs(shape, seed=24)
    mask = _mask(shape[0], shape[2], seed=25)
    run_route(q, c, a, top_k=top_k, cluster_mask=mask, return_weights=return_weights, backend=backend)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_mask_equals_removing_clusters(backend, top_k, blocks):
    """Absent clusters behave as if they were not in the table (indices refer to the full table)."""
    q, c, a = (x.detach() for x in _inputs((None, 15, 8, 6, 3), dtype=F64, seed=26))
    mask = _mask(None, 8, seed=27)
    keep = (~mask).nonzero().squeeze(-1)
    out, w = rapkern.lda_route(q, c, a, top_k=top_k, cluster_mask=mask, return_weights=True, backend=backend)
    out_sub, w_sub = reference_lda_route(q, c[keep], a[keep], top_k=top_k, return_weights=True)
    torch.testing.assert_close(out, out_sub)
    if top_k is None:
        assert (w[:, mask] == 0).all()
        torch.testing.assert_close(w[:, keep], w_sub)
    else:
        torch.testing.assert_close(w[0], w_sub[0])
        assert torch.equal(w[1], keep[w_sub[1]])
    torch.testing.assert_close(rapkern.lda_route(q, c, a, top_k=top_k, cluster_mask=mask, backend=backend), out_sub)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_with_fewer_present_clusters_than_k(backend, blocks):
    """k = 4 with 2 present clusters: the absent ones fill the list in index order with weight 0."""
    q, c, a = _inputs((None, 11, 6, 5, 3), dtype=F64, seed=28)
    mask = torch.tensor([True, False, True, True, False, True])
    out, (w, idx) = rapkern.lda_route(q, c, a, top_k=4, cluster_mask=mask, return_weights=True, backend=backend)
    assert torch.equal(idx[:, 2:], torch.tensor([0, 2]).expand(11, 2))
    assert (w[:, 2:] == 0).all() and torch.isfinite(w).all()
    run_route(q, c, a, top_k=4, cluster_mask=mask, backend=backend)
    run_route(q, c, a, top_k=4, cluster_mask=mask, return_weights=True, backend=backend)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_group_with_no_present_cluster_gives_zeros(backend, top_k, blocks):
    """A group whose clusters are all absent: output and weights 0, indices 0..k-1, zero finite gradients;
    the other groups are unaffected."""
    q, c, a = _inputs((2, 7, 5, 4, 3), dtype=F64, seed=29)
    mask = torch.tensor([[True] * 5, [False, True, False, False, True]])
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    out, w = rapkern.lda_route(q, c, a, tau=tau, top_k=top_k, cluster_mask=mask, return_weights=True,
                               backend=backend)
    assert (out[0] == 0).all()
    if top_k is None:
        assert (w[0] == 0).all()
    else:
        assert (w[0][0] == 0).all() and torch.equal(w[1][0], torch.tensor([0, 1]).expand(7, 2))
    torch.testing.assert_close(out[1], rapkern.lda_route(q[1], c[1], a[1], tau=tau, top_k=top_k, cluster_mask=mask[1]))
    out2 = rapkern.lda_route(q, c, a, tau=tau, top_k=top_k, cluster_mask=mask, backend=backend)
    torch.testing.assert_close(out2, out)
    grads = torch.autograd.grad(out2.square().sum(), (q, c, a, tau))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][0] == 0).all() and (grads[1][0] == 0).all() and (grads[2][0] == 0).all()
    run_route(q, c, a, tau=tau, top_k=top_k, cluster_mask=mask, backend=backend)


# ---------------------------------------------------------------------------------------------------------
# one 2-D table shared by a batch of queries


@pytest.mark.parametrize("masked", ["no-mask", "shared-mask", "per-group-mask"])
@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_table_equals_separate_calls(backend, top_k, masked, blocks):
    """q (B, N, d) against centroids (n, d): B separate 2-D calls, gradients summed on the table."""
    b, n = 3, 7
    q = _rand(b, 10, 6, dtype=F64, seed=30)
    c, a = _rand(n, 6, dtype=F64, seed=31), _rand(n, 4, dtype=F64, seed=32)
    mask = {"no-mask": None, "shared-mask": _mask(None, n, 33), "per-group-mask": _mask(b, n, 34)}[masked]
    kw = dict(tau=0.2, top_k=top_k)
    out, wts = rapkern.lda_route(q, c, a, cluster_mask=mask, return_weights=True, backend=backend, **kw)
    assert out.shape == (b, 10, 4)
    grads = torch.autograd.grad(rapkern.lda_route(q, c, a, cluster_mask=mask, backend=backend, **kw).square().sum(),
                                (q, c, a))
    sep_out, sep_grads = [], [torch.zeros_like(q), torch.zeros_like(c), torch.zeros_like(a)]
    for i in range(b):
        mi = None if mask is None else (mask if mask.dim() == 1 else mask[i])
        o, w_i = reference_lda_route(q[i], c, a, cluster_mask=mi, return_weights=True, **kw)
        gq, gc, ga = torch.autograd.grad(o.square().sum(), (q, c, a))
        sep_grads = [x + y for x, y in zip(sep_grads, (gq, gc, ga))]
        sep_out.append(o)
        if top_k is None:
            torch.testing.assert_close(wts[i], w_i)
        else:
            torch.testing.assert_close(wts[0][i], w_i[0])
            assert torch.equal(wts[1][i], w_i[1])
    torch.testing.assert_close(out, torch.stack(sep_out))
    for x, y in zip(grads, sep_grads):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_table_against_reference_fp32(backend):
    q = _rand(4, 29, 16, dtype=torch.float32, seed=35)
    c, a = _rand(13, 16, dtype=torch.float32, seed=36), _rand(13, 7, dtype=torch.float32, seed=37)
    tau = torch.tensor(0.15, requires_grad=True)
    for top_k in (None, 5):
        run_route(q, c, a, tau=tau, top_k=top_k, backend=backend)
        run_route(q, c, a, top_k=top_k, cluster_mask=_mask(4, 13, 38), backend=backend)


def test_reference_shared_table_semantics():
    """The reference itself: a shared table equals the explicitly expanded (B, n, ·) table."""
    q = _rand(2, 5, 4, dtype=F64, seed=39).detach()
    c, a = _rand(6, 4, dtype=F64, seed=40).detach(), _rand(6, 3, dtype=F64, seed=41).detach()
    torch.testing.assert_close(reference_lda_route(q, c, a, top_k=2),
                               reference_lda_route(q, c.expand(2, 6, 4), a.expand(2, 6, 3), top_k=2))


# ---------------------------------------------------------------------------------------------------------
# validation of the new arguments


def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


ERRORS = [
    ("mask-not-tensor", dict(cluster_mask=[True] * 5), TypeError,
     r"cluster_mask must be None or a bool tensor, got list"),
    ("mask-float", dict(cluster_mask=torch.zeros(5)), TypeError,
     r"cluster_mask must be a bool tensor .* got dtype torch\.float32"),
    ("mask-shape", dict(cluster_mask=torch.zeros(4, dtype=torch.bool)), ValueError,
     r"cluster_mask must have shape \(5,\), got \(4,\)"),
    ("mask-2d-for-2d-q", dict(cluster_mask=torch.zeros(1, 5, dtype=torch.bool)), ValueError,
     r"cluster_mask must have shape \(5,\), got \(1, 5\)"),
    ("mask-grouped-shape", dict(q=_t(2, 6, 4), centroids=_t(2, 5, 4), answers=_t(2, 5, 3),
                                cluster_mask=torch.zeros(3, 5, dtype=torch.bool)), ValueError,
     r"cluster_mask must have shape \(5,\) or \(2, 5\), got \(3, 5\)"),
    ("mask-meta", dict(cluster_mask=torch.zeros(5, dtype=torch.bool, device="meta")), ValueError,
     r"cluster_mask must be on the same device as q"),
    ("tau-int-tensor", dict(tau=torch.tensor(1)), TypeError,
     r"tau must be a float or a floating tensor, got dtype torch\.int64"),
    ("tau-tensor-zero", dict(tau=torch.tensor(0.0, requires_grad=True)), ValueError,
     r"tau must be finite and > 0, got 0\.0"),
    ("shared-answers-3d", dict(q=_t(2, 6, 4), centroids=_t(5, 4), answers=_t(2, 5, 3)), ValueError,
     r"answers must be \(n, ·\) like centroids \(a shared table\), got shape \(2, 5, 3\)"),
    ("shared-feature-dim", dict(q=_t(2, 6, 4), centroids=_t(5, 3), answers=_t(5, 3)), ValueError,
     r"centroids must have the feature dim of q \(d = 4\), got 3"),
]


def _call(**over):
    kw = dict(q=_t(6, 4), centroids=_t(5, 4), answers=_t(5, 3))
    kw.update(over)
    return rapkern.lda_route(kw.pop("q"), kw.pop("centroids"), kw.pop("answers"), **kw)


@pytest.mark.parametrize("over,exc,match", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_invalid_new_arguments_raise(over, exc, match, monkeypatch):
    from rapkern.backends.torch_blocked import routing as R

    monkeypatch.setattr(R, "route", lambda *a, **k: pytest.fail("computed before validation"))
    with pytest.raises(exc, match=match):
        _call(**over)


OK = [
    ("mask-all-false", dict(cluster_mask=torch.zeros(5, dtype=torch.bool))),
    ("mask-all-true", dict(cluster_mask=torch.ones(5, dtype=torch.bool))),
    ("mask-grouped", dict(q=_t(2, 6, 4), centroids=_t(2, 5, 4), answers=_t(2, 5, 3),
                          cluster_mask=torch.zeros(2, 5, dtype=torch.bool))),
    ("mask-shared-over-groups", dict(q=_t(2, 6, 4), centroids=_t(2, 5, 4), answers=_t(2, 5, 3),
                                     cluster_mask=torch.zeros(5, dtype=torch.bool))),
    ("tau-1-element", dict(tau=torch.tensor([0.5], requires_grad=True))),
    ("shared-table", dict(q=_t(2, 6, 4))),
]


@pytest.mark.parametrize("over", [o[1] for o in OK], ids=[o[0] for o in OK])
def test_new_arguments_boundary_passes(over):
    out = _call(**over)
    assert out.shape[-1] == 3 and out.shape[-2] == 6 and torch.isfinite(out).all()
