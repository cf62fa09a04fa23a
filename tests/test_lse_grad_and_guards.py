"""Issue 8's smaller findings and what the nn layer relies on:

* the LSE output is differentiable (dlse_i/ds_ij = p_ij), on the torch backend (fused CPU path and tile
  loop) and the Triton backend (interpreter), against the float64 reference under the 2x rule;
* double backward raises an error that names rapkern (first-order gradients under create_graph still work);
* non-finite values in compact priors are rejected up front, on every backend; a dense bias may hold -inf.
"""

from __future__ import annotations

import helpers
import pytest
import torch

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import assert_close_to_reference, reference_attention

FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4}
KINDS = ["none", "lag", "banded_masked", "lowrank", "dense"]


def _skip_without_ext(name):
    if name == "cpp":
        from rapkern import _ext

        if _ext.load():
            pytest.skip(_ext.load())


@pytest.fixture(params=["torch-fused", "torch-blocked", "triton", "cpp"])
def backend(request, monkeypatch):
    _skip_without_ext(request.param)
    if request.param == "torch-blocked":
        from rapkern.backends.torch_blocked import cpu_flash

        monkeypatch.setattr(cpu_flash, "usable", lambda plan: False)
    if request.param == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param.split("-")[0]


def _lse_loss(out, lse, g_out, g_lse):
    """A loss through out and the finite part of lse (dead rows have lse = -inf)."""
    live = torch.isfinite(lse)
    return (out.double() * g_out).sum() + (torch.where(live, lse, torch.zeros_like(lse)).double() * g_lse).sum()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_out", [True, False], ids=["out+lse", "lse-only"])
def test_lse_gradient(backend, kind, causal, with_out):
    dtype = torch.float32 if backend == "torch" else torch.float16
    g = helpers.gen(7)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 19, 23, 16
    base = [torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for h, n in ((hq, lq), (hkv, lk), (hkv, lk))]
    prior64 = helpers.make_prior(kind, (hq,), lq, lk, gen=g)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1, : lk - 3] = True
    kpm[1, lk - 3 :] = True  # batch 1 sees nothing: lse -inf there, gradients must stay finite (0)
    g_out = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64) * float(with_out)
    g_lse = torch.randn(b, hq, lq, generator=g, dtype=torch.float64)

    def grads(dt, fn, **kw):
        leaves = [helpers.leaf_like(t, dt).requires_grad_(True) for t in base]
        prior = None if prior64 is None else prior64.with_tensors(
            *(helpers.leaf_like(t, dt) for t in prior64.tensors())
        )
        ins = leaves + ([] if prior is None else list(prior.tensors()))
        out, lse = fn(*leaves, prior=prior, causal=causal, key_padding_mask=kpm, return_lse=True, **kw)
        got = torch.autograd.grad(_lse_loss(out, lse, g_out, g_lse), ins, allow_unused=True)
        return [torch.zeros_like(t) if x is None else x for x, t in zip(got, ins)]

    got = grads(dtype, rapkern.attention, backend=backend)
    ref = grads(torch.float64, reference_attention)
    low = grads(dtype, reference_attention, compute_dtype=dtype)
    for i, (a, r, e) in enumerate(zip(got, ref, low)):
        assert a.shape == r.shape and torch.isfinite(a).all()
        assert_close_to_reference(f"grad[{i}]", a, r, e, helpers.scaled_floor(FLOOR, dtype, r, max(lq, lk)))


@pytest.mark.parametrize("path", ["torch", "triton", "cpp"])
def test_double_backward_raises_clearly(path, monkeypatch):
    _skip_without_ext(path)
    if path == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = helpers.gen(1)
    q = torch.randn(1, 2, 9, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 9, 8, generator=g, requires_grad=True)
    table = torch.randn(2, 5, generator=g, requires_grad=True)
    out = rapkern.attention(q, k, k, prior=RelativeLagPrior(table), causal=True, backend=path)
    dq, dt = torch.autograd.grad(out.square().sum(), (q, table), create_graph=True)
    # first-order values are the same as without create_graph
    out2 = rapkern.attention(q, k, k, prior=RelativeLagPrior(table), causal=True, backend=path)
    dq2, dt2 = torch.autograd.grad(out2.square().sum(), (q, table))
    assert torch.equal(dq, dq2) and torch.equal(dt, dt2)
    with pytest.raises(RuntimeError, match="rapkern: double backward"):
        (dq.square().sum() + dt.sum()).backward()


