"""Launch grids of the Triton attention kernels stay within CUDA's limits for any batch x heads.

CUDA bounds grid dimension x by 2^31 - 1 and dimensions y, z by 65,535. Every attention launcher folds
(b·H + h, block) into dimension x (launch.fwd_grid / dq_grid / dkdv_grid), so B = 2048, Hq = 32
(B·H = 65,536, one past the old dimension-1 limit) launches. The CPU tests check the grid functions and
that the launchers use them; the gpu test launches one such problem.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from rapkern.backends.triton_attention import launch  # noqa: E402

GRID_FNS = {"fwd": launch.fwd_grid, "dq": launch.dq_grid, "dkdv": launch.dkdv_grid}
CUDA_LIMITS = (2**31 - 1, 65535, 65535)

# (B, H, L, block): B·H at and beyond 65,536, short and long sequences, smallest and largest blocks
SHAPES = [(2048, 32, 128, 128), (2048, 32, 1, 16), (4096, 64, 4096, 16), (1, 1, 1, 128), (65536, 1, 97, 64),
          (8, 65536, 33, 32), (2048, 32, 2**17, 16)]


@pytest.mark.parametrize("kernel", list(GRID_FNS))
@pytest.mark.parametrize("b,h,length,block", SHAPES, ids=[f"B{s[0]}-H{s[1]}-L{s[2]}-blk{s[3]}" for s in SHAPES])
def test_grid_within_cuda_limits(kernel, b, h, length, block):
    grid = GRID_FNS[kernel](b, h, length, block)
    assert len(grid) == 3
    for dim, (n, limit) in enumerate(zip(grid, CUDA_LIMITS)):
        assert 1 <= n <= limit, f"{kernel} grid {grid}: dimension {dim} = {n} exceeds {limit}"
    # one program per (b·H + h, block): nothing dropped, nothing doubled
    assert grid[0] * grid[1] * grid[2] == b * h * -(-length // block)


def test_grid_beyond_dimension_x_raises():
    with pytest.raises(ValueError, match=r"= 2147483648 programs exceeds CUDA's grid limit of 2147483647"):
        launch.fwd_grid(2**16, 2**8, 128 * 16, 16)
    assert launch.fwd_grid(2**16, 2**8, 127 * 16, 16) == (2**24 * 127, 1, 1)  # just below the limit: fine


def _record_grids(monkeypatch):
    seen = []
    for name in ("fwd_grid", "dq_grid", "dkdv_grid"):
        real = getattr(launch, name)

        def rec(*a, _real=real, _name=name):
            g = _real(*a)
            seen.append((_name, a, g))
            return g

        monkeypatch.setattr(launch, name, rec)
    return seen


@pytest.mark.interpreter
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter launch path")
@pytest.mark.parametrize("kind", ["none", "lag"])
def test_launchers_use_the_grid_functions(monkeypatch, kind):
    """Forward, dq and dk/dv (incl. the fixed-tile lag-gradient dk/dv launch) go through the grid functions."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 on a machine without CUDA")
    import rapkern
    from rapkern.priors import RelativeLagPrior

    seen = _record_grids(monkeypatch)
    q = torch.randn(3, 2, 9, 16, requires_grad=True)
    k = torch.randn(3, 1, 5, 16, requires_grad=True)
    prior = RelativeLagPrior(torch.randn(5, requires_grad=True)) if kind == "lag" else None
    out = rapkern.attention(q, k, k, prior=prior, backend="triton")
    out.sum().backward()
    names = [s[0] for s in seen]
    assert names == ["fwd_grid", "dq_grid", "dkdv_grid"], names
    assert seen[0][1][:3] == (3, 2, 9) and seen[2][1][:3] == (3, 1, 5)


@pytest.mark.gpu
def test_launch_with_batch_times_heads_65536():
    """B = 2048, Hq = 32: B·H = 65,536 programs per block row -- one past the old dimension-1 limit."""
    import rapkern
    from rapkern.testing import reference_attention

    b, hq, hkv, lq, lk, d = 2048, 32, 8, 17, 33, 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.float16, generator=gen, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.float16, generator=gen, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, device="cuda", dtype=torch.float16, generator=gen, requires_grad=True)
    out = rapkern.attention(q, k, v, causal=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out.float().sum(), [q, k, v])
    for i in (0, b - 1):  # first and last batch: programs at both ends of the grid ran
        qi, ki, vi = (t[i : i + 1].detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qi, ki, vi, causal=True)
        rq, rk, rv = torch.autograd.grad(ref.sum(), [qi, ki, vi])
        assert (out[i : i + 1].double() - ref).abs().max() < 5e-3
        for got, want in ((dq, rq), (dk, rk), (dv, rv)):
            assert (got[i : i + 1].double() - want).abs().max() < 2e-2 * max(1.0, want.abs().max().item())
