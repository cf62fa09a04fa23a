"""The "cpp" backend (rapkern._C's C++ CPU kernels) against the float64 reference, FlashAttention's 2x rule.

The checks are test_attention_torch.py's ``run_case`` (output, LSE and every gradient: q, k, v, each prior
tensor, alpha) with the backend switched to "cpp", over the same kinds of grid: every prior x causal x padding x
lengths incl. Lq != Lk and 1, GQA, head dims that are not powers of two, half precision, leading-dim broadcasts
of the prior tensors. Plus: gradients bitwise equal with 1 and 2 threads, dropout reproducible from the seed.

Everything here skips, with the build's reason, when rapkern._C is not built, except
``test_extension_is_built``: it fails then (unless RAPKERN_ALLOW_NO_EXT=1), so CI cannot lose the kernels quietly.
"""

from __future__ import annotations

import os
import types

import helpers
import pytest
import test_attention_torch as T
import torch

import rapkern
from rapkern import _ext

NEEDS_EXT = pytest.mark.skipif(_ext.load() is not None, reason=str(_ext.load()))


def test_extension_is_built():
    """rapkern._C must be built and loadable on the machine that runs the tests."""
    why = _ext.details()
    if why is not None and os.environ.get("RAPKERN_ALLOW_NO_EXT") == "1":
        pytest.skip(f"RAPKERN_ALLOW_NO_EXT=1: {why}")
    assert why is None, f"{why}\n(set RAPKERN_ALLOW_NO_EXT=1 where the C++ kernels are knowingly not built)"


@pytest.fixture
def cpp(monkeypatch):
    """Route test_attention_torch.run_case's kernel call (``rapkern.attention(..., backend="torch")``) to cpp."""
    calls = []

    def attention(*a, backend=None, **kw):
        calls.append(backend)
        return rapkern.attention(*a, backend="cpp", **kw)

    monkeypatch.setattr(T, "rapkern", types.SimpleNamespace(attention=attention))
    yield
    assert calls == ["torch"] * len(calls) and calls, "run_case no longer calls rapkern.attention(backend='torch')"


pytestmark = [NEEDS_EXT]

LENGTHS = [(1, 1), (17, 17), (97, 17), (17, 97), (203, 203), (1, 203), (203, 1)]


@pytest.mark.parametrize("mask", T.MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=[f"Lq{a}-Lk{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("kind", T.PRIOR_KINDS)
def test_prior_x_mask_x_length_fp32(kind, lq, lk, mask, cpp):
    """Every prior x causal x padding x length (incl. Lq != Lk), GQA, per-head alpha with a zero head."""
    b, hq, hkv, d = 2, 4, 2, 16
    q, k, v = T.qkv(b, hq, hkv, lq, lk, d, seed=lq * 1000 + lk)
    prior = T.make_prior(kind, (hq,), lq, lk, gen=helpers.gen(lq + lk), dtype=torch.float32)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], requires_grad=True)
    kpm = T.padding_mask(b, lk, seed=lq) if "padding" in mask else None
    T.run_case(q, k, v, prior=prior, alpha=alpha, causal="causal" in mask, key_padding_mask=kpm)


@pytest.mark.parametrize("kind", T.PRIOR_KINDS)
def test_float_alpha_and_no_prior_grad(kind, cpp):
    """A float alpha, and prior tensors that need no gradient."""
    q, k, v = T.qkv(1, 2, 1, 97, 45, 16, seed=3)
    prior = T.make_prior(kind, (), 97, 45, gen=helpers.gen(5), dtype=torch.float32, requires_grad=False)
    T.run_case(q, k, v, prior=prior, alpha=0.8, causal=True, key_padding_mask=T.padding_mask(1, 45))


