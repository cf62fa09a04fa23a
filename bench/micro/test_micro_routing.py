"""pytest-benchmark micro-benchmarks of lda_route on CPU (``make microbench``)."""

from __future__ import annotations

import pytest
import torch

import rapkern
from rapkern.testing import reference_lda_route

G, N, NC, DIM, E = 2, 2048, 256, 64, 32


def _inputs(grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(G, n, d, generator=g).requires_grad_(grad) for n, d in ((N, DIM), (NC, DIM), (NC, E))]


@pytest.mark.parametrize("top_k", [None, 8], ids=["dense", "top8"])
def test_route_fwd_torch(benchmark, top_k):
    q, c, a = _inputs()
    with torch.no_grad():
        out = benchmark(lambda: rapkern.lda_route(q, c, a, top_k=top_k, backend="torch"))
    assert out.shape == (G, N, E)


@pytest.mark.parametrize("top_k", [None, 8], ids=["dense", "top8"])
def test_route_fwd_bwd_torch(benchmark, top_k):
    q, c, a = _inputs(grad=True)

    def step():
        for t in (q, c, a):
            t.grad = None
        rapkern.lda_route(q, c, a, top_k=top_k, backend="torch").sum().backward()

    benchmark(step)


@pytest.mark.parametrize("top_k", [None, 8], ids=["dense", "top8"])
def test_route_fwd_eager(benchmark, top_k):
    q, c, a = _inputs()
    with torch.no_grad():
        benchmark(lambda: reference_lda_route(q, c, a, top_k=top_k, compute_dtype=torch.float32))
