"""rapkern.priors directly: B[i, j] of every kind against an explicit Python double loop, tiles against
the whole, tile gradients (accumulate_grad) against autograd of the materialized bias.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior, lead4, sum_to

NEG_INF = float("-inf")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _lead_iter(t, trailing):
    """Yield (bi, hi, 2-D-or-1-D slice) over the 4-D view of t."""
    t4 = lead4(t, trailing)
    for bi in range(t4.shape[0]):
        for hi in range(t4.shape[1]):
            yield bi, hi, t4[bi, hi]


# ----------------------------------------------------------------------------------------------------------
# Explicit loops: the spec, spelled out once more, independent of the library's index math.


def loop_lag(table, lq, lk):
    t4 = lead4(table, 1)
    w = (t4.shape[-1] - 1) // 2
    out = torch.empty(t4.shape[0], t4.shape[1], lq, lk, dtype=table.dtype)
    for bi, hi, tab in _lead_iter(table, 1):
        for i in range(lq):
            for j in range(lk):
                out[bi, hi, i, j] = tab[w + min(max(i - j, -w), w)]
    return out


def loop_banded(values, lq, lk, mask_outside):
    v4 = lead4(values, 2)
    w = (v4.shape[-1] - 1) // 2
    out = torch.empty(v4.shape[0], v4.shape[1], lq, lk, dtype=values.dtype)
    for bi, hi, vals in _lead_iter(values, 2):
        for i in range(lq):
            for j in range(lk):
                if abs(j - i) <= w:
                    out[bi, hi, i, j] = vals[i, w + (j - i)]
                else:
                    out[bi, hi, i, j] = NEG_INF if mask_outside else 0.0
    return out


def loop_lowrank(u, v, lq, lk):
    u4, v4 = lead4(u, 2), lead4(v, 2)
    bp, hp = max(u4.shape[0], v4.shape[0]), max(u4.shape[1], v4.shape[1])
    out = torch.empty(bp, hp, lq, lk, dtype=u.dtype)
    for bi in range(bp):
        for hi in range(hp):
            uu = u4[min(bi, u4.shape[0] - 1), min(hi, u4.shape[1] - 1)]
            vv = v4[min(bi, v4.shape[0] - 1), min(hi, v4.shape[1] - 1)]
            for i in range(lq):
                for j in range(lk):
                    out[bi, hi, i, j] = sum(float(uu[i, r] * vv[j, r]) for r in range(uu.shape[1]))
    return out


LEADS = [(), (3,), (1, 3), (2, 1), (2, 3)]
LEAD_IDS = ["lead()", "lead(H)", "lead(1,H)", "lead(B,1)", "lead(B,H)"]


@pytest.mark.parametrize("lead", LEADS, ids=LEAD_IDS)
@pytest.mark.parametrize("w", [0, 1, 3, 9], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (4, 7), (7, 3)], ids=lambda x: str(x))
def test_lag_materialize_matches_loop(lq, lk, w, lead):
    table = _rand(*lead, 2 * w + 1, seed=w)
    got = RelativeLagPrior(table).materialize(2, 3, lq, lk)
    assert got.shape == lead4(table, 1).shape[:2] + (lq, lk)
    assert torch.equal(got, loop_lag(table, lq, lk))


@pytest.mark.parametrize("mask_outside", [False, True], ids=["zero-outside", "mask-outside"])
@pytest.mark.parametrize("lead", LEADS, ids=LEAD_IDS)
@pytest.mark.parametrize("w", [0, 1, 2, 8], ids=lambda w: f"w{w}")
@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (4, 7), (7, 3)], ids=lambda x: str(x))
def test_banded_materialize_matches_loop(lq, lk, w, lead, mask_outside):
    values = _rand(*lead, lq, 2 * w + 1, seed=w + lq)
    got = BandedPrior(values, mask_outside=mask_outside).materialize(2, 3, lq, lk)
    assert got.shape == lead4(values, 2).shape[:2] + (lq, lk)
    assert torch.equal(got, loop_banded(values, lq, lk, mask_outside))


@pytest.mark.parametrize(
    "lead_u,lead_v", [((), ()), ((3,), ()), ((2, 1), (1, 3)), ((2, 3), (2, 3)), ((1, 3), (3,))],
    ids=lambda x: "lead" + str(x),
)
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (4, 7), (7, 3)], ids=lambda x: str(x))
def test_lowrank_materialize_matches_loop(lq, lk, r, lead_u, lead_v):
    u, v = _rand(*lead_u, lq, r, seed=1), _rand(*lead_v, lk, r, seed=2)
    got = LowRankPrior(u, v).materialize(2, 3, lq, lk)
    torch.testing.assert_close(got, loop_lowrank(u, v, lq, lk), atol=1e-13, rtol=0)


@pytest.mark.parametrize("lead", LEADS, ids=LEAD_IDS)
def test_dense_materialize_is_the_bias(lead):
    bias = _rand(*lead, 4, 6)
    bias[..., 1, 2] = NEG_INF
    got = DensePrior(bias).materialize(2, 3, 4, 6)
    assert torch.equal(got, lead4(bias, 2))


def test_materialize_keeps_dtype():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert RelativeLagPrior(_rand(5).to(dt)).materialize(1, 1, 3, 4).dtype == dt
        assert BandedPrior(_rand(3, 3).to(dt), True).materialize(1, 1, 3, 4).dtype == dt


def test_spec_examples_by_hand():
    """A few entries written out by hand from the issue's formulas."""
    table = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])  # W = 2
    lag = RelativeLagPrior(table).materialize(1, 1, 6, 6)[0, 0]
    assert lag[0, 0] == 12 and lag[3, 2] == 13 and lag[2, 3] == 11
    assert lag[5, 0] == 14 and lag[0, 5] == 10  # lags beyond +-W clamp onto the end entries
    values = torch.arange(4 * 3, dtype=torch.float32).reshape(4, 3)  # w = 1
    band = BandedPrior(values).materialize(1, 1, 4, 4)[0, 0]
    assert band[2, 1] == values[2, 0] and band[2, 2] == values[2, 1] and band[2, 3] == values[2, 2]
    assert band[0, 3] == 0 and band[3, 0] == 0
    masked = BandedPrior(values, mask_outside=True).materialize(1, 1, 4, 4)[0, 0]
    assert masked[0, 3] == NEG_INF and masked[2, 3] == values[2, 2]


