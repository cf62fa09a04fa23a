"""The blocked "torch" backend against the float64 reference (FlashAttention's 2x rule).

Every check compares the output, the LSE and every gradient (q, k, v, each prior tensor, alpha) with
``rapkern.testing.assert_close_to_reference``: error <= 2 x error of the same eager math in the input
dtype + a floor proportional to the reference's magnitude.
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import assert_close_to_reference, reference_attention

# Rounding floors, relative to max|reference| of the compared tensor (at least 1).
FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
LSE_FLOOR = {torch.float64: 2e-6, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

PRIOR_KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]

_gen = helpers.gen
_leaf_like = helpers.leaf_like
make_prior = helpers.make_prior


def _floor(dtype, ref, table=FLOOR, reduce_len=1):
    return helpers.scaled_floor(table, dtype, ref, reduce_len)



@pytest.fixture
def many_blocks(monkeypatch):
    """Force the smallest query blocks (16 rows) so every length > 16 walks several tiles, and lag priors
    through the fused path's Hankel views (short windows otherwise build their small tiles)."""
    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.001")
    monkeypatch.setenv("RAPKERN_TORCH_FUSED_ROWS", "16")
    monkeypatch.setenv("RAPKERN_TORCH_LAG_TILE_ELEMS", "0")


@pytest.fixture(params=["cpu-fused", "blocked"])
def path(request, monkeypatch):
    """Run on CPU through the fused SDPA fast path (where it applies) or force the blocked tile loop,
    which is what the torch backend runs on CUDA and with dropout or Dv != D."""
    if request.param == "blocked":
        from rapkern.backends.torch_blocked import cpu_flash

        monkeypatch.setattr(cpu_flash, "usable", lambda plan: False)
    return request.param


def run_case(q, k, v, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None, seed=0,
             dout=None, check_grads=True):
    """Run kernel, float64 reference and eager-in-dtype reference; assert the 2x rule on everything.

    Returns (out, lse, grads dict) of the kernel.
    """
    dtype = q.dtype
    prior_ts = [] if prior is None else list(prior.tensors())
    alpha_is_t = isinstance(alpha, torch.Tensor)

    def clone_inputs(dt):
        qq, kk, vv = (_leaf_like(t, dt) for t in (q, k, v))
        pr = None if prior is None else prior.with_tensors(*(_leaf_like(t, dt) for t in prior_ts))
        al = _leaf_like(alpha, dt) if alpha_is_t else alpha
        return qq, kk, vv, pr, al

    names = ["q", "k", "v"] + [f"prior[{i}]" for i in range(len(prior_ts))] + (["alpha"] if alpha_is_t else [])

    def run(fn, dt, **extra):
        qq, kk, vv, pr, al = clone_inputs(dt)
        out, lse = fn(qq, kk, vv, prior=pr, alpha=al, causal=causal, key_padding_mask=key_padding_mask,
                      scale=scale, return_lse=True, **extra)
        leaves = [qq, kk, vv] + ([] if pr is None else list(pr.tensors())) + ([al] if alpha_is_t else [])
        grads = {}
        if check_grads:
            want = [(n, t) for n, t in zip(names, leaves) if t.requires_grad]
            g = dout if dout is not None else torch.randn(out.shape, generator=_gen(seed + 1), dtype=torch.float64)
            gs = torch.autograd.grad(out, [t for _, t in want], g.to(out.dtype), allow_unused=True)
            for (n, t), gr in zip(want, gs):
                grads[n] = torch.zeros_like(t) if gr is None else gr
        return out, lse, grads

    got = run(rapkern.attention, dtype, backend="torch")
    ref = run(reference_attention, torch.float64)
    low = run(reference_attention, dtype, compute_dtype=dtype)

    assert got[0].dtype == dtype and got[0].shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert got[1].dtype == torch.float32 and got[1].shape == q.shape[:3]
    got, ref, low = ([x.detach() for x in r[:2]] + [r[2]] for r in (got, ref, low))
    assert_close_to_reference("out", got[0], ref[0], low[0], _floor(dtype, ref[0]))
    assert_close_to_reference("lse", got[1], ref[1], low[1], _floor(dtype, ref[1], LSE_FLOOR))
    # -inf LSE exactly where the reference has it
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1]))
    for n in ref[2]:
        assert got[2][n].dtype == low[2][n].dtype, f"grad {n} dtype {got[2][n].dtype}"
        assert not torch.isnan(got[2][n]).any(), f"NaN in grad {n}"
        floor = _floor(dtype, ref[2][n], reduce_len=max(q.shape[2], k.shape[2]))
        assert_close_to_reference(f"d{n}", got[2][n], ref[2][n], low[2][n], floor)
    return got


def qkv(b, hq, hkv, lq, lk, d, dv=None, *, dtype=torch.float32, seed=0, scale_inputs=1.0):
    gen = _gen(seed)
    dv = d if dv is None else dv

    def rnd(*s):
        return (torch.randn(*s, generator=gen, dtype=torch.float64) * scale_inputs).to(dtype).requires_grad_()

    return rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, dv)


def padding_mask(b, lk, seed=0):
    """Random padding with batch 0 keeping its first key, so rows are live unless causal kills them."""
    gen = _gen(seed + 7)
    m = torch.rand(b, lk, generator=gen) < 0.3
    m[:, 0] = False
    return m