@pytest.mark.parametrize("d,dv", [(16, 16), (40, 40), (64, 64), (80, 80), (40, 24)], ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ["lag", "lowrank", "dense"])
def test_head_dims_fp32(kind, d, dv, cpp):
    q, k, v = T.qkv(2, 3, 1, 33, 45, d, dv, seed=d)
    prior = T.make_prior(kind, (1, 3), 33, 45, gen=helpers.gen(d), dtype=torch.float32)
    T.run_case(q, k, v, prior=prior, alpha=torch.tensor(0.5, requires_grad=True), causal=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", T.PRIOR_KINDS)
def test_half_precision(kind, dtype, cpp):
    lq, lk = 41, 23
    q, k, v = T.qkv(2, 2, 1, lq, lk, 16, dtype=dtype, seed=21)
    prior = T.make_prior(kind, (2,), lq, lk, gen=helpers.gen(22), dtype=dtype)
    alpha = torch.tensor([0.9, 0.3], dtype=dtype, requires_grad=True)
    out, lse, _ = T.run_case(q, k, v, prior=prior, alpha=alpha, causal=True, key_padding_mask=T.padding_mask(2, lk))
    assert out.dtype == dtype and lse.dtype == torch.float32


@pytest.mark.parametrize(
    "lead", [(), (4,), (1, 1), (1, 4), (2, 1), (2, 4)], ids=lambda s: "lead" + "x".join(map(str, s or ("0",)))
)
@pytest.mark.parametrize("kind", ["lag", "banded", "banded_masked", "lowrank", "dense"])
def test_prior_leading_dims_broadcast(kind, lead, cpp):
    """Leading dims (), (Hp,), (Bp, Hp) with Bp in {1, B}, Hp in {1, Hq}: gradients reduce correctly."""
    q, k, v = T.qkv(2, 4, 2, 19, 21, 16, seed=9)
    prior = T.make_prior(kind, lead, 19, 21, gen=helpers.gen(10), dtype=torch.float32)
    T.run_case(q, k, v, prior=prior, alpha=torch.tensor([1.0, 0.5, 0.0, -2.0], requires_grad=True))


def test_mixed_dtype_prior_and_strided_inputs(cpp):
    """A float64 lag table and a half alpha with fp32 q; q transposed in its last two dims (last stride != 1:
    copied), k and v cut out of a NaN-filled buffer (strided views read in place: a stray read shows as NaN)."""
    g = helpers.gen(4)
    q = torch.randn(2, 2, 16, 23, generator=g).transpose(-1, -2)
    buf = torch.full((2, 1, 29, 40), float("nan"))
    buf[..., 3:19] = torch.randn(2, 1, 29, 16, generator=g)
    buf[..., 20:36] = torch.randn(2, 1, 29, 16, generator=g)
    k, v = buf[..., 3:19], buf[..., 20:36]
    assert q.stride(-1) != 1 and k.stride(-2) == 40
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    table = torch.randn(2, 7, generator=g, dtype=torch.float64).requires_grad_()
    alpha = torch.tensor([0.5, -1.0], dtype=torch.float16, requires_grad=True)
    T.run_case(q, k, v, prior=rapkern.RelativeLagPrior(table), alpha=alpha, causal=True)
    # run_case casts the prior and alpha to q's dtype; here they keep theirs, and so do their gradients
    res = []
    for backend in ("cpp", "torch"):
        out = rapkern.attention(q, k, v, prior=rapkern.RelativeLagPrior(table), alpha=alpha, causal=True,
                                backend=backend)
        res.append(torch.autograd.grad(out.square().sum(), (q, k, v, table, alpha)))
    for name, a, b in zip(["q", "k", "v", "table", "alpha"], *res):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3, msg=name)


def test_wide_prior_and_dead_rows(cpp):
    """A large prior (x8) that dominates the logits; batch 1 sees no key (out 0, lse -inf, zero grads)."""
    q, k, v = T.qkv(2, 2, 2, 40, 40, 16, seed=3)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1] = True
    out, lse, grads = T.run_case(q, k, v, prior=T.make_prior("dense", (), 40, 40, gen=helpers.gen(4),
                                                              dtype=torch.float32), alpha=8.0, key_padding_mask=kpm)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def _fwd_bwd(seed_inputs, threads, dropout_p=0.0, seed=0):
    torch.set_num_threads(threads)
    g = helpers.gen(seed_inputs)
    q = torch.randn(2, 4, 203, 40, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 157, 40, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 157, 40, generator=g, requires_grad=True)
    table = torch.randn(4, 33, generator=g, requires_grad=True)
    band = torch.randn(203, 9, generator=g, requires_grad=True)
    alpha = torch.tensor([0.5, 1.0, -0.7, 0.0], requires_grad=True)
    res = []
    for prior in (rapkern.RelativeLagPrior(table), rapkern.BandedPrior(band, mask_outside=True)):
        torch.manual_seed(seed)
        out, lse = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=True, dropout_p=dropout_p,
                                     return_lse=True, backend="cpp")
        dout = torch.randn(out.shape, generator=g)
        res += [out, lse, *torch.autograd.grad((out * dout).sum() + lse.sum(), (q, k, v, *prior.tensors(), alpha))]
    return res


def test_bitwise_equal_with_one_and_two_threads():
    before = torch.get_num_threads()
    try:
        one, two = _fwd_bwd(1, threads=1), _fwd_bwd(1, threads=2)
    finally:
        torch.set_num_threads(before)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


def test_dropout_reproducible_and_unbiased():
    """Same torch seed -> bitwise the same out and gradients (the backward regenerates the mask); another seed
    differs; E[out] over seeds approaches the no-dropout output (keep/(1-p) scaling)."""
    a, b, c = _fwd_bwd(2, 2, 0.3, seed=5), _fwd_bwd(2, 2, 0.3, seed=5), _fwd_bwd(2, 2, 0.3, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    q, k, v = T.qkv(1, 1, 1, 8, 8, 4, seed=1)
    plain = rapkern.attention(q, k, v, backend="cpp").detach()
    mean = torch.stack([rapkern.attention(q, k, v, dropout_p=0.5, backend="cpp").detach() for _ in range(2000)]).mean(0)
    assert (mean - plain).abs().max() < 0.1 * plain.abs().max() + 0.05


def test_auto_picks_cpp_on_cpu_and_torch_for_float64():
    q = torch.randn(1, 2, 9, 8)
    p = rapkern.validate.check_attention(q, q, q, prior=None, alpha=1.0, causal=False, key_padding_mask=None,
                                         scale=None, dropout_p=0.0)
    assert rapkern.dispatch.choose("attention", p, "auto").name == "cpp"
    p64 = rapkern.validate.check_attention(q.double(), q.double(), q.double(), prior=None, alpha=1.0, causal=False,
                                           key_padding_mask=None, scale=None, dropout_p=0.0)
    assert rapkern.dispatch.choose("attention", p64, "auto").name == "torch"
    with pytest.raises(NotImplementedError, match="float64 is not served by the C.. kernels"):
        rapkern.attention(q.double(), q.double(), q.double(), backend="cpp")
