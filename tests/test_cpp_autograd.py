"""The C++ op's widened call contract and its hand-written autograd node (csrc/autograd.cpp).

The op takes priors and alpha as users make them (leading dims (), (Hp,) or (Bp, Hp); any floating dtype;
alpha of shape ()), q/k/v with any strides, and checks the prior's values itself; its autograd node returns
each gradient in its input's shape and dtype, refuses a backward after an in-place change of an input or
output, and a second backward through a freed graph. Every case is compared with the op called on the
conversions done by hand in Python (the previous contract), which the cross-backend tests pin to float64.
"""

from __future__ import annotations

import helpers
import pytest
import torch

from rapkern import _ext

pytestmark = pytest.mark.skipif(_ext.load() is not None, reason=str(_ext.load()))

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 9, 11, 8
LAG, BANDED, LOWRANK, DENSE = 1, 2, 3, 4


def _op(*args):
    return torch.ops.rapkern.attention_fwd.default(*args)


def _qkv(seed=0, dtype=torch.float32):
    g = helpers.gen(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype).requires_grad_()
            for h, n in ((HQ, LQ), (HKV, LK), (HKV, LK))]


def _call(q, k, v, alpha, kind, p0, p1=None, causal=True):
    return _op(q, k, v, None, alpha, 0.0, kind, p0, p1, False, causal, 0.3, 0.0, 0)


def _lead4(t, trailing):
    while t.dim() < trailing + 2:
        t = t.unsqueeze(0)
    return t