LENGTHS = [(1, 1), (17, 17), (97, 97), (203, 203), (17, 97), (97, 17), (1, 203), (203, 1)]
MASKS = ["plain", "causal", "padding", "causal+padding"]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=[f"Lq{a}-Lk{b}" for a, b in LENGTHS])
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_prior_x_mask_x_length_fp32(kind, lq, lk, mask, many_blocks, path):
    """Every prior x causal x padding x length (incl. Lq != Lk), GQA, per-head alpha with a zero head."""
    b, hq, hkv, d = 2, 4, 2, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, seed=lq * 1000 + lk)
    prior = make_prior(kind, (hq,), lq, lk, gen=_gen(lq + lk), dtype=torch.float32)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], requires_grad=True)
    kpm = padding_mask(b, lk, seed=lq) if "padding" in mask else None
    run_case(q, k, v, prior=prior, alpha=alpha, causal="causal" in mask, key_padding_mask=kpm)


FAST_LENGTHS = [(1, 1), (17, 97), (97, 17), (203, 203)]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lq,lk", FAST_LENGTHS, ids=[f"Lq{a}-Lk{b}" for a, b in FAST_LENGTHS])
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_prior_without_grad_fused_backward_fp32(kind, lq, lk, mask, many_blocks, path):
    """Prior tensors and alpha that need no gradient: on CPU the backward may take the fused path."""
    b, hq, hkv, d = 2, 4, 2, 16
    q, k, v = qkv(b, hq, hkv, lq, lk, d, seed=lq * 7 + lk)
    prior = make_prior(kind, (hq,), lq, lk, gen=_gen(lq), dtype=torch.float32, requires_grad=False)
    kpm = padding_mask(b, lk, seed=lk) if "padding" in mask else None
    run_case(q, k, v, prior=prior, alpha=torch.tensor([0.7, 0.0, -1.3, 2.0]), causal="causal" in mask,
             key_padding_mask=kpm)
    run_case(q, k, v, prior=prior, alpha=1.5, causal="causal" in mask, key_padding_mask=kpm)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("lq,lk", [(97, 97), (17, 203)], ids=["Lq97-Lk97", "Lq17-Lk203"])
def test_one_block_default_tile_fp32(kind, lq, lk):
    """The default tile budget (one query block at these sizes) with float alpha."""
    q, k, v = qkv(1, 2, 1, lq, lk, 16, seed=3)
    prior = make_prior(kind, (), lq, lk, gen=_gen(5), dtype=torch.float32)
    run_case(q, k, v, prior=prior, alpha=0.8, causal=True, key_padding_mask=padding_mask(1, lk))


@pytest.mark.parametrize("d,dv", [(16, 16), (40, 40), (64, 64), (80, 80), (40, 24)], ids=lambda x: str(x))
@pytest.mark.parametrize("kind", ["lag", "lowrank", "dense"])
def test_head_dims_fp32(kind, d, dv, many_blocks, path):
    q, k, v = qkv(2, 3, 1, 33, 45, d, dv, seed=d)
    prior = make_prior(kind, (1, 3), 33, 45, gen=_gen(d), dtype=torch.float32)
    run_case(q, k, v, prior=prior, alpha=torch.tensor(0.5, requires_grad=True), causal=True)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("mask", ["plain", "causal+padding"])