# ----------------------------------------------------------------------------------------------------------
# Tiles: block / visible / key_range over arbitrary tilings agree with the whole.


def _priors(lq, lk, lead=(2, 3), seed=0):
    return {
        "lag_W0": RelativeLagPrior(_rand(*lead, 1, seed=seed)),
        "lag_W2": RelativeLagPrior(_rand(*lead, 5, seed=seed + 1)),
        "lag_W_gt_L": RelativeLagPrior(_rand(*lead, 2 * (lq + lk) + 1, seed=seed + 2)),
        "banded_w0": BandedPrior(_rand(*lead, lq, 1, seed=seed + 3)),
        "banded_w2": BandedPrior(_rand(*lead, lq, 5, seed=seed + 4)),
        "banded_w_gt_L": BandedPrior(_rand(*lead, lq, 2 * (lq + lk) + 1, seed=seed + 5)),
        "banded_masked_w0": BandedPrior(_rand(*lead, lq, 1, seed=seed + 6), mask_outside=True),
        "banded_masked_w2": BandedPrior(_rand(*lead, lq, 5, seed=seed + 7), mask_outside=True),
        "banded_masked_w_gt_L": BandedPrior(_rand(*lead, lq, 2 * (lq + lk) + 1, seed=seed + 8), mask_outside=True),
        "lowrank": LowRankPrior(_rand(*lead, lq, 2, seed=seed + 9), _rand(lead[-1], lk, 2, seed=seed + 10)),
        "dense": DensePrior(_rand(*lead, lq, lk, seed=seed + 11)),
    }


PRIOR_NAMES = list(_priors(3, 3))
TILINGS = [(1, 1), (2, 3), (4, 4), (3, 100), (100, 100)]


def _tiles(lq, lk, bq, bk):
    for i0 in range(0, lq, bq):
        for j0 in range(0, lk, bk):
            yield i0, min(i0 + bq, lq), j0, min(j0 + bk, lk)


@pytest.mark.parametrize("bq,bk", TILINGS, ids=lambda x: str(x))
@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_blocks_equal_materialized_slices(name, bq, bk):
    lq, lk = 9, 7
    prior = _priors(lq, lk)[name]
    whole = prior.materialize(2, 3, lq, lk)
    for i0, i1, j0, j1 in _tiles(lq, lk, bq, bk):
        tile = prior.block(i0, i1, j0, j1, torch.float64)
        assert tile.shape == prior.lead_shape() + (i1 - i0, j1 - j0)
        assert torch.isfinite(tile).all(), "block must be finite (0 off-band)"
        vis = prior.visible(i0, i1, j0, j1)
        sl = whole[..., i0:i1, j0:j1]
        if vis is None:
            assert not prior.masks_outside
            torch.testing.assert_close(tile, sl, atol=1e-13, rtol=0)
        else:
            assert vis.shape == (i1 - i0, j1 - j0)
            assert torch.equal(~vis.expand_as(sl), torch.isneginf(sl))
            torch.testing.assert_close(tile.masked_fill(~vis, NEG_INF), sl, atol=1e-13, rtol=0)