def _grads(out, lse, leaves, seed=5):
    g = helpers.gen(seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum() + (lse * torch.randn(lse.shape, generator=g)).sum()
    return torch.autograd.grad(loss, leaves)


PRIOR_CASES = [  # (kind, prior0 shape, prior1 shape)
    (LAG, (7,), None), (LAG, (HQ, 7), None), (LAG, (B, 1, 7), None),
    (BANDED, (LQ, 5), None), (BANDED, (1, LQ, 5), None),
    (LOWRANK, (LQ, 3), (HQ, LK, 3)),
    (DENSE, (LQ, LK), None), (DENSE, (HQ, LQ, LK), None),
]


@pytest.mark.parametrize("kind,s0,s1", PRIOR_CASES)
@pytest.mark.parametrize("prior_dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("alpha_shape", [(), (HQ,)])
def test_user_shaped_prior_and_alpha_match_explicit_conversion(kind, s0, s1, prior_dtype, alpha_shape):
    g = helpers.gen(1)
    p0 = torch.randn(s0, generator=g).to(prior_dtype).requires_grad_()
    p1 = None if s1 is None else torch.randn(s1, generator=g).to(prior_dtype).requires_grad_()
    alpha = (torch.rand(alpha_shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    q, k, v = _qkv()
    leaves = [q, k, v, alpha, p0] + ([p1] if p1 is not None else [])

    out, lse = _call(q, k, v, alpha, kind, p0, p1)
    got = _grads(out, lse, leaves)

    # the previous contract: float32 (Bp, Hp, ...) views and an (Hq,) float32 alpha, made by autograd ops
    trailing = 1 if kind == LAG else 2
    c0 = _lead4(p0, trailing).float()
    c1 = None if p1 is None else _lead4(p1, trailing).float()
    out_r, lse_r = _call(q, k, v, alpha.float().expand(HQ), kind, c0, c1)
    want = _grads(out_r, lse_r, leaves)

    assert torch.equal(out, out_r) and torch.equal(lse, lse_r)
    for name, a, b, leaf in zip(("q", "k", "v", "alpha", "prior0", "prior1"), got, want, leaves):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype, name
        # same kernels on the same float32 values; only the reduction of a shared alpha/prior over heads and
        # the final cast may round differently
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_non_unit_last_stride_qkv_equal_contiguous():
    q, k, v = _qkv(2)
    qt = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()  # same values, strides
    assert qt.stride(-1) != 1
    table = torch.randn(HQ, 7, generator=helpers.gen(3)).requires_grad_()
    out, lse = _call(qt, k, v, None, LAG, table)
    out_c, lse_c = _call(q, k, v, None, LAG, table)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    gq, gt = _grads(out, lse, [qt, table])
    gq_c, gt_c = _grads(out_c, lse_c, [q, table])
    assert torch.equal(gq, gq_c) and torch.equal(gt, gt_c)


@pytest.mark.parametrize("kind,shape,name,bad", [
    (LAG, (HQ, 7), "RelativeLagPrior.table", float("nan")),
    (LAG, (7,), "RelativeLagPrior.table", float("-inf")),
    (BANDED, (LQ, 5), "BandedPrior.values", float("inf")),
    (LOWRANK, (LQ, 3), "LowRankPrior.u", float("nan")),
    (DENSE, (LQ, LK), "DensePrior.bias", float("nan")),
    (DENSE, (LQ, LK), "DensePrior.bias", float("inf")),
])
def test_op_rejects_bad_prior_values_before_computing(kind, shape, name, bad):
    q, k, v = _qkv(4)
    p0 = torch.randn(shape, generator=helpers.gen(6))
    p0.view(-1)[1] = bad
    p1 = torch.randn(LK, 3, generator=helpers.gen(7)) if kind == LOWRANK else None
    with pytest.raises(ValueError, match=rf"{name} must not contain .*got 1 such entries"):
        _call(q, k, v, None, kind, p0, p1)


def test_dense_bias_may_hold_neg_inf():
    q, k, v = _qkv(8)
    bias = torch.zeros(LQ, LK)
    bias[:, 0] = float("-inf")
    out, lse = _call(q, k, v, None, DENSE, bias, causal=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("which", ["q", "table", "out"])
def test_inplace_change_before_backward_is_an_error(which):
    q, k, v = _qkv(9)
    table = torch.randn(HQ, 7, generator=helpers.gen(10)).requires_grad_()
    qq, tt = q * 1.0, table * 1.0  # non-leaf inputs can be changed in place
    out, lse = _call(qq, k, v, None, LAG, tt)
    with torch.no_grad():
        {"q": qq, "table": tt, "out": out}[which].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_second_backward_needs_retain_graph():
    q, k, v = _qkv(11)
    out, lse = _call(q, k, v, None, 0, None)
    loss = out.square().sum()
    (g1,) = torch.autograd.grad(loss, [q], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [q], retain_graph=True)
    assert torch.equal(g1, g2)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_unused_lse_gets_no_gradient_and_lse_only_works():
    q, k, v = _qkv(12)
    table = torch.randn(HQ, 7, generator=helpers.gen(13)).requires_grad_()
    out, lse = _call(q, k, v, None, LAG, table)
    g_out = torch.autograd.grad(out.sum(), [q, table], retain_graph=True)
    g_lse = torch.autograd.grad(lse.sum(), [q, table])
    assert all(torch.isfinite(t).all() for t in g_out + g_lse)
    assert not torch.equal(g_out[0], g_lse[0])


def test_graph_is_freed_with_its_outputs():
    """The node holds out/lse detached: no reference cycle keeps the graph (and its saved inputs) alive."""
    import gc
    import weakref

    q, k, v = _qkv(14)
    table = torch.randn(HQ, 7, generator=helpers.gen(15)).requires_grad_()
    qq = q * 1.0
    out, lse = _call(qq, k, v, None, LAG, table)
    ref = weakref.ref(qq)
    del qq
    assert ref() is not None  # saved for backward by the node
    gc.disable()
    try:
        del out, lse
        assert ref() is None  # freed by reference counting alone
    finally:
        gc.enable()


@pytest.mark.parametrize("kind,s0,s1", [(LAG, (7,), None), (LOWRANK, (LQ, 3), (HQ, LK, 3)), (DENSE, (LQ, LK), None)])
def test_opcheck_user_shaped(kind, s0, s1):
    """Fake implementations, schema and autograd registration agree with the kernels on user-shaped priors
    (half precision, missing leading dims) and a () alpha."""
    g = helpers.gen(16)
    p0 = torch.randn(s0, generator=g).half().requires_grad_()
    p1 = None if s1 is None else torch.randn(s1, generator=g).half().requires_grad_()
    alpha = torch.tensor(0.7, requires_grad=True)
    q, k, v = _qkv(17)
    args = (q, k, v, None, alpha, 0.0, kind, p0, p1, False, True, 0.3, 0.0, 0)
    torch.library.opcheck(torch.ops.rapkern.attention_fwd.default, args)
    with torch.no_grad():
        out, lse = torch.ops.rapkern.attention_fwd.default(*args)
    bwd_args = (torch.randn(out.shape, generator=g), None, q.detach(), k.detach(), v.detach(), out, lse, None,
                alpha.detach(), 0.0, kind, p0.detach(), None if p1 is None else p1.detach(), False, True, 0.3, 0.0,
                0, True, True, True)
    torch.library.opcheck(torch.ops.rapkern.attention_bwd.default, bwd_args)