def test_float64(kind, mask, many_blocks, path):
    lq, lk = 37, 29
    q, k, v = qkv(2, 2, 2, lq, lk, 16, dtype=torch.float64, seed=11)
    prior = make_prior(kind, (2, 2), lq, lk, gen=_gen(12))
    alpha = torch.tensor([1.5, -0.5], dtype=torch.float64, requires_grad=True)
    kpm = padding_mask(2, lk) if mask != "plain" else None
    run_case(q, k, v, prior=prior, alpha=alpha, causal=mask != "plain", key_padding_mask=kpm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_half_precision(kind, dtype, many_blocks, path):
    lq, lk = 41, 23
    q, k, v = qkv(2, 2, 1, lq, lk, 16, dtype=dtype, seed=21)
    prior = make_prior(kind, (2,), lq, lk, gen=_gen(22), dtype=dtype)
    alpha = torch.tensor([0.9, 0.3], dtype=dtype, requires_grad=True)
    out, lse, _ = run_case(q, k, v, prior=prior, alpha=alpha, causal=True, key_padding_mask=padding_mask(2, lk))
    assert out.dtype == dtype and lse.dtype == torch.float32


def test_fp16_large_inputs_no_overflow(many_blocks, path):
    """Inputs of magnitude 256 with head dim 80 (PyTorch #160841): half inputs are computed in fp32."""
    q, k, v = qkv(1, 2, 2, 33, 33, 80, dtype=torch.float16, seed=4)
    with torch.no_grad():
        q.mul_(16), k.mul_(16)
    out, lse, grads = run_case(q, k, v, prior=make_prior("lag", (), 33, 33, gen=_gen(1), dtype=torch.float16))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_scaled_inputs_odd_lengths_backward(many_blocks, path):
    """FA bwd_overflow: q*5, k*3, odd lengths, Lk < block."""
    for lq, lk in [(1, 1), (2, 5), (17, 5), (5, 17)]:
        q, k, v = qkv(2, 2, 2, lq, lk, 16, seed=lq + lk)
        with torch.no_grad():
            q.mul_(5), k.mul_(3)
        run_case(q, k, v, prior=make_prior("dense", (), lq, lk, gen=_gen(3), dtype=torch.float32), causal=True)


@pytest.mark.parametrize(
    "lead", [(), (1,), (4,), (1, 1), (1, 4), (2, 1), (2, 4)], ids=lambda s: "lead" + "x".join(map(str, s or ("0",)))
)
@pytest.mark.parametrize("kind", ["lag", "banded", "banded_masked", "lowrank", "dense"])
def test_prior_leading_dims_broadcast(kind, lead, many_blocks, path):
    """Leading dims (), (Hp,), (Bp, Hp) with Bp in {1, B}, Hp in {1, Hq}: gradients reduce correctly."""
    q, k, v = qkv(2, 4, 2, 19, 21, 16, seed=9)
    prior = make_prior(kind, lead, 19, 21, gen=_gen(10), dtype=torch.float32)
    run_case(q, k, v, prior=prior, alpha=torch.tensor([1.0, 0.5, 0.0, -2.0], requires_grad=True))


def test_lowrank_mixed_leading_dims(many_blocks):
    q, k, v = qkv(2, 2, 2, 20, 18, 16, seed=1)
    gen = _gen(2)
    u = torch.randn(2, 20, 3, generator=gen).requires_grad_()  # (Hp,)
    w = torch.randn(2, 1, 18, 3, generator=gen).requires_grad_()  # (Bp, 1)
    run_case(q, k, v, prior=LowRankPrior(u, w), alpha=0.7, causal=True)


@pytest.mark.parametrize("dv", [16, 12])
def test_lowrank_runs_as_one_unbiased_call_on_cpu(dv, monkeypatch):
    """The CPU path takes the exact concat route ([scale·q, α·u]·[k, v]ᵀ) and agrees with the tile loop."""
    from rapkern.backends.torch_blocked import lowrank_concat

    calls = []
    real = lowrank_concat.as_unbiased
    monkeypatch.setattr(lowrank_concat, "as_unbiased", lambda p: calls.append(1) or real(p))
    q, k, _ = qkv(2, 4, 2, 19, 21, 16, seed=3)
    v = torch.randn(2, 2, 21, dv, generator=_gen(4))
    u = torch.randn(4, 19, 3, generator=_gen(5)).requires_grad_()  # per query head: kv heads repeat
    w = torch.randn(4, 21, 3, generator=_gen(6)).requires_grad_()
    run_case(q, k, v, prior=LowRankPrior(u, w), alpha=torch.tensor([1.0, 0.5, 0.0, -2.0], requires_grad=True),
             causal=True, key_padding_mask=torch.rand(2, 21, generator=_gen(7)) < 0.3)
    assert calls, "the low-rank concat route was not taken"


@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank", "dense"])
def test_wide_prior_magnitude(kind, many_blocks):
    """A large prior (x8) dominates the logits; the kernel must still track the reference."""
    q, k, v = qkv(1, 2, 2, 40, 40, 16, seed=3)
    prior = make_prior(kind, (), 40, 40, gen=_gen(4), dtype=torch.float32)
    run_case(q, k, v, prior=prior, alpha=8.0, key_padding_mask=padding_mask(1, 40))


def test_no_prior_equals_sdpa():
    q, k, v = qkv(2, 4, 2, 23, 31, 16, seed=5)
    out = rapkern.attention(q, k, v, causal=False, backend="torch")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    out = rapkern.attention(q, k, v, causal=True, scale=0.3, backend="torch")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def test_default_scale_is_inv_sqrt_d():
    q, k, v = qkv(1, 1, 1, 7, 9, 40, dtype=torch.float64)
    a = rapkern.attention(q, k, v, backend="torch")
    b = rapkern.attention(q, k, v, scale=1 / math.sqrt(40), backend="torch")
    c = rapkern.attention(q, k, v, scale=1.0, backend="torch")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_custom_scale_against_reference(many_blocks):
    q, k, v = qkv(1, 2, 2, 30, 30, 16, seed=8)
    run_case(q, k, v, prior=make_prior("lag", (), 30, 30, gen=_gen(1), dtype=torch.float32), scale=0.05)


@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank", "dense"])
def test_alpha_zero_head_sees_no_prior(kind, path, many_blocks):
    """Heads with alpha = 0 equal attention without a prior; others do not."""
    q, k, v = qkv(1, 2, 2, 25, 25, 16, dtype=torch.float64, seed=2)
    prior = make_prior(kind, (2,), 25, 25, gen=_gen(3), requires_grad=False)
    out = rapkern.attention(q, k, v, prior=prior, alpha=torch.tensor([0.0, 1.0], dtype=torch.float64), causal=True)
    plain = rapkern.attention(q, k, v, causal=True)
    torch.testing.assert_close(out[:, 0], plain[:, 0], atol=1e-12, rtol=0)
    assert (out[:, 1] - plain[:, 1]).abs().max() > 1e-3
    zero = rapkern.attention(q, k, v, prior=prior, alpha=0.0, causal=True)
    torch.testing.assert_close(zero, plain, atol=1e-12, rtol=0)


def test_mixed_dtype_prior_and_alpha(path, many_blocks):
    """Prior tensors and alpha may have another floating dtype than q: results and grad dtypes follow."""
    q, k, v = qkv(1, 2, 2, 19, 23, 16, seed=3)
    gen = _gen(4)
    cases = [
        RelativeLagPrior(torch.randn(2, 5, generator=gen, dtype=torch.float64).requires_grad_()),
        BandedPrior(torch.randn(19, 3, generator=gen).half().requires_grad_(), True),
        LowRankPrior(torch.randn(19, 2, generator=gen, dtype=torch.float64).requires_grad_(),
                     torch.randn(23, 2, generator=gen).bfloat16().requires_grad_()),
        DensePrior(torch.randn(19, 23, generator=gen, dtype=torch.float64).requires_grad_()),
    ]
    for prior in cases:
        alpha = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
        out = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=True)
        assert out.dtype == torch.float32
        leaves = [q, k, v, alpha, *prior.tensors()]
        grads = torch.autograd.grad(out.sum(), leaves)
        l64 = [x.detach().double().requires_grad_() for x in leaves]
        p64 = prior.with_tensors(*l64[4:])
        ref = reference_attention(*l64[:3], prior=p64, alpha=l64[3], causal=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
        for g, r, t in zip(grads, torch.autograd.grad(ref.sum(), l64), leaves):
            assert g.dtype == t.dtype
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(t.dtype, 2e-5) * max(1.0, float(r.abs().max()))
            torch.testing.assert_close(g.double(), r, atol=tol, rtol=0)


def test_alpha_zero_keeps_band_mask(many_blocks, path):
    """mask_outside=True is a mask, not a bias: with alpha = 0 the band still restricts the keys."""
    lq = lk = 30
    w = 2
    q, k, v = qkv(1, 2, 2, lq, lk, 16, dtype=torch.float64, seed=6)
    prior = BandedPrior(torch.randn(lq, 2 * w + 1, dtype=torch.float64), mask_outside=True)
    out = rapkern.attention(q, k, v, prior=prior, alpha=0.0, backend="torch")
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    band = torch.zeros(lq, lk, dtype=torch.float64).masked_fill((j - i).abs() > w, float("-inf"))
    want = rapkern.attention(q, k, v, prior=DensePrior(band), alpha=1.0, backend="torch")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    # and it differs from no mask at all
    assert (out - rapkern.attention(q, k, v)).abs().max() > 1e-3
    run_case(q, k, v, prior=prior, alpha=torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True))


