"""rapkern.nn prior modules: the bias each one hands out against a direct dense computation (ALiBi and T5
against their reference formulas), gradients through rapkern.attention against the float64 reference,
shorter lengths, bad arguments, and the nn.Module plumbing (.to, state_dict, deepcopy).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rapkern
from rapkern.nn import BandPrior, FactorPrior, FixedPrior, LagPrior, PriorModule
from rapkern.testing import reference_attention

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _randomize(module, seed=1):
    """Give every parameter distinct random values (zeros would hide index mix-ups)."""
    with torch.no_grad():
        for i, p in enumerate(module.parameters()):
            p.copy_(_rand(*p.shape, seed=seed + i).to(p.dtype))
    return module


def _dense(prior, heads, lq, lk):
    return prior.materialize(1, heads, lq, lk)


def _ij(lq, lk):
    return torch.arange(lq)[:, None], torch.arange(lk)[None, :]


# ---------------------------------------------------------------------------------------------- references


def alibi_reference_slopes(n):
    """The ALiBi authors' get_slopes (ofirpress/attention_with_linear_biases), verbatim in spirit."""

    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_reference_slopes(2 * closest)[0::2][: n - closest]


def t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """transformers' T5Attention._relative_position_bucket, copied."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


# ---------------------------------------------------------------------------------------------- LagPrior


@pytest.mark.parametrize("heads", [1, 4, 6, 8, 12])
def test_alibi_slopes_match_reference(heads):
    got = rapkern.nn.priors.alibi_slopes(heads)
    assert torch.allclose(got, torch.tensor(alibi_reference_slopes(heads), dtype=F64), rtol=1e-15, atol=0)


def test_alibi_slopes_known_values():
    assert rapkern.nn.priors.alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    assert rapkern.nn.priors.alibi_slopes(6).tolist() == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


@pytest.mark.parametrize("heads,length,max_lag", [(8, 13, 12), (6, 9, 20), (1, 5, 4)], ids=str)
def test_alibi_exact_when_max_lag_covers_length(heads, length, max_lag):
    m = LagPrior(heads, max_lag, init="alibi", dtype=F64)
    slopes = torch.tensor(alibi_reference_slopes(heads), dtype=F64)
    i, j = _ij(length, length)
    expected = slopes[:, None, None] * -(i - j).abs()
    assert torch.equal(_dense(m(length, length), heads, length, length)[0], expected)


def test_alibi_constant_beyond_max_lag():
    m = LagPrior(4, 2, init="alibi", dtype=F64)
    slopes = torch.tensor(alibi_reference_slopes(4), dtype=F64)
    i, j = _ij(7, 9)
    expected = slopes[:, None, None] * -(i - j).abs().clamp(max=2)
    assert torch.equal(_dense(m(7, 9), 4, 7, 9)[0], expected)


@pytest.mark.parametrize(
    "bidirectional,num_buckets,max_distance,max_lag,lq,lk",
    [(True, 32, 128, 40, 41, 41), (False, 32, 128, 30, 31, 25), (True, 8, 10, 10, 30, 33), (False, 6, 12, 12, 40, 40)],
    ids=["bi-default", "uni-default", "bi-small-saturated", "uni-small-saturated"],
)
def test_t5_matches_relative_position_bucket(bidirectional, num_buckets, max_distance, max_lag, lq, lk):
    heads = 3
    m = LagPrior(
        heads,
        max_lag,
        init="t5",
        num_buckets=num_buckets,
        max_distance=max_distance,
        bidirectional=bidirectional,
        dtype=F64,
    )
    _randomize(m)
    assert tuple(m.bucket_values.shape) == (heads, num_buckets)
    i, j = _ij(lq, lk)
    bucket = t5_relative_position_bucket(j - i, bidirectional, num_buckets, max_distance)
    expected = m.bucket_values.detach()[:, bucket]
    assert torch.equal(_dense(m(lq, lk), heads, lq, lk)[0].detach(), expected)


def test_t5_parameters_are_shared_within_a_bucket():
    m = LagPrior(2, 50, init="t5", num_buckets=8, max_distance=20, dtype=F64)
    table = m(4, 4).table
    w = _rand(*table.shape, seed=5)
    (table * w).sum().backward()
    bucket = t5_relative_position_bucket(-torch.arange(-50, 51), True, 8, 20)
    expected = torch.zeros(2, 8, dtype=F64).index_add_(1, bucket, w)
    assert torch.allclose(m.bucket_values.grad, expected, rtol=1e-14, atol=1e-14)


def test_t5_default_init_is_small_and_not_zero():
    torch.manual_seed(0)
    v = LagPrior(8, 64, init="t5").bucket_values.detach()
    assert v.abs().max() < 0.2 and v.std() > 0.01


@pytest.mark.parametrize("shape", [(3, 7), (7,)], ids=["per-head", "shared"])
def test_tensor_init_used_as_given(shape):
    t = _rand(*shape, seed=3)
    m = LagPrior(3, 3, init=t)
    prior = m(5, 6)
    assert torch.equal(prior.table.detach(), t) and prior.table.shape == t.shape
    assert prior.table.data_ptr() != t.data_ptr()  # copied, not aliased
    i, j = _ij(5, 6)
    expected = t[..., 3 + (i - j).clamp(-3, 3)]
    assert torch.equal(_dense(prior, 3, 5, 6).reshape(expected.shape).detach(), expected)


def test_lag_zeros_and_learnable_flag():
    m = LagPrior(4, 5)
    assert isinstance(m.table, torch.nn.Parameter) and torch.equal(m.table, torch.zeros(4, 11))
    f = LagPrior(4, 5, init="alibi", learnable=False)
    assert list(f.parameters()) == [] and "table" in dict(f.named_buffers())
    assert not f(3, 3).table.requires_grad
    t5 = LagPrior(2, 5, init="t5", learnable=False)
    assert list(t5.parameters()) == [] and "bucket_values" in t5.state_dict()
    assert "bucket_index" not in t5.state_dict()  # derived from the config, not state


def test_lag_serves_any_length():
    m = _randomize(LagPrior(2, 3, dtype=F64))
    for lq, lk in [(1, 1), (2, 50), (50, 2)]:
        i, j = _ij(lq, lk)
        expected = m.table.detach()[:, 3 + (i - j).clamp(-3, 3)]
        assert torch.equal(_dense(m(lq, lk), 2, lq, lk)[0].detach(), expected)


# ---------------------------------------------------------------------------------------------- band, factor


@pytest.mark.parametrize("mask_outside", [False, True])
@pytest.mark.parametrize("lq,lk", [(16, 16), (9, 16), (5, 30)], ids=str)
def test_band_prior_values(mask_outside, lq, lk):
    m = _randomize(BandPrior(3, 16, 2, mask_outside=mask_outside, dtype=F64))
    prior = m(lq, lk)
    assert prior.mask_outside is mask_outside and tuple(prior.values.shape) == (3, lq, 5)
    i, j = _ij(lq, lk)
    inside = (j - i).abs() <= 2
    vals = m.values.detach()[:, :lq]
    gathered = torch.take_along_dim(vals, ((j - i).clamp(-2, 2) + 2).expand(lq, lk)[None].expand(3, -1, -1), -1)
    expected = torch.where(inside, gathered, torch.tensor(float("-inf") if mask_outside else 0.0, dtype=F64))
    assert torch.equal(_dense(prior, 3, lq, lk)[0].detach(), expected)


def test_band_prior_starts_at_zero():
    assert torch.equal(BandPrior(2, 8, 3).values, torch.zeros(2, 8, 7))


def test_band_prior_longer_lq_raises():
    m = BandPrior(2, 64, 4)
    with pytest.raises(ValueError, match=r"lq = 100 exceeds the seq_len = 64 this BandPrior"):
        m(100, 64)
    assert m(64, 100).values.shape[-2] == 64  # boundary: lq == seq_len, any lk


@pytest.mark.parametrize("lq,lk", [(6, 7), (2, 7), (6, 1)], ids=str)
def test_factor_prior_values(lq, lk):
    m = _randomize(FactorPrior(3, 6, 7, 2, dtype=F64))
    expected = m.u.detach()[:, :lq] @ m.v.detach()[:, :lk].transpose(-1, -2)
    assert torch.allclose(_dense(m(lq, lk), 3, lq, lk)[0].detach(), expected, rtol=1e-15, atol=0)


def test_factor_prior_longer_raises():
    m = FactorPrior(2, 6, 7, 2)
    with pytest.raises(ValueError, match=r"lq = 7 exceeds the len_q = 6"):
        m(7, 7)
    with pytest.raises(ValueError, match=r"lk = 8 exceeds the len_k = 7"):
        m(6, 8)


def test_factor_prior_init_scale():
    torch.manual_seed(0)
    m = FactorPrior(8, 64, 64, 4, init_std=0.01)
    b = (m.u @ m.v.transpose(-1, -2)).detach()
    assert 0.008 < float(b.std()) < 0.012  # 32k entries: the sample std is within a few % of 0.01
    assert float(m.u.detach().std()) > 0.01 and float(m.v.detach().std()) > 0.01  # neither factor is (near) zero


# ---------------------------------------------------------------------------------------------- FixedPrior


def _fixed_cases():
    return {
        "lag": rapkern.RelativeLagPrior(_rand(4, 5, seed=1)),
        "lag-shared": rapkern.RelativeLagPrior(_rand(5, seed=2)),
        "banded": rapkern.BandedPrior(_rand(4, 10, 3, seed=3), mask_outside=True),
        "lowrank": rapkern.LowRankPrior(_rand(4, 10, 2, seed=4), _rand(12, 2, seed=5)),
        "dense": rapkern.DensePrior(_rand(1, 10, 12, seed=6)),
    }


@pytest.mark.parametrize("name", list(_fixed_cases()))
@pytest.mark.parametrize("lq,lk", [(10, 12), (4, 12), (10, 3), (1, 1)], ids=str)
def test_fixed_prior_returns_prior_sliced(name, lq, lk):
    prior = _fixed_cases()[name]
    m = FixedPrior(prior)
    assert list(m.parameters()) == [] and len(list(m.buffers())) == len(prior.tensors())
    full = prior.materialize(1, 4, 10, 12)
    got = m(lq, lk)
    assert type(got) is type(prior)
    assert torch.equal(got.materialize(1, 4, lq, lk), full[..., :lq, :lk])


def test_fixed_prior_num_heads():
    cases = _fixed_cases()
    assert [FixedPrior(cases[n]).num_heads for n in ("lag", "lag-shared", "lowrank", "dense")] == [4, 1, 4, 1]


def test_fixed_prior_detaches():
    t = _rand(3, 5, seed=1).requires_grad_()
    m = FixedPrior(rapkern.RelativeLagPrior(t))
    assert not m.table.requires_grad and not m(4, 4).table.requires_grad


@pytest.mark.parametrize(
    "name,lq,lk,match",
    [
        ("banded", 11, 5, r"lq = 11 exceeds the Lq = 10"),
        ("lowrank", 11, 5, r"lq = 11 exceeds the Lq = 10"),
        ("lowrank", 10, 13, r"lk = 13 exceeds the Lk = 12"),
        ("dense", 10, 13, r"lk = 13 exceeds the Lk = 12"),
    ],
)
def test_fixed_prior_longer_raises(name, lq, lk, match):
    m = FixedPrior(_fixed_cases()[name])
    with pytest.raises(ValueError, match=match):
        m(lq, lk)


def test_fixed_prior_lag_any_length_and_band_any_lk():
    c = _fixed_cases()
    assert FixedPrior(c["lag"])(500, 700).table.shape == (4, 5)
    assert FixedPrior(c["banded"])(10, 700).values.shape == (4, 10, 3)


def test_fixed_prior_bad_inputs():
    with pytest.raises(TypeError, match=r"prior must be a RelativeLagPrior.*got Tensor"):
        FixedPrior(torch.zeros(3))
    with pytest.raises(TypeError, match=r"RelativeLagPrior.table must be a floating-point tensor"):
        FixedPrior(rapkern.RelativeLagPrior(torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"RelativeLagPrior.table must have odd length"):
        FixedPrior(rapkern.RelativeLagPrior(torch.zeros(4)))
    with pytest.raises(ValueError, match=r"BandedPrior.values must have 2 trailing dims"):
        FixedPrior(rapkern.BandedPrior(torch.zeros(5)))
    with pytest.raises(ValueError, match=r"LowRankPrior.u and LowRankPrior.v must have the same rank"):
        FixedPrior(rapkern.LowRankPrior(torch.zeros(4, 2), torch.zeros(5, 3)))
    with pytest.raises(ValueError, match=r"BandedPrior.values must not contain non-finite"):
        FixedPrior(rapkern.BandedPrior(torch.full((4, 3), float("nan"))))


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: LagPrior(0, 3), ValueError, r"num_heads must be >= 1, got 0"),
        (lambda: LagPrior(2.0, 3), TypeError, r"num_heads must be an int, got float"),
        (lambda: LagPrior(2, -1), ValueError, r"max_lag must be >= 0, got -1"),
        (lambda: LagPrior(2, 3, init="sinusoid"), ValueError, r"init must be 'zeros', 'alibi', 't5' or a tensor"),
        (lambda: LagPrior(2, 3, init=3), TypeError, r"init must be 'zeros', 'alibi', 't5' or a tensor, got int"),
        (lambda: LagPrior(2, 3, init=torch.zeros(2, 6)), ValueError, r"init tensor must have shape .*\(2, 7\)"),
        (lambda: LagPrior(2, 3, init=torch.zeros(7, dtype=torch.long)), TypeError, r"init tensor must be floating"),
        (lambda: LagPrior(2, 1, init=torch.tensor([0.0, float("inf"), 0.0])), ValueError, r"init tensor must be fin"),
        (lambda: LagPrior(2, 3, learnable=1), TypeError, r"learnable must be a bool"),
        (lambda: LagPrior(2, 3, init="alibi", num_buckets=8), ValueError, r"num_buckets only apply to init='t5'"),
        (lambda: LagPrior(2, 3, init="t5", num_buckets=3), ValueError, r"num_buckets must be >= 4"),
        (lambda: LagPrior(2, 3, init="t5", num_buckets=8, max_distance=2), ValueError, r"max_distance must exceed"),
        (lambda: LagPrior(2, 3, init="t5", bidirectional=1), TypeError, r"bidirectional must be a bool"),
        (lambda: BandPrior(2, 0, 1), ValueError, r"seq_len must be >= 1, got 0"),
        (lambda: BandPrior(2, 8, -1), ValueError, r"width must be >= 0, got -1"),
        (lambda: BandPrior(2, 8, 1, mask_outside="yes"), TypeError, r"mask_outside must be a bool"),
        (lambda: FactorPrior(2, 4, 4, 0), ValueError, r"rank must be >= 1, got 0"),
        (lambda: FactorPrior(2, 4, 0, 1), ValueError, r"len_k must be >= 1, got 0"),
        (lambda: FactorPrior(2, 4, 4, 1, init_std=0.0), ValueError, r"init_std must be finite and > 0"),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_t5_boundary_arguments_pass():
    LagPrior(2, 3, init="t5", num_buckets=4, max_distance=2)
    LagPrior(2, 3, init="t5", num_buckets=2, max_distance=2, bidirectional=False)


@pytest.mark.parametrize(
    "module", [LagPrior(2, 3), BandPrior(2, 8, 1), FactorPrior(2, 4, 4, 1)], ids=lambda m: type(m).__name__
)
def test_bad_lengths(module):
    with pytest.raises(TypeError, match=r"lq must be an int, got float"):
        module(4.0, 4)
    with pytest.raises(ValueError, match=r"lk must be >= 0, got -1"):
        module(4, -1)


# ---------------------------------------------------------------------------------------------- through attention


def _modules():
    return {
        "lag": lambda: LagPrior(4, 6, init="alibi"),
        "lag-t5": lambda: LagPrior(4, 6, init="t5", num_buckets=8, max_distance=5),
        "band": lambda: BandPrior(4, 12, 3),
        "band-masked": lambda: BandPrior(4, 12, 3, mask_outside=True),
        "factor": lambda: FactorPrior(4, 12, 12, 2),
        "fixed-dense": lambda: FixedPrior(rapkern.DensePrior(_rand(4, 12, 12, seed=9).float())),
    }


@pytest.mark.parametrize("name", list(_modules()))
def test_gradients_match_reference(name):
    torch.manual_seed(0)
    m = _randomize(_modules()[name]().to(F64))
    ref = copy.deepcopy(m)
    b, h, lq, lk, d = 2, 4, 11, 9, 8
    q = _rand(b, h, lq, d, seed=20).requires_grad_()  # so a module without parameters still has a graph
    k, v = _rand(b, h, lk, d, seed=21), _rand(b, h, lk, d, seed=22)
    w = _rand(b, h, lq, d, seed=23)
    alpha = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=F64)
    out = rapkern.attention(q, k, v, prior=m(lq, lk), alpha=alpha)
    out_ref = reference_attention(q, k, v, prior=ref(lq, lk), alpha=alpha)
    assert out.shape == (b, h, lq, d)
    assert torch.allclose(out, out_ref, rtol=1e-10, atol=1e-12)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    params = dict(m.named_parameters())
    ref_params = dict(ref.named_parameters())
    for pname, p in params.items():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, pname
        assert torch.allclose(p.grad, ref_params[pname].grad, rtol=1e-9, atol=1e-12), pname
    for buf in m.buffers():
        assert buf.grad is None and not buf.requires_grad


@pytest.mark.parametrize("name", list(_modules()))
def test_accepted_by_attention_float32(name):
    m = _modules()[name]()
    q = torch.randn(2, 4, 12, 16)
    out = rapkern.attention(q, q, q, prior=m(12, 12), alpha=0.5, causal=True)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())


# ---------------------------------------------------------------------------------------------- nn.Module plumbing


@pytest.mark.parametrize("name", list(_modules()))
def test_to_dtype_state_dict_and_deepcopy(name):
    m = _modules()[name]()
    _randomize(m, seed=40)
    assert isinstance(m, PriorModule) and m.num_heads == 4
    m64 = copy.deepcopy(m).to(torch.float64)
    assert all(t.dtype == F64 for t in m64(12, 12).tensors())
    assert all(t.dtype == torch.float32 for t in m(12, 12).tensors())  # the original is untouched

    fresh = _modules()[name]()
    fresh.load_state_dict(m.state_dict())
    for a, b in zip(m(12, 12).tensors(), fresh(12, 12).tensors()):
        assert torch.equal(a, b)
    clone = copy.deepcopy(m)
    for a, b in zip(m(12, 12).tensors(), clone(12, 12).tensors()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert type(m).__name__ + "(" in repr(m) and "num_heads=4" in repr(m)


def test_meta_device():
    m = LagPrior(2, 3, init="alibi").to("meta")
    assert m(5, 5).table.device.type == "meta"