@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_block_converts_dtype(name):
    prior = _priors(5, 6)[name]
    for dt in (torch.float32, torch.float16):
        tile = prior.block(1, 4, 2, 6, dt)
        assert tile.dtype == dt
        want = prior.block(1, 4, 2, 6, torch.float64).to(dt)
        if name == "lowrank":  # u vᵀ computed in dt rounds each product
            torch.testing.assert_close(tile, want, atol=4e-3, rtol=4e-3)
        else:  # gathers only: exact
            assert torch.equal(tile, want)


@pytest.mark.parametrize("w", [0, 1, 3, 20])
def test_banded_key_range_covers_band(w):
    lq, lk = 13, 9
    for mask_outside in (False, True):
        prior = BandedPrior(_rand(lq, 2 * w + 1), mask_outside=mask_outside)
        whole = prior.materialize(1, 1, lq, lk)[0, 0]
        for i0 in range(lq):
            for i1 in range(i0 + 1, lq + 1):
                j0, j1 = prior.key_range(i0, i1, lk)
                assert 0 <= j0 <= lk and 0 <= j1 <= lk
                if not mask_outside:
                    assert (j0, j1) == (0, lk)
                    continue
                seen = torch.isfinite(whole[i0:i1]).any(0).nonzero().flatten()
                if seen.numel():
                    assert j0 <= int(seen.min()) and int(seen.max()) < j1, (i0, i1, j0, j1)


def test_other_priors_key_range_is_everything():
    for name, prior in _priors(5, 6).items():
        if not name.startswith("banded_masked"):
            assert prior.key_range(2, 4, 6) == (0, 6)


# ----------------------------------------------------------------------------------------------------------
# Tile gradients: summing accumulate_grad over a tiling equals autograd through materialize.


@pytest.mark.parametrize("bq,bk", TILINGS, ids=lambda x: str(x))
@pytest.mark.parametrize("name", PRIOR_NAMES)
@pytest.mark.parametrize("lq,lk", [(9, 7), (4, 11), (1, 1)], ids=lambda x: f"{x}")
def test_accumulate_grad_matches_autograd(name, bq, bk, lq, lk):
    prior0 = _priors(lq, lk)[name]
    leaves = [t.clone().requires_grad_() for t in prior0.tensors()]
    prior = prior0.with_tensors(*leaves)
    bp, hp = prior.lead_shape()
    ds = _rand(bp, hp, lq, lk, seed=99)
    whole = prior.materialize(2, 3, lq, lk)
    # masked (-inf) entries carry no gradient in any backend: their dS is 0 there
    term = torch.where(torch.isneginf(whole), torch.zeros_like(whole), whole * ds)
    want = torch.autograd.grad(term.sum(), leaves, allow_unused=True)

    trailing = 1 if prior.kind == "lag" else 2
    bufs = [torch.zeros(lead4(t, trailing).shape, dtype=torch.float64) for t in leaves]
    for i0, i1, j0, j1 in _tiles(lq, lk, bq, bk):
        prior.accumulate_grad(bufs, ds[..., i0:i1, j0:j1], i0, i1, j0, j1)
    for buf, w_, t in zip(bufs, want, leaves):
        w_ = torch.zeros_like(t) if w_ is None else w_
        torch.testing.assert_close(buf.reshape(t.shape), w_, atol=1e-12, rtol=1e-12)


def test_accumulate_grad_skips_none_buffers():
    prior = _priors(4, 4)["lowrank"]
    gu = torch.zeros(lead4(prior.u, 2).shape, dtype=torch.float64)
    prior.accumulate_grad([gu, None], _rand(2, 3, 4, 4), 0, 4, 0, 4)
    assert gu.abs().sum() > 0
    for name in ("lag_W2", "banded_w2", "dense"):
        _priors(4, 4)[name].accumulate_grad([None], _rand(2, 3, 4, 4), 0, 4, 0, 4)  # no error