def test_dense_neg_inf_masks_for_every_alpha(many_blocks, path):
    """-inf in a user's dense bias masks the key even for alpha = 0 (and yields no NaN in alpha's grad)."""
    lq, lk = 20, 20
    q, k, v = qkv(1, 2, 2, lq, lk, 16, dtype=torch.float64, seed=6)
    bias = torch.randn(lq, lk, dtype=torch.float64)
    bias[:, ::3] = float("-inf")
    bias = bias.requires_grad_()
    run_case(q, k, v, prior=DensePrior(bias), alpha=torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True))


# ----------------------------------------------------------------------------------------------------------
# Fully masked rows: output 0, lse -inf, zero gradients, never NaN.


def _assert_dead_rows(out, lse, dq, dead):
    """``dead`` bool (B, Hq, Lq)."""
    assert torch.isneginf(lse[dead]).all()
    assert torch.isfinite(lse[~dead]).all()
    assert (out[dead] == 0).all()
    assert (dq[dead] == 0).all()
    assert not torch.isnan(out).any() and not torch.isnan(dq).any()


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_fully_padded_batch_element(kind, many_blocks, path):
    b, h, lq, lk = 2, 2, 27, 33  # lq <= lk: the band of batch 0 is never empty
    q, k, v = qkv(b, h, h, lq, lk, 16, seed=1)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees nothing
    prior = make_prior(kind, (b, h), lq, lk, gen=_gen(2), dtype=torch.float32)
    alpha = torch.tensor([1.0, 2.0], requires_grad=True)
    out, lse, grads = run_case(q, k, v, prior=prior, alpha=alpha, key_padding_mask=kpm)
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[1] = True
    _assert_dead_rows(out, lse, grads["q"], dead)
    assert (grads["k"][1] == 0).all() and (grads["v"][1] == 0).all()
    for n, g in grads.items():
        if n.startswith("prior") and kind != "lag":
            assert (g[1] == 0).all(), n  # per-batch prior entries of the dead batch get no gradient


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_causal_with_first_keys_padded(kind, many_blocks, path):
    """Causal top-left + padding of keys 0..2: queries 0..2 see no key."""
    b, h, lq, lk = 1, 2, 40, 40
    q, k, v = qkv(b, h, h, lq, lk, 16, seed=2)
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[0, :3] = True
    prior = make_prior(kind, (h,), lq, lk, gen=_gen(3), dtype=torch.float32)
    out, lse, grads = run_case(q, k, v, prior=prior, alpha=torch.tensor(1.0, requires_grad=True), causal=True,
                               key_padding_mask=kpm)
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[..., :3] = True
    _assert_dead_rows(out, lse, grads["q"], dead)


