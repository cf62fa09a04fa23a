# ruff: noqa: E501  (one table row per error case reads better unwrapped)
"""Every invalid input raises before any computation, with a message naming the argument; each error
sits next to a passing case at the boundary.
"""

from __future__ import annotations

import math

import pytest
import torch

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.backends.torch_blocked import TorchBackend

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 7, 8


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def base():
    return dict(q=t(B, HQ, LQ, D), k=t(B, HKV, LK, D), v=t(B, HKV, LK, D))


@pytest.fixture
def no_compute(monkeypatch):
    """Fail loudly if any backend computes: errors must be raised before dispatch."""

    def boom(*a, **k):
        raise AssertionError("a backend ran although the input was invalid")

    monkeypatch.setattr(TorchBackend, "attention", boom)
    monkeypatch.setattr(TorchBackend, "route", boom)
    from rapkern.backends.reference import ReferenceBackend

    monkeypatch.setattr(ReferenceBackend, "attention", boom)
    monkeypatch.setattr(ReferenceBackend, "route", boom)


def call(**over):
    kw = base()
    kw.update(over)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    return rapkern.attention(q, k, v, **kw)


# (id, overrides, exception, match)
ATTENTION_ERRORS = [
    # q/k/v types, ranks and sizes
    ("q-not-tensor", lambda: dict(q=[1.0]), TypeError, r"q must be a torch\.Tensor"),
    ("q-int-dtype", lambda: dict(q=torch.ones(B, HQ, LQ, D, dtype=torch.int32)), TypeError, r"q must have a floating dtype"),
    ("q-3d", lambda: dict(q=t(B, LQ, D)), ValueError, r"q must be 4-D"),
    ("k-5d", lambda: dict(k=t(B, HKV, LK, D, 1)), ValueError, r"k must be 4-D"),
    ("v-3d", lambda: dict(v=t(HKV, LK, D)), ValueError, r"v must be 4-D"),
    ("k-dtype-mismatch", lambda: dict(k=t(B, HKV, LK, D, dtype=torch.float64)), TypeError, r"k must have the same dtype as q"),
    ("v-dtype-mismatch", lambda: dict(v=t(B, HKV, LK, D, dtype=torch.float16)), TypeError, r"v must have the same dtype as q"),
    ("k-meta-device", lambda: dict(k=t(B, HKV, LK, D, device="meta")), ValueError, r"k must be on the same device as q"),
    ("v-meta-device", lambda: dict(v=t(B, HKV, LK, D, device="meta")), ValueError, r"v must be on the same device as q"),
    ("batch-mismatch-k", lambda: dict(k=t(B + 1, HKV, LK, D)), ValueError, r"q, k, v must share the batch size"),
    ("batch-mismatch-v", lambda: dict(v=t(1, HKV, LK, D)), ValueError, r"q, k, v must share the batch size"),
    ("v-heads", lambda: dict(v=t(B, HKV + 1, LK, D)), ValueError, r"v must have the same number of heads as k"),
    ("v-length", lambda: dict(v=t(B, HKV, LK + 1, D)), ValueError, r"v must have the same length as k"),
    ("k-head-dim", lambda: dict(k=t(B, HKV, LK, D + 1)), ValueError, r"k must have the same head dim as q"),
    ("head-dim-zero", lambda: dict(q=t(B, HQ, LQ, 0), k=t(B, HKV, LK, 0)), ValueError, r"head dims must be >= 1"),
    ("dv-zero", lambda: dict(v=t(B, HKV, LK, 0)), ValueError, r"head dims must be >= 1"),
    ("gqa-not-multiple", lambda: dict(k=t(B, 3, LK, D), v=t(B, 3, LK, D)), ValueError, r"Hq = 4 must be a multiple of .*Hkv = 3"),
    ("hkv-zero", lambda: dict(k=t(B, 0, LK, D), v=t(B, 0, LK, D)), ValueError, r"multiple of the key/value heads Hkv = 0"),
    # flags and scalars
    ("causal-not-bool", lambda: dict(causal=1), TypeError, r"causal must be a bool"),
    ("scale-str", lambda: dict(scale="1"), TypeError, r"scale must be a float or None"),
    ("scale-bool", lambda: dict(scale=True), TypeError, r"scale must be a float or None"),
    ("scale-inf", lambda: dict(scale=math.inf), ValueError, r"scale must be finite"),
    ("scale-nan", lambda: dict(scale=math.nan), ValueError, r"scale must be finite"),
    ("dropout-1", lambda: dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-neg", lambda: dict(dropout_p=-0.01), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-nan", lambda: dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-tensor", lambda: dict(dropout_p=torch.tensor(0.1)), TypeError, r"dropout_p must be a float"),
    ("dropout-bool", lambda: dict(dropout_p=False), TypeError, r"dropout_p must be a float"),
    ("return-lse-not-bool", lambda: dict(return_lse=1), TypeError, r"return_lse must be a bool"),
    # key padding mask
    ("kpm-not-tensor", lambda: dict(key_padding_mask=[[True] * LK] * B), TypeError, r"key_padding_mask must be a bool tensor"),
    ("kpm-float", lambda: dict(key_padding_mask=torch.zeros(B, LK)), TypeError, r"key_padding_mask must have dtype torch\.bool"),
    ("kpm-uint8", lambda: dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.uint8)), TypeError, r"key_padding_mask must have dtype torch\.bool"),
    ("kpm-shape-Lq", lambda: dict(key_padding_mask=torch.zeros(B, LQ, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \(B, Lk\) = \(2, 7\)"),
    ("kpm-shape-3d", lambda: dict(key_padding_mask=torch.zeros(B, 1, LK, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    ("kpm-meta", lambda: dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.bool, device="meta")), ValueError, r"key_padding_mask must be on the same device as q"),
    # alpha
    ("alpha-bool", lambda: dict(alpha=True), TypeError, r"alpha must be a float or a floating tensor.*got bool"),
    ("alpha-str", lambda: dict(alpha="1"), TypeError, r"alpha must be a float or a floating tensor"),
    ("alpha-inf", lambda: dict(alpha=math.inf), ValueError, r"alpha must be finite"),
    ("alpha-int-tensor", lambda: dict(alpha=torch.ones(HQ, dtype=torch.int64)), TypeError, r"alpha must be a floating tensor"),
    ("alpha-shape-Hkv", lambda: dict(alpha=torch.ones(HKV)), ValueError, r"alpha must have shape \(\) or \(Hq,\) = \(4,\)"),
    ("alpha-shape-2d", lambda: dict(alpha=torch.ones(1, HQ)), ValueError, r"alpha must have shape \(\) or \(Hq,\)"),
    ("alpha-meta", lambda: dict(alpha=torch.ones(HQ, device="meta")), ValueError, r"alpha must be on the same device as q"),
    # prior object
    ("prior-not-prior", lambda: dict(prior=t(LQ, LK)), TypeError, r"prior must be None or a rapkern prior"),
    # prior leading dims
    ("lag-heads-Hkv", lambda: dict(prior=RelativeLagPrior(t(HKV, 5))), ValueError, r"RelativeLagPrior\.table leading dims \(2,\) do not broadcast"),
    ("lag-batch-3", lambda: dict(prior=RelativeLagPrior(t(3, HQ, 5))), ValueError, r"RelativeLagPrior\.table leading dims \(3, 4\) do not broadcast"),
    ("lag-3-lead-dims", lambda: dict(prior=RelativeLagPrior(t(1, B, HQ, 5))), ValueError, r"RelativeLagPrior\.table must have 1 trailing dims"),
    ("lag-0d", lambda: dict(prior=RelativeLagPrior(torch.tensor(1.0))), ValueError, r"RelativeLagPrior\.table must have 1 trailing dims"),
    ("lag-even", lambda: dict(prior=RelativeLagPrior(t(4))), ValueError, r"RelativeLagPrior\.table must have odd length 2W\+1.*got 4"),
    ("lag-int", lambda: dict(prior=RelativeLagPrior(torch.ones(5, dtype=torch.int64))), TypeError, r"RelativeLagPrior\.table must be a floating-point tensor"),
    ("lag-not-tensor", lambda: dict(prior=RelativeLagPrior([1.0, 2.0, 3.0])), TypeError, r"RelativeLagPrior\.table must be a torch\.Tensor"),
    ("lag-meta", lambda: dict(prior=RelativeLagPrior(t(5, device="meta"))), ValueError, r"RelativeLagPrior\.table must be on the same device as q"),
    ("banded-rows-Lk", lambda: dict(prior=BandedPrior(t(LK, 3))), ValueError, r"BandedPrior\.values must have Lq = 5 rows"),
    ("banded-even", lambda: dict(prior=BandedPrior(t(LQ, 4))), ValueError, r"BandedPrior\.values must have odd width 2w\+1"),
    ("banded-lead", lambda: dict(prior=BandedPrior(t(B, 3, LQ, 3))), ValueError, r"BandedPrior\.values leading dims \(2, 3\) do not broadcast"),
    ("banded-1d", lambda: dict(prior=BandedPrior(t(3))), ValueError, r"BandedPrior\.values must have 2 trailing dims"),
    ("lowrank-u-rows", lambda: dict(prior=LowRankPrior(t(LK, 2), t(LK, 2))), ValueError, r"LowRankPrior\.u must have Lq = 5 rows"),
    ("lowrank-v-rows", lambda: dict(prior=LowRankPrior(t(LQ, 2), t(LQ, 2))), ValueError, r"LowRankPrior\.v must have Lk = 7 rows"),
    ("lowrank-ranks", lambda: dict(prior=LowRankPrior(t(LQ, 2), t(LK, 3))), ValueError, r"LowRankPrior\.u and LowRankPrior\.v must have the same rank.*2 and 3"),
    ("lowrank-v-lead", lambda: dict(prior=LowRankPrior(t(LQ, 2), t(HKV, LK, 2))), ValueError, r"LowRankPrior\.v leading dims \(2,\) do not broadcast"),
    ("lowrank-u-dtype", lambda: dict(prior=LowRankPrior(torch.ones(LQ, 2, dtype=torch.int32), t(LK, 2))), TypeError, r"LowRankPrior\.u must be a floating-point tensor"),
    ("lowrank-v-meta", lambda: dict(prior=LowRankPrior(t(LQ, 2), t(LK, 2, device="meta"))), ValueError, r"LowRankPrior\.v must be on the same device"),
    ("dense-transposed", lambda: dict(prior=DensePrior(t(LK, LQ))), ValueError, r"DensePrior\.bias must end in \(Lq, Lk\) = \(5, 7\)"),
    ("dense-lead", lambda: dict(prior=DensePrior(t(B + 1, HQ, LQ, LK))), ValueError, r"DensePrior\.bias leading dims \(3, 4\) do not broadcast"),
    ("dense-bool", lambda: dict(prior=DensePrior(torch.zeros(LQ, LK, dtype=torch.bool))), TypeError, r"DensePrior\.bias must be a floating-point tensor"),
    # backend argument
    ("backend-unknown", lambda: dict(backend="cuda-magic"), ValueError, r"backend must be 'auto' or one of \["),
    ("backend-not-str", lambda: dict(backend=None), TypeError, r"backend must be a str"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in ATTENTION_ERRORS], ids=[c[0] for c in ATTENTION_ERRORS])
def test_attention_invalid_input_raises(over, exc, match, no_compute):
    with pytest.raises(exc, match=match):
        call(**over())


# Passing cases at each boundary (computed, so no ``no_compute`` here).
ATTENTION_OK = [
    ("dropout-0", lambda: dict(dropout_p=0.0)),
    ("dropout-just-below-1", lambda: dict(dropout_p=0.999)),
    ("dropout-int-0", lambda: dict(dropout_p=0)),
    ("scale-int", lambda: dict(scale=1)),
    ("scale-none", lambda: dict(scale=None)),
    ("scale-zero", lambda: dict(scale=0.0)),
    ("alpha-int", lambda: dict(alpha=2)),
    ("alpha-0d", lambda: dict(alpha=torch.tensor(0.5))),
    ("alpha-Hq", lambda: dict(alpha=torch.ones(HQ))),
    ("alpha-other-float-dtype", lambda: dict(alpha=torch.ones(HQ, dtype=torch.float64))),
    ("gqa-Hkv1", lambda: dict(k=t(B, 1, LK, D), v=t(B, 1, LK, D))),
    ("mha", lambda: dict(k=t(B, HQ, LK, D), v=t(B, HQ, LK, D))),
    ("dv-differs", lambda: dict(v=t(B, HKV, LK, 3))),
    ("kpm-ok", lambda: dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.bool))),
    ("lag-W0", lambda: dict(prior=RelativeLagPrior(t(1)))),
    ("lag-lead-Hq", lambda: dict(prior=RelativeLagPrior(t(HQ, 5)))),
    ("lag-lead-1", lambda: dict(prior=RelativeLagPrior(t(1, 5)))),
    ("lag-lead-B-1", lambda: dict(prior=RelativeLagPrior(t(B, 1, 5)))),
    ("lag-other-dtype", lambda: dict(prior=RelativeLagPrior(t(5, dtype=torch.float64)))),
    ("banded-rows-Lq", lambda: dict(prior=BandedPrior(t(LQ, 3)))),
    ("banded-w-gt-L", lambda: dict(prior=BandedPrior(t(LQ, 41), mask_outside=True))),
    ("lowrank-ok", lambda: dict(prior=LowRankPrior(t(LQ, 2), t(B, HQ, LK, 2)))),
    ("dense-lead-B-Hq", lambda: dict(prior=DensePrior(t(B, HQ, LQ, LK)))),
    ("dense-lead-1-1", lambda: dict(prior=DensePrior(t(1, 1, LQ, LK)))),
]


@pytest.mark.parametrize("over", [c[1] for c in ATTENTION_OK], ids=[c[0] for c in ATTENTION_OK])
def test_attention_boundary_passes(over):
    out = call(**over())
    assert out.shape[:3] == (B, HQ, LQ) and torch.isfinite(out).all()


def test_validation_happens_before_dispatch(monkeypatch):
    """The dispatcher is not even consulted for an invalid input."""
    from rapkern import dispatch

    calls = []
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="dropout_p"):
        call(dropout_p=1.0)
    with pytest.raises(ValueError, match="tau"):
        rapkern.lda_route(t(3, 4), t(5, 4), t(5, 2), tau=0.0)
    assert calls == []


