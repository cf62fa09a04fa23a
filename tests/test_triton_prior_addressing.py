"""The Triton kernels address a prior's elements with 32-bit offsets from an int64 row (or block) base:
up to one block of rows (128) times the row stride plus a whole row. launch.PriorPack copies a prior view
whose strides could overflow that (e.g. a transposed L x L dense bias beyond 2^31 elements) to a contiguous
tensor, and passes every other view through untouched (no copy). Checked on meta tensors: no memory.
Also the layout of the dq kernel's band-gradient buffer and its decoding (launch._band_grad)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rapkern.backends.triton_attention import launch  # noqa: E402
from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior  # noqa: E402


def _meta(shape, strides):
    return torch.empty_strided(shape, strides, device="meta")


def test_ordinary_views_pass_through():
    for shape, strides in [((1, 1, 4096, 4096), (0, 0, 4096, 1)), ((2, 8, 4096, 33), (8 * 4096 * 33, 4096 * 33, 33, 1)),
                           ((1, 1, 4096, 4096), (0, 0, 1, 4096))]:  # a transposed bias within range
        t = _meta(shape, strides)
        assert launch._i32_addressable(t, 2) is t


@pytest.mark.parametrize("shape,strides", [
    ((1, 1, 65536, 65536), (0, 0, 1, 65536)),  # transposed dense bias: a row spans 2^32 elements
    ((1, 1, 8, 16), (0, 0, 2**24, 1)),         # 128 rows of stride 2^24 reach 2^31
])
def test_overflowing_views_are_copied_contiguous(shape, strides):
    t = _meta(shape, strides)
    got = launch._i32_addressable(t, 2)
    assert got is not t and got.is_contiguous() and got.shape == t.shape
    span = (got.shape[-1] - 1) * got.stride(-1) + 128 * got.stride(2)
    assert span < 2**31


def test_lag_table_column_stride():
    t = _meta((1, 1, 9), (0, 0, 2**28))  # 8 * 2^28 = 2^31
    assert launch._i32_addressable(t, None).stride(-1) == 1
    ok = _meta((1, 1, 9), (0, 0, 2**27))
    assert launch._i32_addressable(ok, None) is ok


def test_prior_pack_uses_the_guard():
    dummy = torch.empty(1, device="meta")
    big = _meta((65536, 65536), (1, 65536))  # transposed: columns 65536 apart
    pack = launch.PriorPack(DensePrior(big), dummy)
    assert pack.ps[3] == 1
    small = _meta((64, 64), (1, 64))
    pack = launch.PriorPack(DensePrior(small), dummy)
    assert pack.ps[2:] == (1, 64) and pack.p.data_ptr() == small.data_ptr()
    band = _meta((4, 100, 9), (100 * 9, 9, 1))
    assert launch.PriorPack(BandedPrior(band), dummy).ps[2:] == (9, 1)
    lag = _meta((3, 2**30 + 1), (2**30 + 1, 1))[:, :: 2**27]  # 9 entries 2^27 apart
    assert launch.PriorPack(RelativeLagPrior(lag), dummy).ps[3] == 2**27
    lr = LowRankPrior(_meta((64, 4), (4, 1)), _meta((64, 4), (4, 1)))
    assert launch.PriorPack(lr, dummy).ps[2:] == (4, 1)


@pytest.mark.parametrize("lq,w", [(1, 0), (97, 3), (128, 20), (256, 5), (300, 64)])
def test_band_grad_buffer_layout(lq, w):
    """The dq kernel writes the band gradient in 128-row groups, row i at column j - 128·(i // 128) + W;
    launch._band_grad must return exactly the (b, hq, lq, 2W + 1) band, whatever the kernel's BLOCK_M."""
    b, hq, g = 2, 3, launch.BAND_GRAD_GROUP
    band = torch.randn(b, hq, lq, 2 * w + 1, dtype=torch.float64)
    rows = -(-lq // g) * g
    buf = torch.full((b * hq, rows, g + 2 * w), float("nan"), dtype=torch.float64)  # unread cells stay NaN
    i = torch.arange(lq)
    for off in range(2 * w + 1):
        j = i - w + off  # the key of band cell (i, off)
        buf[:, i, j - i // g * g + w] = band.reshape(b * hq, lq, -1)[:, :, off]
    got = launch._band_grad(buf, b, hq, lq, w)
    assert got.shape == (b, hq, lq, 2 * w + 1) and got.is_contiguous()
    assert torch.equal(got, band)