def test_banded_mask_rows_beyond_keys(many_blocks, path):
    """mask_outside band with Lq > Lk + w: rows past the keys see nothing (key_range is empty there)."""
    lq, lk, w = 60, 10, 2
    q, k, v = qkv(1, 2, 2, lq, lk, 16, seed=3)
    prior = BandedPrior(torch.randn(2, lq, 2 * w + 1).requires_grad_(), mask_outside=True)
    out, lse, grads = run_case(q, k, v, prior=prior, alpha=torch.tensor([0.5, 1.0], requires_grad=True))
    dead = torch.zeros(1, 2, lq, dtype=torch.bool)
    dead[..., lk + w:] = True
    _assert_dead_rows(out, lse, grads["q"], dead)
    # and combined with causal: rows past lk+w die, and causal never kills a row (key 0 or its band)
    run_case(q, k, v, prior=prior, alpha=1.0, causal=True)


def test_dense_all_neg_inf_row(many_blocks):
    lq, lk = 20, 8
    q, k, v = qkv(1, 1, 1, lq, lk, 16, seed=4)
    bias = torch.randn(lq, lk)
    bias[::4] = float("-inf")
    alpha = torch.tensor(1.0, requires_grad=True)
    out, lse, grads = run_case(q, k, v, prior=DensePrior(bias.requires_grad_()), alpha=alpha)
    dead = torch.zeros(1, 1, lq, dtype=torch.bool)
    dead[..., ::4] = True
    _assert_dead_rows(out, lse, grads["q"], dead)


