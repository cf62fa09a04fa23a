"""pytest-benchmark micro-benchmarks of the CPU paths (kept out of the default test run).

Run: ``make microbench`` (= ``pytest bench/micro -q --benchmark-only --benchmark-enable``).
Small shapes, float32: they track per-call overheads of the torch backend (tile construction, the
blocked forward/backward, prior gradients) and the eager/SDPA baselines at the same shape, so a change in
one shows up as a ratio, not only as an absolute time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rapkern
from rapkern.priors import BandedPrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import reference_attention

B, H, L, D = 1, 4, 512, 64


def _qkv(grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _prior(kind, grad=False):
    g = torch.Generator().manual_seed(1)
    if kind == "lag":
        return RelativeLagPrior(torch.randn(H, 2 * 64 + 1, generator=g).requires_grad_(grad))
    if kind == "banded":
        return BandedPrior(torch.randn(H, L, 2 * 32 + 1, generator=g).requires_grad_(grad), mask_outside=True)
    if kind == "lowrank":
        return LowRankPrior(*(torch.randn(H, L, 8, generator=g).requires_grad_(grad) for _ in range(2)))
    return None


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("kind", ["none", "lag", "banded", "lowrank"])
def test_torch_backend_fwd(benchmark, kind):
    q, k, v = _qkv()
    prior = _prior(kind)
    with torch.no_grad():
        out = benchmark(lambda: rapkern.attention(q, k, v, prior=prior, alpha=0.7, backend="torch"))
    assert out.shape == (B, H, L, D)


@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank"])
def test_torch_backend_fwd_bwd_learnable_prior(benchmark, kind):
    q, k, v = _qkv(grad=True)
    prior = _prior(kind, grad=True)
    dout = torch.randn(B, H, L, D)

    def step():
        for t in (q, k, v, *prior.tensors()):
            t.grad = None
        rapkern.attention(q, k, v, prior=prior, alpha=0.7, causal=True, backend="torch").backward(dout)

    benchmark(step)
    assert all(t.grad is not None for t in prior.tensors())


@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank"])
def test_prior_tile(benchmark, kind):
    """One 128 x 512 tile of B from the compact prior (the per-tile cost inside every blocked kernel)."""
    prior = _prior(kind)
    tile = benchmark(lambda: prior.block(128, 256, 0, L, torch.float32))
    assert tile.shape[-2:] == (128, L)


def test_lag_accumulate_grad(benchmark):
    prior = _prior("lag")
    ds = torch.randn(1, H, 128, L)
    grads = [torch.zeros(1, H, 2 * 64 + 1)]
    benchmark(lambda: prior.accumulate_grad(grads, ds, 128, 256, 0, L))


def test_baseline_eager_fwd(benchmark):
    q, k, v = _qkv()
    prior = _prior("lag")
    with torch.no_grad():
        benchmark(lambda: reference_attention(q, k, v, prior=prior, alpha=0.7, compute_dtype=torch.float32))


def test_baseline_sdpa_nobias_fwd(benchmark):
    q, k, v = _qkv()
    with torch.no_grad():
        benchmark(lambda: F.scaled_dot_product_attention(q, k, v))
