"""torch.autograd.gradcheck in float64 on tiny shapes: the "torch" backend's hand-written backward
(tile recomputation, compact prior gradients, alpha, dropout) against finite differences.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior

F64 = torch.float64
GC = dict(eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=0.0)


def _r(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


def _prior_tensors(kind, lead, lq, lk, seed):
    if kind == "none":
        return ()
    if kind == "lag_W0":
        return (_r(*lead, 1, seed=seed),)
    if kind == "lag":
        return (_r(*lead, 5, seed=seed),)
    if kind in ("banded", "banded_masked"):
        return (_r(*lead, lq, 3, seed=seed),)
    if kind == "banded_w_gt_L":
        return (_r(*lead, lq, 2 * (lq + lk) + 1, seed=seed),)
    if kind == "lowrank":
        return (_r(*lead, lq, 2, seed=seed), _r(*lead, lk, 2, seed=seed + 1))
    if kind == "dense":
        return (_r(*lead, lq, lk, seed=seed),)
    raise AssertionError(kind)


def _build(kind, tensors):
    if kind == "none":
        return None
    if kind.startswith("lag"):
        return RelativeLagPrior(*tensors)
    if kind == "banded_masked":
        return BandedPrior(*tensors, mask_outside=True)
    if kind.startswith("banded"):
        return BandedPrior(*tensors)
    if kind == "lowrank":
        return LowRankPrior(*tensors)
    return DensePrior(*tensors)


KINDS = ["none", "lag_W0", "lag", "banded", "banded_masked", "banded_w_gt_L", "lowrank", "dense"]
MASKS = ["plain", "causal", "padding", "causal+padding"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_attention(kind, mask):
    b, hq, hkv, lq, lk, d = 2, 2, 1, 4, 5, 3
    q, k, v = _r(b, hq, lq, d, seed=1), _r(b, hkv, lk, d, seed=2), _r(b, hkv, lk, 2, seed=3)
    pts = _prior_tensors(kind, (hq,), lq, lk, seed=4)
    alpha = _r(hq, seed=5)
    kpm = None
    if "padding" in mask:
        kpm = torch.zeros(b, lk, dtype=torch.bool)
        kpm[0, 1] = True
        kpm[1, 0] = True  # with causal: query 0 of batch 1 sees nothing

    def f(q, k, v, alpha, *pts):
        return rapkern.attention(q, k, v, prior=_build(kind, pts), alpha=alpha, causal="causal" in mask,
                                 key_padding_mask=kpm, backend="torch")

    assert gradcheck(f, (q, k, v, alpha, *pts), **GC)


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_gradcheck_many_blocks(kind, monkeypatch):
    """Lq = 18 > 16 rows per block: gradients accumulated across query blocks."""
    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.001")
    monkeypatch.setenv("RAPKERN_TORCH_FUSED_ROWS", "16")
    b, h, lq, lk, d = 1, 1, 18, 4, 2
    q, k, v = _r(b, h, lq, d, seed=1), _r(b, h, lk, d, seed=2), _r(b, h, lk, 2, seed=3)
    pts = _prior_tensors(kind, (), lq, lk, seed=4)
    alpha = torch.tensor(0.8, dtype=F64, requires_grad=True)

    def f(q, k, v, alpha, *pts):
        return rapkern.attention(q, k, v, prior=_build(kind, pts), alpha=alpha, causal=True, backend="torch")

    assert gradcheck(f, (q, k, v, alpha, *pts), **GC)


@pytest.mark.parametrize("lead", [(), (2,), (1, 2), (2, 1), (2, 2)], ids=lambda s: f"lead{s}")
@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank", "dense"])
def test_gradcheck_prior_broadcast(kind, lead):
    """Prior tensors broadcast over batch and/or heads: their gradient is the reduced sum."""
    b, h, lq, lk, d = 2, 2, 3, 4, 2
    q, k, v = _r(b, h, lq, d, seed=1), _r(b, h, lk, d, seed=2), _r(b, h, lk, d, seed=3)
    pts = _prior_tensors(kind, lead, lq, lk, seed=7)

    def f(*pts):
        return rapkern.attention(q, k, v, prior=_build(kind, pts), alpha=1.3, backend="torch")

    assert gradcheck(f, pts, **GC)


def test_gradcheck_scalar_alpha_and_zero_alpha_head():
    b, h, lq, lk, d = 1, 2, 4, 4, 2
    q, k, v = _r(b, h, lq, d, seed=1), _r(b, h, lk, d, seed=2), _r(b, h, lk, d, seed=3)
    table = _r(3, seed=4)
    for alpha in (torch.tensor(0.7, dtype=F64, requires_grad=True),
                  torch.tensor([0.0, 1.0], dtype=F64, requires_grad=True)):

        def f(alpha, table):
            return rapkern.attention(q, k, v, prior=RelativeLagPrior(table), alpha=alpha, backend="torch")

        assert gradcheck(f, (alpha, table), **GC)


def test_gradcheck_fully_masked_batch():
    """A batch element with every key padded: zero gradients there, finite differences agree."""
    b, h, lq, lk, d = 2, 1, 3, 4, 2
    q, k, v = _r(b, h, lq, d, seed=1), _r(b, h, lk, d, seed=2), _r(b, h, lk, d, seed=3)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1] = True
    bias = _r(b, h, lq, lk, seed=4)

    def f(q, k, v, bias):
        return rapkern.attention(q, k, v, prior=DensePrior(bias), key_padding_mask=kpm, backend="torch")

    assert gradcheck(f, (q, k, v, bias), **GC)


def test_gradcheck_dropout_seeded():
    """Backward consistent with the seeded forward: torch.manual_seed(0) then dropout_p=0.3."""
    b, h, lq, lk, d = 1, 2, 4, 5, 3
    q, k, v = _r(b, h, lq, d, seed=1), _r(b, h, lk, d, seed=2), _r(b, h, lk, d, seed=3)
    table = _r(h, 5, seed=4)
    alpha = torch.tensor([0.5, 1.5], dtype=F64, requires_grad=True)

    def f(q, k, v, alpha, table):
        torch.manual_seed(0)
        return rapkern.attention(q, k, v, prior=RelativeLagPrior(table), alpha=alpha, causal=True,
                                 dropout_p=0.3, backend="torch")

    assert gradcheck(f, (q, k, v, alpha, table), **GC)


# ----------------------------------------------------------------------------------------------------------
# lda_route


@pytest.mark.parametrize("grouped", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("top_k", [None, 1, 2, 4], ids=lambda k: "dense" if k is None else f"top{k}")
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
@pytest.mark.parametrize("return_weights", [False, True], ids=["out", "weights"])
def test_gradcheck_route(normalize, top_k, grouped, return_weights):
    lead = (2,) if grouped else ()
    q, c, a = _r(*lead, 5, 3, seed=1), _r(*lead, 4, 3, seed=2), _r(*lead, 4, 2, seed=3)

    def f(q, c, a):
        res = rapkern.lda_route(q, c, a, tau=0.5, top_k=top_k, normalize=normalize,
                                return_weights=return_weights, backend="torch")
        if not return_weights:
            return res
        out, w = res
        return (out, w) if top_k is None else (out, w[0])

    assert gradcheck(f, (q, c, a), **GC)


def test_gradcheck_route_many_blocks(monkeypatch):
    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.000001")
    monkeypatch.setenv("RAPKERN_TORCH_FUSED_ROWS", "16")
    q, c, a = _r(20, 3, seed=1), _r(3, 3, seed=2), _r(3, 2, seed=3)
    for top_k in (None, 2):
        assert gradcheck(lambda q, c, a, k=top_k: rapkern.lda_route(q, c, a, tau=0.5, top_k=k), (q, c, a), **GC)