@pytest.mark.parametrize("prior_grad", [False, True], ids=["fused-bwd", "blocked-bwd"])
def test_dense_all_neg_inf_row_and_padded_batch(prior_grad, many_blocks, path):
    """Rows emptied by a dense -inf row and by padding every key, with and without prior gradients."""
    b, lq, lk = 2, 20, 8
    q, k, v = qkv(b, 2, 2, lq, lk, 16, seed=5)
    bias = torch.randn(lq, lk)
    bias[::4] = float("-inf")
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1] = True
    bias.requires_grad_(prior_grad)
    out, lse, grads = run_case(q, k, v, prior=DensePrior(bias), alpha=0.5, key_padding_mask=kpm)
    dead = torch.zeros(b, 2, lq, dtype=torch.bool)
    dead[..., ::4] = True
    dead[1] = True
    _assert_dead_rows(out, lse, grads["q"], dead)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_nan_padded_buffers_no_oob_read(many_blocks):
    """Inputs cut out of NaN-padded buffers: an out-of-bounds read would show up as NaN.

    Not required bitwise equal to the contiguous run: tiles sliced out of a strided buffer may take
    another BLAS path and round differently (observed up to ~4e-7), so only closeness is required.
    """
    b, h, lq, lk, d = 2, 2, 33, 21, 16
    gen = _gen(0)
    q0, k0, v0 = (torch.randn(b, h, n, d, generator=gen) for n in (lq, lk, lk))

    def nan_pad(t):
        buf = torch.full((t.shape[0], t.shape[1], t.shape[2] + 5, t.shape[3] + 3), float("nan"))
        buf[:, :, : t.shape[2], : t.shape[3]] = t
        return buf[:, :, : t.shape[2], : t.shape[3]]

    kpm = padding_mask(b, lk)
    cases = [
        ("lag", RelativeLagPrior(torch.randn(h, 7, generator=gen))),
        ("dense", DensePrior(torch.randn(lq, lk, generator=gen))),
        ("banded_masked", BandedPrior(torch.randn(lq, 5, generator=gen), True)),
    ]
    for name, prior in cases:
        for causal in (False, True):
            a = rapkern.attention(q0, k0, v0, prior=prior, causal=causal, key_padding_mask=kpm, return_lse=True)
            bb = rapkern.attention(nan_pad(q0), nan_pad(k0), nan_pad(v0), prior=prior, causal=causal,
                                   key_padding_mask=kpm, return_lse=True)
            assert not torch.isnan(bb[0]).any() and not torch.isnan(bb[1]).any(), name
            torch.testing.assert_close(bb[0], a[0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(bb[1], a[1], atol=1e-6, rtol=1e-6)


def test_strided_inputs_and_noncontiguous_dout(many_blocks, path):
    """(B, L, H, D)-layout q/k/v transposed to (B, H, L, D) and a strided upstream gradient."""
    b, h, lq, lk, d = 2, 2, 29, 35, 16
    gen = _gen(1)
    q = torch.randn(b, lq, h, d, generator=gen).transpose(1, 2).requires_grad_()
    k = torch.randn(b, lk, h, d, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(b, lk, h, d, generator=gen).transpose(1, 2).requires_grad_()
    dout = torch.randn(b, h, lq, 2 * d, generator=gen, dtype=torch.float64)[..., ::2]
    bias = torch.randn(lk, lq, generator=gen).t().requires_grad_()  # transposed dense bias
    run_case(q, k, v, prior=DensePrior(bias), alpha=0.5, causal=True, dout=dout)
    run_case(q, k, v, prior=make_prior("lag", (h,), lq, lk, gen=gen, dtype=torch.float32), dout=dout)


def test_expanded_stride0_prior(many_blocks):
    """A stride-0 expanded dense bias / lag table is read correctly and its gradient is reduced."""
    b, h, lq, lk = 2, 3, 18, 18
    q, k, v = qkv(b, h, h, lq, lk, 16, seed=2)
    base = torch.randn(lq, lk, requires_grad=True)
    bias = base.expand(b, h, lq, lk)
    out = rapkern.attention(q, k, v, prior=DensePrior(bias), causal=True)
    ref = reference_attention(q.double(), k.double(), v.double(), prior=DensePrior(base.double()), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(out.sum(), base)
    (gref,) = torch.autograd.grad(
        reference_attention(q, k, v, prior=DensePrior(base), causal=True).sum(), base
    )
    torch.testing.assert_close(g, gref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Blocking, determinism.


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_many_blocks_equals_one_block(kind, monkeypatch):
    b, h, lq, lk = 2, 2, 97, 83
    q, k, v = qkv(b, h, 1, lq, lk, 16, dtype=torch.float64, seed=3)
    prior = make_prior(kind, (h,), lq, lk, gen=_gen(4))
    alpha = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    kpm = padding_mask(b, lk)
    leaves = [q, k, v, alpha] + ([] if prior is None else list(prior.tensors()))

    def go():
        out, lse = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=True, key_padding_mask=kpm,
                                     return_lse=True, backend="torch")
        return (out, lse, *torch.autograd.grad(out.sum(), leaves))

    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "1024")
    monkeypatch.setenv("RAPKERN_TORCH_FUSED_ROWS", "1024")
    one = go()
    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.001")
    monkeypatch.setenv("RAPKERN_TORCH_FUSED_ROWS", "16")
    many = go()
    for a, bb in zip(one, many):
        torch.testing.assert_close(a, bb, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_run_twice_bitwise(kind, many_blocks):
    """Forward and backward (incl. prior and alpha grads) are bitwise reproducible."""
    q, k, v = qkv(4, 4, 2, 67, 67, 16, seed=5)
    prior = make_prior(kind, (4, 4), 67, 67, gen=_gen(6), dtype=torch.float32)
    alpha = torch.tensor([0.5, 1.5, 1.0, 2.0], requires_grad=True)
    leaves = [q, k, v, alpha] + list(prior.tensors())

    def go():
        out, lse = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=True, return_lse=True)
        return (out, lse, *torch.autograd.grad(out.square().sum(), leaves))

    first = go()
    for _ in range(3):
        again = go()
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_lse_matches_logsumexp_of_logits(many_blocks):
    """lse is the natural log-sum-exp of scale*qk + alpha*B over visible keys (float32)."""
    q, k, v = qkv(1, 2, 2, 19, 23, 16, dtype=torch.float64, seed=8)
    bias = torch.randn(2, 19, 23, dtype=torch.float64)
    _, lse = rapkern.attention(q, k, v, prior=DensePrior(bias), alpha=0.7, scale=0.2, return_lse=True)
    want = torch.logsumexp(0.2 * q @ k.transpose(-1, -2) + 0.7 * bias, dim=-1)
    torch.testing.assert_close(lse, want.float(), atol=1e-6, rtol=1e-6)


def test_gradient_reaches_every_input():
    q, k, v = qkv(1, 2, 2, 9, 9, 16, seed=1)
    priors = [make_prior(kk, (), 9, 9, gen=_gen(1), dtype=torch.float32) for kk in PRIOR_KINDS[1:]]
    for prior in priors:
        alpha = torch.tensor([0.5, 1.0], requires_grad=True)
        out = rapkern.attention(q, k, v, prior=prior, alpha=alpha)
        leaves = [q, k, v, alpha, *prior.tensors()]
        grads = torch.autograd.grad(out.square().sum(), leaves)
        for g, t in zip(grads, leaves):
            assert g is not None and g.shape == t.shape and g.abs().sum() > 0


def test_prior_without_requires_grad_and_alpha_float():
    """No grad buffers for prior tensors that do not require grad; q/k/v grads still right."""
    q, k, v = qkv(1, 2, 2, 21, 21, 16, seed=1)
    prior = make_prior("lowrank", (), 21, 21, gen=_gen(2), dtype=torch.float32, requires_grad=False)
    run_case(q, k, v, prior=prior, alpha=1.3)
    prior.u.requires_grad_()  # only one factor needs grad
    run_case(q, k, v, prior=prior, alpha=1.3)


def test_alpha_tensor_without_prior_gets_zero_grad():
    q, k, v = qkv(1, 2, 2, 5, 5, 16, seed=1)
    alpha = torch.tensor([1.0, 2.0], requires_grad=True)
    out = rapkern.attention(q, k, v, alpha=alpha)
    (g,) = torch.autograd.grad(out.sum(), alpha, allow_unused=True)
    assert g is None or (g == 0).all()


# ----------------------------------------------------------------------------------------------------------
# Dropout.


def _dropout_inputs():
    q, k, v = qkv(1, 2, 2, 21, 19, 16, dtype=torch.float64, seed=9)
    prior = make_prior("lag", (2,), 21, 19, gen=_gen(1))
    return q, k, v, prior


def _drop_run(q, k, v, prior, p, seed):
    torch.manual_seed(seed)
    out = rapkern.attention(q, k, v, prior=prior, causal=True, dropout_p=p, backend="torch")
    leaves = [q, k, v, *prior.tensors()]
    return (out, *torch.autograd.grad(out.sum(), leaves))


def test_dropout_zero_is_identity(many_blocks):
    q, k, v, prior = _dropout_inputs()
    a = _drop_run(q, k, v, prior, 0.0, 0)
    torch.manual_seed(0)
    out = rapkern.attention(q, k, v, prior=prior, causal=True, backend="torch")
    b = (out, *torch.autograd.grad(out.sum(), [q, k, v, *prior.tensors()]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_dropout_same_seed_same_result_other_seed_differs(many_blocks):
    q, k, v, prior = _dropout_inputs()
    a = _drop_run(q, k, v, prior, 0.3, 1234)
    b = _drop_run(q, k, v, prior, 0.3, 1234)
    c = _drop_run(q, k, v, prior, 0.3, 4321)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    plain = rapkern.attention(q, k, v, prior=prior, causal=True)
    assert not torch.allclose(a[0], plain)


def test_dropout_fraction_of_zeros(many_blocks):
    """With v = identity columns the output exposes the dropped probabilities: about p of them are 0."""
    lq = lk = 64
    q = torch.randn(1, 1, lq, 16, dtype=torch.float64) * 0.1
    k = torch.randn(1, 1, lk, 16, dtype=torch.float64) * 0.1
    v = torch.eye(lk, dtype=torch.float64)[None, None]
    torch.manual_seed(0)
    out = rapkern.attention(q, k, v, dropout_p=0.25)
    frac = float((out == 0).double().mean())
    assert abs(frac - 0.25) < 0.03, frac
    # kept probabilities are scaled by 1/(1-p)
    plain = rapkern.attention(q, k, v)
    kept = out != 0
    torch.testing.assert_close(out[kept], plain[kept] / 0.75)


def test_dropout_mean_approaches_no_dropout(many_blocks):
    """E[dropout output] = no-dropout output: the mean over n seeds is within a 5-sigma bound."""
    q, k, v, prior = _dropout_inputs()
    p, n = 0.3, 300
    plain = rapkern.attention(q, k, v, prior=prior, causal=True)
    outs = []
    for s in range(n):
        torch.manual_seed(s)
        outs.append(rapkern.attention(q, k, v, prior=prior, causal=True, dropout_p=p))
    outs = torch.stack(outs)
    mean, std = outs.mean(0), outs.std(0)
    bound = 5 * std / math.sqrt(n) + 1e-9
    assert ((mean - plain).abs() <= bound).float().mean() > 0.995
    assert (mean - plain).abs().max() < 0.1 * plain.abs().max() + 0.05


def test_dropout_grad_matches_masked_reference(many_blocks):
    """Backward of the seeded forward: d out/d v equals P_drop^T dout, recovered from v = identity."""
    lq, lk = 30, 30
    gen = _gen(3)
    q = torch.randn(1, 1, lq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, lk, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(lk, dtype=torch.float64)[None, None]
    torch.manual_seed(7)
    pd = rapkern.attention(q, k, eye, dropout_p=0.4)  # = dropped, rescaled probabilities
    v = torch.randn(1, 1, lk, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    out = rapkern.attention(q, k, v, dropout_p=0.4)
    torch.testing.assert_close(out, pd @ v, atol=1e-12, rtol=1e-12)
    dout = torch.randn_like(out)
    (dv,) = torch.autograd.grad(out, v, dout)
    torch.testing.assert_close(dv, pd.transpose(-1, -2) @ dout, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Meta-tests: the checks above are sharp enough to catch plausible kernel bugs. Each mutant changes only
# what the "torch" backend sees (the reference keeps the true ``materialize``), and run_case must fail.


def _keep_true_materialize(monkeypatch):
    """Pin Prior.materialize (used by the references) to the unpatched tile functions."""
    from rapkern import priors as P

    blocks = {cls: cls.block for cls in (P.RelativeLagPrior, P.BandedPrior, P.LowRankPrior, P.DensePrior)}
    visibles = {cls: cls.visible for cls in blocks}

    def materialize(self, batch, heads, lq, lk):
        tile = blocks[type(self)](self, 0, lq, 0, lk, self.tensors()[0].dtype)
        vis = visibles[type(self)](self, 0, lq, 0, lk)
        return tile if vis is None else tile.masked_fill(~vis, float("-inf"))

    monkeypatch.setattr(P.Prior, "materialize", materialize)
    return P


def _mutant_lag_off_by_one(monkeypatch):
    P = _keep_true_materialize(monkeypatch)
    orig = P.RelativeLagPrior._lags
    monkeypatch.setattr(P.RelativeLagPrior, "_lags", lambda self, *a: orig(self, *a) + 1)


def _mutant_lag_tile_perturbed(monkeypatch):
    P = _keep_true_materialize(monkeypatch)
    orig = P.RelativeLagPrior.block
    monkeypatch.setattr(P.RelativeLagPrior, "block", lambda self, *a: orig(self, *a) * 1.001)


def _mutant_lag_grad_tail_dropped(monkeypatch):
    """Clamped tails of the lag gradient lost (a classic bug): only the last table entry."""
    P = _keep_true_materialize(monkeypatch)
    orig = P.RelativeLagPrior.accumulate_grad

    def acc(self, grads, ds, i0, i1, j0, j1):
        if grads[0] is None:
            return
        before = grads[0][..., -1].clone()
        orig(self, grads, ds, i0, i1, j0, j1)
        grads[0][..., -1] = before

    monkeypatch.setattr(P.RelativeLagPrior, "accumulate_grad", acc)


def _mutant_band_one_wider(monkeypatch):
    P = _keep_true_materialize(monkeypatch)
    orig = P.BandedPrior._offsets
    monkeypatch.setattr(P.BandedPrior, "_offsets", lambda self, i0, i1, j0, j1: orig(self, i0, i1, j0, j1) + (
        orig(self, i0, i1, j0, j1) == -1).long())


def _mutant_alpha_slightly_wrong(monkeypatch):
    from rapkern.backends.torch_blocked import attention as A

    orig = A.TilePlan.__init__

    def init(self, q, k, v, prior, alpha, *rest):
        orig(self, q, k, v, prior, alpha * 1.001 if not isinstance(alpha, torch.Tensor) else alpha * 1.001, *rest)

    monkeypatch.setattr(A.TilePlan, "__init__", init)


def _mutant_dk_scaled(monkeypatch):
    from rapkern.backends.torch_blocked import attention as A

    orig = A.attention_bwd

    def bwd(*a, **k):
        dq, dk, dv, da, dp = orig(*a, **k)
        return dq, None if dk is None else dk * 1.0005, dv, da, dp

    monkeypatch.setattr(A, "attention_bwd", bwd)


def _mutant_causal_off_by_one(monkeypatch):
    """Causal diagonal excluded (j < i instead of j <= i) for rows i > 0, on every path using visible()."""
    from rapkern.backends.torch_blocked import attention as A

    orig = A.TilePlan.visible

    def visible(self, i0, i1, j0, j1):
        vis = orig(self, i0, i1, j0, j1)
        if self.causal:
            i = torch.arange(i0, i1)[:, None]
            vis = vis & ~((torch.arange(j0, j1)[None, :] == i) & (i > 0))
        return vis

    monkeypatch.setattr(A.TilePlan, "visible", visible)


def _mutant_fast_lag_view_shifted(monkeypatch):
    """CPU fast path: the Hankel view of the lag table read one lag off."""
    from rapkern.backends.torch_blocked import cpu_flash as C

    orig = C._Frame._lag_view
    monkeypatch.setattr(C._Frame, "_lag_view", lambda self, i0, i1, j0, j1: orig(self, i0 + 1, i1 + 1, j0, j1))


def _mutant_fast_dead_rows_missed(monkeypatch):
    """CPU fast path: rows with no visible key not detected (lse 0 instead of -inf)."""
    from rapkern.backends.torch_blocked import cpu_flash as C

    orig = C.dead_rows
    monkeypatch.setattr(C, "dead_rows", lambda plan: torch.zeros_like(orig(plan)))


MUTANTS = {  # name: (patch, prior kind, causal, pad all keys of batch 1)
    "lag-off-by-one": (_mutant_lag_off_by_one, "lag", False, False),
    "lag-tile-x1.001": (_mutant_lag_tile_perturbed, "lag", False, False),
    "lag-grad-tail-dropped": (_mutant_lag_grad_tail_dropped, "lag", False, False),
    "band-one-wider": (_mutant_band_one_wider, "banded_masked", False, False),
    "alpha-x1.001": (_mutant_alpha_slightly_wrong, "dense", False, False),
    "dk-x1.0005": (_mutant_dk_scaled, "dense", False, False),
    "causal-diagonal-dropped": (_mutant_causal_off_by_one, "dense", True, False),
    "fast-lag-view-shifted": (_mutant_fast_lag_view_shifted, "lag", True, False),
    "fast-dead-rows-missed": (_mutant_fast_dead_rows_missed, "lag", False, True),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_checks_detect_a_wrong_kernel(mutant, monkeypatch, many_blocks):
    patch, kind, causal, pad = MUTANTS[mutant]
    lq, lk = 37, 29
    q, k, v = qkv(2, 2, 1, lq, lk, 16, seed=31)
    prior = make_prior(kind, (2,), lq, lk, gen=_gen(32), dtype=torch.float32, w=2)
    alpha = torch.tensor([0.8, 1.2], requires_grad=True)
    kpm = torch.zeros(2, lk, dtype=torch.bool)
    kpm[1] = pad
    kw = dict(prior=prior, alpha=alpha, causal=causal, key_padding_mask=kpm)
    run_case(q, k, v, **kw)  # the true kernel passes
    patch(monkeypatch)
    with pytest.raises(AssertionError):
        run_case(q, k, v, **kw)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_empty_lengths_and_batch(kind, path):
    """Lk = 0: every row is dead (0 output, lse -inf, zero grads); Lq = 0 and B = 0: empty results."""
    q = torch.randn(2, 2, 5, 4, requires_grad=True)
    k = torch.randn(2, 1, 0, 4, requires_grad=True)
    prior = make_prior(kind, (), 5, 0, gen=_gen(1), dtype=torch.float32, w=1)
    out, lse = rapkern.attention(q, k, k, prior=prior, causal=True, return_lse=True)
    assert out.shape == (2, 2, 5, 4) and (out == 0).all() and torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert (dq == 0).all()
    q0 = torch.randn(2, 2, 0, 4)
    out, lse = rapkern.attention(q0, torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4),
                                 prior=make_prior(kind, (), 0, 3, gen=_gen(2), dtype=torch.float32, w=1),
                                 return_lse=True)
    assert out.shape == (2, 2, 0, 4) and lse.shape == (2, 2, 0)
    qb = torch.randn(0, 2, 3, 4)
    out = rapkern.attention(qb, qb, qb, prior=make_prior(kind, (), 3, 3, gen=_gen(3), dtype=torch.float32),
                            key_padding_mask=torch.zeros(0, 3, dtype=torch.bool))
    assert out.shape == (0, 2, 3, 4)
