"""rapkern.nn.LDARouter and HierarchicalRouter: equal to the functional calls they wrap, parameters vs
buffers, a learnable temperature, domain grouping, the meta-router's training."""

from __future__ import annotations

import pytest
import torch

import rapkern
from rapkern.nn import HierarchicalRouter, LDARouter
from rapkern.nn.routing import kmeans
from rapkern.testing import reference_lda_route

F64 = torch.float64


def _t(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# LDARouter


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
def test_ldarouter_equals_lda_route(top_k):
    c, a = _t(9, 6, seed=1), _t(9, 4, seed=2)
    r = LDARouter(c, a, tau=0.2, top_k=top_k)
    q = _t(11, 6, seed=3)
    torch.testing.assert_close(r(q), reference_lda_route(q, c, a, tau=0.2, top_k=top_k))
    w = r.weights(q)
    ref_w = reference_lda_route(q, c, a, tau=0.2, top_k=top_k, return_weights=True)[1]
    if top_k is None:
        torch.testing.assert_close(w, ref_w)
        torch.testing.assert_close(w.sum(-1), torch.ones(11, dtype=F64))
    else:
        torch.testing.assert_close(w[0], ref_w[0])
        assert torch.equal(w[1], ref_w[1])


def test_ldarouter_batched_queries_share_the_table():
    c, a = _t(7, 5, seed=4), _t(7, 3, seed=5)
    r = LDARouter(c, a, tau=0.3)
    q = _t(4, 6, 5, seed=6)
    out = r(q)
    assert out.shape == (4, 6, 3)
    for b in range(4):
        torch.testing.assert_close(out[b], r(q[b]))
    assert r.weights(q).shape == (4, 6, 7)


def test_ldarouter_buffers_when_frozen():
    r = LDARouter(_t(5, 4, seed=7), _t(5, 2, seed=8))
    assert list(r.parameters()) == []
    assert {"centroids", "answers", "log_tau"} <= set(r.state_dict())
    torch.testing.assert_close(r.tau, torch.tensor(0.1))


def test_ldarouter_learnable_gets_gradients_including_tau():
    c, a = _t(6, 4, seed=9, dtype=torch.float32), _t(6, 3, seed=10, dtype=torch.float32)
    r = LDARouter(c, a, tau=0.5, learnable=True)
    assert {n for n, _ in r.named_parameters()} == {"centroids", "answers", "log_tau"}
    q = _t(8, 4, seed=11, dtype=torch.float32)
    r(q).square().sum().backward()
    for p in r.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # d/d log τ = τ · d/dτ, checked against the reference with a float64 leaf τ
    tau = torch.tensor(0.5, dtype=F64, requires_grad=True)
    ref = reference_lda_route(q.double(), c.double(), a.double(), tau=tau).square().sum()
    (g,) = torch.autograd.grad(ref, tau)
    torch.testing.assert_close(r.log_tau.grad.double(), 0.5 * g, rtol=1e-4, atol=1e-6)


def test_ldarouter_cluster_mask_and_repr():
    c, a = _t(6, 4, seed=12), _t(6, 3, seed=13)
    r = LDARouter(c, a, tau=0.2)
    mask = torch.tensor([False, True, False, True, False, False])
    q = _t(5, 4, seed=14)
    torch.testing.assert_close(r(q, cluster_mask=mask), reference_lda_route(q, c[~mask], a[~mask], tau=0.2))
    assert "clusters=6, d=4, e=3" in repr(r) and "tau=0.2" in repr(r)


def test_ldarouter_keeps_its_own_copy():
    c = _t(4, 3, seed=15)
    r = LDARouter(c, _t(4, 2, seed=16))
    c.zero_()
    assert r.centroids.abs().sum() > 0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(centroids=[[1.0]]), TypeError, r"centroids must be a torch\.Tensor"),
    (dict(answers=torch.ones(5, 2, dtype=torch.int64)), TypeError, r"answers must be a floating tensor"),
    (dict(centroids=torch.ones(5)), ValueError, r"centroids must be \(n, ·\) or \(G, n, ·\)"),
    (dict(answers=torch.ones(4, 2)), ValueError, r"centroids and answers must agree in all but the last dim"),
    (dict(tau=0.0), ValueError, r"tau must be finite and > 0"),
    (dict(tau="1"), TypeError, r"tau must be a float"),
    (dict(top_k=6), ValueError, r"top_k must be in \[1, n\] = \[1, 5\], got 6"),
    (dict(top_k=2.0), TypeError, r"top_k must be None or an int"),
    (dict(learnable=1), TypeError, r"learnable must be a bool"),
], ids=["c-list", "a-int", "c-1d", "n-mismatch", "tau-0", "tau-str", "top_k-big", "top_k-float", "learnable-int"])
def test_ldarouter_invalid_arguments(kw, exc, match):
    args = dict(centroids=torch.ones(5, 3), answers=torch.ones(5, 2))
    args.update(kw)
    with pytest.raises(exc, match=match):
        LDARouter(**args)


def test_ldarouter_boundary_arguments():
    r = LDARouter(torch.randn(5, 3), torch.randn(5, 2), top_k=5, tau=1)
    assert r(torch.randn(2, 3)).shape == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# k-means and HierarchicalRouter