# ----------------------------------------------------------------------------------------------------------
# lda_route


N, NC, DD, E = 6, 5, 4, 3


def route_call(**over):
    kw = dict(q=t(N, DD), centroids=t(NC, DD), answers=t(NC, E))
    kw.update(over)
    return rapkern.lda_route(kw.pop("q"), kw.pop("centroids"), kw.pop("answers"), **kw)


ROUTE_ERRORS = [
    ("q-not-tensor", lambda: dict(q=1.0), TypeError, r"q must be a torch\.Tensor"),
    ("centroids-int", lambda: dict(centroids=torch.ones(NC, DD, dtype=torch.int64)), TypeError, r"centroids must have a floating dtype"),
    ("answers-not-tensor", lambda: dict(answers="a"), TypeError, r"answers must be a torch\.Tensor"),
    ("q-1d", lambda: dict(q=t(DD)), ValueError, r"q must be \(N, d\) or \(G, N, d\)"),
    ("q-4d", lambda: dict(q=t(1, 1, N, DD)), ValueError, r"q must be \(N, d\) or \(G, N, d\)"),
    ("centroids-rank", lambda: dict(centroids=t(1, NC, DD)), ValueError, r"centroids must be \(n, ·\) like q \(rank 2\)"),
    ("answers-rank-3d", lambda: dict(q=t(2, N, DD), centroids=t(2, NC, DD), answers=t(NC, E)), ValueError, r"answers must be \(G, n, ·\) like q \(rank 3\)"),
    ("centroids-dtype", lambda: dict(centroids=t(NC, DD, dtype=torch.float64)), TypeError, r"centroids must have the same dtype as q"),
    ("answers-dtype", lambda: dict(answers=t(NC, E, dtype=torch.float16)), TypeError, r"answers must have the same dtype as q"),
    ("centroids-meta", lambda: dict(centroids=t(NC, DD, device="meta")), ValueError, r"centroids must be on the same device as q"),
    ("answers-meta", lambda: dict(answers=t(NC, E, device="meta")), ValueError, r"answers must be on the same device as q"),
    ("group-mismatch", lambda: dict(q=t(2, N, DD), centroids=t(3, NC, DD), answers=t(2, NC, E)), ValueError, r"must share the group dim G: got 2, 3, 2"),
    ("feature-dim", lambda: dict(centroids=t(NC, DD + 1)), ValueError, r"centroids must have the feature dim of q \(d = 4\)"),
    ("n-mismatch", lambda: dict(answers=t(NC + 1, E)), ValueError, r"centroids and answers must have the same number of clusters n: got 5 and 6"),
    ("n-zero", lambda: dict(centroids=t(0, DD), answers=t(0, E)), ValueError, r"centroids must hold at least one cluster"),
    ("tau-zero", lambda: dict(tau=0.0), ValueError, r"tau must be finite and > 0"),
    ("tau-negative", lambda: dict(tau=-0.1), ValueError, r"tau must be finite and > 0"),
    ("tau-inf", lambda: dict(tau=math.inf), ValueError, r"tau must be finite and > 0"),
    ("tau-nan", lambda: dict(tau=math.nan), ValueError, r"tau must be finite and > 0"),
    ("tau-tensor-2", lambda: dict(tau=torch.tensor([0.1, 0.2])), ValueError, r"tau must be a scalar"),
    ("tau-str", lambda: dict(tau="0.1"), TypeError, r"tau must be a float"),
    ("tau-bool", lambda: dict(tau=True), TypeError, r"tau must be a float"),
    ("top_k-0", lambda: dict(top_k=0), ValueError, r"top_k must be in \[1, n\] = \[1, 5\], got 0"),
    ("top_k-n+1", lambda: dict(top_k=NC + 1), ValueError, r"top_k must be in \[1, n\] = \[1, 5\], got 6"),
    ("top_k-float", lambda: dict(top_k=2.0), TypeError, r"top_k must be None or an int"),
    ("top_k-bool", lambda: dict(top_k=True), TypeError, r"top_k must be None or an int"),
    ("normalize-int", lambda: dict(normalize=1), TypeError, r"normalize must be a bool"),
    ("return_weights-int", lambda: dict(return_weights=1), TypeError, r"return_weights must be a bool"),
    ("backend-unknown", lambda: dict(backend="nope"), ValueError, r"backend must be 'auto' or one of"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in ROUTE_ERRORS], ids=[c[0] for c in ROUTE_ERRORS])
def test_route_invalid_input_raises(over, exc, match, no_compute):
    with pytest.raises(exc, match=match):
        route_call(**over())


ROUTE_OK = [
    ("top_k-n", lambda: dict(top_k=NC)),
    ("top_k-1", lambda: dict(top_k=1)),
    ("tau-tiny", lambda: dict(tau=1e-6)),
    ("tau-int", lambda: dict(tau=1)),
    ("tau-0d-tensor", lambda: dict(tau=torch.tensor(0.5))),
    ("n-1", lambda: dict(centroids=t(1, DD), answers=t(1, E))),
    ("grouped", lambda: dict(q=t(2, N, DD), centroids=t(2, NC, DD), answers=t(2, NC, E))),
    ("normalize-false", lambda: dict(normalize=False)),
]


@pytest.mark.parametrize("over", [c[1] for c in ROUTE_OK], ids=[c[0] for c in ROUTE_OK])
def test_route_boundary_passes(over):
    out = route_call(**over())
    assert out.shape[-1] == E and torch.isfinite(out).all()