def _nonfinite_priors(value):
    lag = torch.zeros(2, 5)
    lag[1, 0] = value
    band = torch.zeros(2, 8, 3)
    band[0, 3, 1] = value
    u = torch.zeros(8, 2)
    u[2, 1] = value
    return [
        ("RelativeLagPrior.table", RelativeLagPrior(lag)),
        ("BandedPrior.values", BandedPrior(band)),
        ("BandedPrior.values", BandedPrior(band, mask_outside=True)),
        ("LowRankPrior.u", LowRankPrior(u, torch.zeros(8, 2))),
        ("LowRankPrior.v", LowRankPrior(torch.zeros(8, 2), u)),
    ]


@pytest.mark.parametrize("value", [float("-inf"), float("inf"), float("nan")])
@pytest.mark.parametrize("backend_name", ["torch", "reference", "triton", "cpp"])
def test_nonfinite_compact_prior_rejected(value, backend_name, monkeypatch):
    _skip_without_ext(backend_name)
    if backend_name == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 8, 8)
    for name, prior in _nonfinite_priors(value):
        with pytest.raises(ValueError, match=rf"{name} must not contain non-finite values"):
            rapkern.attention(q, q, q, prior=prior, alpha=torch.tensor([0.0, 1.0]), backend=backend_name)


def test_dense_prior_inf_rules():
    q = torch.randn(1, 2, 6, 8)
    bias = torch.zeros(6, 6)
    bias[:, 2] = float("-inf")  # a mask, for every head whatever alpha (alpha = 0 included)
    out = rapkern.attention(q, q, q, prior=DensePrior(bias), alpha=torch.tensor([0.0, 1.0]))
    ref = reference_attention(q, q, q, prior=DensePrior(bias), alpha=torch.tensor([0.0, 1.0]))
    assert torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-5)
    for value in (float("inf"), float("nan")):
        bad = bias.clone()
        bad[3, 4] = value
        with pytest.raises(ValueError, match="DensePrior.bias must not contain NaN or \\+inf"):
            rapkern.attention(q, q, q, prior=DensePrior(bad))


def test_nonfinite_prior_rejected_under_compile():
    """torch.compile(fullgraph=True) keeps tracing: the check becomes an in-graph assert."""
    table = torch.zeros(2, 5)

    def f(q, k, v, t):
        return rapkern.attention(q, k, v, prior=RelativeLagPrior(t), backend="torch")

    cf = torch.compile(f, fullgraph=True, backend="eager")
    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    torch.testing.assert_close(cf(q, k, v, table), f(q, k, v, table))
    table[0, 1] = float("nan")
    with pytest.raises(RuntimeError, match="RelativeLagPrior.table must not contain non-finite"):
        cf(q, k, v, table)


def test_compile_fullgraph_self_attention_same_tensor():
    """attention(x, x, x) (one tensor three times) traces with fullgraph=True; gradients add up on x."""
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    table = torch.randn(2, 5, requires_grad=True)

    def f(x, t):
        return rapkern.attention(x, x, x, prior=RelativeLagPrior(t), causal=True, backend="torch")

    out = torch.compile(f, fullgraph=True, backend="eager")(x, table)
    gx, gt = torch.autograd.grad(out.square().sum(), (x, table))
    x64, t64 = x.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    ref = reference_attention(x64, x64, x64, prior=RelativeLagPrior(t64), causal=True)
    rx, rt = torch.autograd.grad(ref.square().sum(), (x64, t64))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt.double(), rt, rtol=1e-4, atol=1e-5)