@pytest.mark.parametrize("w", [0, 1, 2])
def test_lag_gradient_clamped_tails(w):
    """Lags beyond +-W land on the end entries: table grad = per-lag sums of dS with clamped tails."""
    lq, lk = 8, 11
    table = _rand(2 * w + 1).requires_grad_()
    ds = _rand(1, 1, lq, lk, seed=5)
    want = torch.zeros(2 * w + 1, dtype=torch.float64)
    for i in range(lq):
        for j in range(lk):
            want[w + min(max(i - j, -w), w)] += ds[0, 0, i, j]
    (got,) = torch.autograd.grad((RelativeLagPrior(table).materialize(1, 1, lq, lk) * ds).sum(), table)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for bq, bk in [(1, 1), (3, 4), (8, 11)]:
        buf = torch.zeros(1, 1, 2 * w + 1, dtype=torch.float64)
        for i0, i1, j0, j1 in _tiles(lq, lk, bq, bk):
            RelativeLagPrior(table.detach()).accumulate_grad([buf], ds[..., i0:i1, j0:j1], i0, i1, j0, j1)
        torch.testing.assert_close(buf.flatten(), want, atol=1e-12, rtol=0)
    if w == 0:
        torch.testing.assert_close(want, ds.sum().reshape(1))


def test_lag_window_larger_than_lengths_uses_middle_only():
    """With W >= max(Lq, Lk) no lag clamps: the outermost entries get no gradient."""
    lq, lk, w = 4, 5, 9
    table = _rand(2 * w + 1).requires_grad_()
    ds = _rand(1, 1, lq, lk, seed=3)
    buf = torch.zeros(1, 1, 2 * w + 1, dtype=torch.float64)
    RelativeLagPrior(table.detach()).accumulate_grad([buf], ds, 0, lq, 0, lk)
    used = set(w + i - j for i in range(lq) for j in range(lk))
    for m in range(2 * w + 1):
        if m not in used:
            assert buf[0, 0, m] == 0


def test_banded_w_larger_than_length_is_dense_diagonals():
    lq, lk, w = 3, 4, 6
    values = _rand(lq, 2 * w + 1)
    whole = BandedPrior(values, mask_outside=True).materialize(1, 1, lq, lk)[0, 0]
    assert torch.isfinite(whole).all()
    for i, j in itertools.product(range(lq), range(lk)):
        assert whole[i, j] == values[i, w + j - i]


# ----------------------------------------------------------------------------------------------------------
# Helpers and plumbing.


def test_lead4_and_sum_to():
    assert lead4(torch.zeros(5), 1).shape == (1, 1, 5)
    assert lead4(torch.zeros(3, 5), 1).shape == (1, 3, 5)
    assert lead4(torch.zeros(2, 3, 5), 1).shape == (2, 3, 5)
    assert lead4(torch.zeros(4, 6), 2).shape == (1, 1, 4, 6)
    assert lead4(torch.zeros(3, 4, 6), 2).shape == (1, 3, 4, 6)
    t = _rand(2, 3, 4, 5)
    torch.testing.assert_close(sum_to(t, (1, 3, 4, 5)), t.sum(0, keepdim=True))
    torch.testing.assert_close(sum_to(t, (2, 1, 4, 5)), t.sum(1, keepdim=True))
    torch.testing.assert_close(sum_to(t, (1, 1, 4, 5)), t.sum((0, 1), keepdim=True))
    assert sum_to(t, t.shape) is t


def test_with_tensors_keeps_kind_and_mask():
    b = BandedPrior(_rand(3, 3), mask_outside=True)
    b2 = b.with_tensors(_rand(3, 3))
    assert isinstance(b2, BandedPrior) and b2.mask_outside and b2.masks_outside
    assert not BandedPrior(_rand(3, 3)).masks_outside
    for p in _priors(3, 4).values():
        p2 = p.with_tensors(*(t + 1 for t in p.tensors()))
        assert type(p2) is type(p) and p2.kind == p.kind
        assert all(torch.equal(a + 1, b) for a, b in zip(p.tensors(), p2.tensors()))
    assert "RelativeLagPrior" in repr(RelativeLagPrior(_rand(5)))


def test_prior_kinds_and_properties():
    assert RelativeLagPrior(_rand(7)).window == 3
    assert BandedPrior(_rand(4, 5)).half_width == 2
    assert LowRankPrior(_rand(4, 3), _rand(5, 3)).rank == 3
    assert LowRankPrior(_rand(3, 4, 2), _rand(2, 1, 5, 2)).lead_shape() == (2, 3)
    assert {p.kind for p in _priors(3, 3).values()} == {"lag", "banded", "lowrank", "dense"}