def _grouped_table(n_dom=3, per=4, d=6, e=3, seed=20):
    """Clusters around n_dom well separated directions: k-means must recover the groups."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(d, dtype=F64)[:n_dom] * 5
    c = torch.cat([dirs[i] + 0.3 * torch.randn(per, d, generator=g, dtype=F64) for i in range(n_dom)])
    perm = torch.randperm(n_dom * per, generator=g)
    truth = torch.arange(n_dom).repeat_interleave(per)[perm]
    return c[perm], torch.randn(n_dom * per, e, generator=g, dtype=F64), truth


def _same_partition(a, b):
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_kmeans_recovers_separated_groups_and_is_reproducible():
    c, _, truth = _grouped_table()
    labels = kmeans(c, 3, seed=1)
    assert _same_partition(labels, truth)
    assert torch.equal(labels, kmeans(c, 3, seed=1))


def test_hierarchical_domains_from_kmeans_and_labels():
    c, a, truth = _grouped_table()
    h = HierarchicalRouter(c, a, num_domains=3)
    assert _same_partition(h.labels, truth)
    # user labels with gaps are renumbered; domain tables hold exactly their clusters, padded and masked
    labels = torch.tensor([5, 5, 9, 9, 9, 2, 2, 2, 2, 5, 9, 2])
    h2 = HierarchicalRouter(c, a, labels=labels)
    assert h2.num_domains == 3 and h2.members.shape == (3, 5)  # domain sizes 5, 3, 4
    for dom in range(3):
        ids = h2.members[dom][~h2.cluster_mask[dom]]
        assert torch.equal(torch.sort(ids).values, (torch.searchsorted(torch.tensor([2, 5, 9]), labels) == dom)
                           .nonzero().flatten())
        torch.testing.assert_close(h2.centroids[dom, : len(ids)], c[ids])


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_hierarchical_forward_equals_its_definition(top_k):
    """forward = Σ over the top domains of softmax(meta logits) · that domain's routing, per query."""
    c, a, _ = _grouped_table()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])  # unequal sizes: 5, 4, 3
    h = HierarchicalRouter(c, a, labels=labels, tau=0.3, top_k=top_k, top_domains=2)
    q = _t(9, 6, seed=21)
    out = h(q)
    logits = h.meta(q)
    want = []
    for i in range(9):
        top = logits[i].topk(2)
        w = torch.softmax(top.values, -1)
        parts = [reference_lda_route(q[i:i + 1], c[labels == dm], a[labels == dm], tau=0.3, top_k=top_k)
                 for dm in top.indices.tolist()]
        want.append(sum(wt * p for wt, p in zip(w, parts)))
    torch.testing.assert_close(out, torch.cat(want))
    # the batched domain tables equal separate calls
    dom = h.domain_outputs(q)
    for dm in range(3):
        torch.testing.assert_close(dom[dm], reference_lda_route(q, c[labels == dm], a[labels == dm], tau=0.3,
                                                                top_k=top_k))


def test_hierarchical_all_domains_and_full():
    c, a, _ = _grouped_table()
    h = HierarchicalRouter(c, a, num_domains=3, top_domains=3)
    q = _t(5, 6, seed=22)
    torch.testing.assert_close(h.full(q), rapkern.lda_route(q, c, a, tau=0.1))
    w, dom = h.domain_weights(q)
    assert w.shape == dom.shape == (5, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, dtype=F64))


def test_hierarchical_fit_reduces_the_mse_to_the_full_routing():
    c, a, _ = _grouped_table(n_dom=4, per=6, d=8, e=4, seed=23)
    h = HierarchicalRouter(c.float(), a.float(), num_domains=4, top_domains=1, tau=0.2, hidden=32)
    q = (c[torch.randint(24, (256,), generator=torch.Generator().manual_seed(0))] +
         0.5 * _t(256, 8, seed=24)).float()
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(h(q), h.full(q)).item()
    h.fit(q, steps=60, lr=3e-2, batch=128)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(h(q), h.full(q)).item()
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(), ValueError, r"give num_domains"),
    (dict(labels=torch.zeros(11, dtype=torch.int64)), ValueError, r"labels must have shape \(n,\) = \(12,\)"),
    (dict(labels=torch.zeros(12)), TypeError, r"labels must be an integer tensor"),
    (dict(labels=-torch.ones(12, dtype=torch.int64)), ValueError, r"labels must be >= 0"),
    (dict(num_domains=3, top_domains=4), ValueError, r"top_domains must be an int in \[1, 3\], got 4"),
    (dict(num_domains=13), ValueError, r"k must be in \[1, n\] = \[1, 12\], got 13"),
    (dict(num_domains=3, top_k=5), ValueError, r"top_k must be in \[1, largest domain\] = \[1, 4\], got 5"),
], ids=["no-domains", "labels-shape", "labels-float", "labels-negative", "top_domains", "k-too-big", "top_k"])
def test_hierarchical_invalid_arguments(kw, exc, match):
    c, a, _ = _grouped_table()
    with pytest.raises(exc, match=match):
        HierarchicalRouter(c, a, **kw)
