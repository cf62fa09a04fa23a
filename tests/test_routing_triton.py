"""The Triton routing kernels (backend "triton_routing") through the interpreter, against the float64
reference with the 2x rule: dense and top-k, forward and backward, fp32 and fp16, tau, cluster_mask."""

from __future__ import annotations

import os

import pytest
import torch
from test_routing_torch import _expected_tie_indices, _inputs, _rand, _tie_case, run_route

import rapkern
from rapkern.validate import check_route

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a GPU"),
]
pytest.importorskip("triton")
B = "triton_routing"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (G, N, n, d, e): interpreter blocks are 16 wide, so these cover ragged tiles and several d/e chunks
SMALL, MID, GROUPED = (None, 1, 1, 4, 3), (None, 19, 21, 40, 19), (2, 20, 18, 20, 9)
CASES = [  # (shape, dtype, normalize, top_k)
    (SMALL, torch.float32, True, None), (SMALL, torch.float32, True, 1),
    (MID, torch.float32, True, None), (MID, torch.float32, False, None), (MID, torch.float32, True, 3),
    (MID, torch.float32, False, 3), (MID, torch.float32, True, 1),
    (MID, torch.float16, True, None), (MID, torch.float16, True, 3),
    (GROUPED, torch.float32, True, None), (GROUPED, torch.float32, True, 4),
    (GROUPED, torch.float16, True, None), (GROUPED, torch.float16, False, 4),
]


def _id(case):
    (g, n, c, d, e), dt, norm, k = case
    return (f"G{g}-N{n}-n{c}-d{d}-e{e}-{str(dt)[6:].replace('float', 'fp')}-{'cos' if norm else 'dot'}-"
            f"{'dense' if k is None else f'top{k}'}")


def _dev(*ts):
    return tuple(t.detach().to(DEV).requires_grad_(t.requires_grad) for t in ts)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_triton_route(case):
    shape, dtype, normalize, top_k = case
    q, c, a = _dev(*_inputs(shape, dtype=dtype, seed=shape[1]))
    run_route(q, c, a, tau=0.1 if normalize else 2.0, top_k=top_k, normalize=normalize, backend=B)


@pytest.mark.parametrize("top_k", [None, 4], ids=["dense", "top4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_tau_gradient(dtype, top_k):
    q, c, a = _dev(*_inputs((2, 17, 18, 20, 9), dtype=dtype, seed=50))
    tau = torch.tensor(0.2, device=DEV, requires_grad=True)
    _, grads = run_route(q, c, a, tau=tau, top_k=top_k, backend=B)
    assert grads[3].abs() > 0


@pytest.mark.parametrize("top_k", [None, 1, 5], ids=["dense", "top1", "top5"])
def test_triton_cluster_mask(top_k):
    """Per-group masks, one group with only 3 present clusters (fewer than k = 5) and one with none."""
    q, c, a = _dev(*_inputs((3, 9, 20, 12, 7), seed=51))
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(52)) < 0.5
    mask[1] = True
    mask[1, [2, 9, 17]] = False
    mask[2] = True
    run_route(q, c, a, top_k=top_k, cluster_mask=mask.to(DEV), backend=B)
    out = rapkern.lda_route(q, c, a, top_k=top_k, cluster_mask=mask.to(DEV), backend=B)
    assert (out[2] == 0).all()


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
def test_triton_shared_table(top_k):
    q = _rand(3, 7, 20, dtype=torch.float32, seed=53)
    c, a = _rand(18, 20, dtype=torch.float32, seed=54), _rand(18, 6, dtype=torch.float32, seed=55)
    q, c, a = _dev(q, c, a)
    run_route(q, c, a, top_k=top_k, backend=B)
    mask = (torch.rand(3, 18, generator=torch.Generator().manual_seed(56)) < 0.3).to(DEV)
    run_route(q, c, a, top_k=top_k, cluster_mask=mask, backend=B)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_triton_topk_ties_go_to_lower_index(k):
    q, base, c = _tie_case()
    q, c = q.float().to(DEV), c.float().to(DEV)
    a = torch.randn(9, 2, device=DEV, requires_grad=True)
    got = rapkern.lda_route(q, c, a, top_k=k, normalize=False, tau=1.0, backend=B)
    want = _expected_tie_indices(q.double().cpu() @ base.T, k).to(DEV)
    ref = (torch.softmax((q[:, None, :] * c[want]).sum(-1), -1)[..., None] * a[want]).sum(1)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    (da,) = torch.autograd.grad(got.sum(), a)
    used = torch.zeros(9, dtype=torch.bool, device=DEV)
    used[want.flatten()] = True
    assert (da[~used] == 0).all(), "a centroid outside the chosen top-k received gradient"


def test_triton_large_k():
    """k = 64 (the limit) over 70 clusters."""
    q, c, a = _dev(*_inputs((None, 5, 70, 8, 3), seed=57))
    run_route(q, c, a, top_k=64, backend=B)


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
def test_triton_nan_padded_strided_inputs(top_k):
    """Inputs cut out of NaN-filled buffers (non-contiguous rows): an out-of-bounds read shows up as NaN."""
    def cut(rows, cols, seed):
        buf = torch.full((rows + 3, cols + 5), float("nan"))
        buf[1:rows + 1, 2:cols + 2] = _rand(rows, cols, dtype=torch.float32, seed=seed).detach()
        return buf.to(DEV)[1:rows + 1, 2:cols + 2].requires_grad_()

    q, c, a = cut(19, 20, 58), cut(17, 20, 59), cut(17, 11, 60)
    got, grads = run_route(q, c, a, top_k=top_k, backend=B)
    assert torch.isfinite(got).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
def test_triton_run_twice_bitwise(top_k):
    q, c, a = _dev(*_inputs((2, 20, 20, 20, 9), seed=61))
    res = []
    for _ in range(2):
        out = rapkern.lda_route(q, c, a, top_k=top_k, backend=B)
        res.append((out, *torch.autograd.grad(out.square().sum(), (q, c, a))))
    assert all(torch.equal(x, y) for x, y in zip(*res))


def test_triton_return_weights():
    q, c, a = _dev(*_inputs((None, 11, 9, 8, 4), seed=62))
    run_route(q, c, a, top_k=None, return_weights=True, backend=B)
    run_route(q, c, a, top_k=3, return_weights=True, backend=B)


REASONS = [
    ("fp64", lambda: _inputs((None, 3, 4, 5, 2), dtype=torch.float64, seed=0), {},
     r"dtype torch\.float64 not supported"),
    ("d-too-large", lambda: (torch.randn(2, 1025), torch.randn(3, 1025), torch.randn(3, 2)), {},
     r"feature dims d = 1025, e = 2 must be <= 1024"),
    ("top_k-too-large", lambda: (torch.randn(2, 4), torch.randn(70, 4), torch.randn(70, 2)), {"top_k": 65},
     r"top_k = 65 > 64"),
]


@pytest.mark.parametrize("make,kw,match", [r[1:] for r in REASONS], ids=[r[0] for r in REASONS])
def test_triton_declines_with_reasons(make, kw, match):
    q, c, a = make()
    with pytest.raises(NotImplementedError, match=r"backend 'triton_routing' cannot run lda_route .*" + match):
        rapkern.lda_route(q, c, a, backend=B, **kw)


def test_triton_top_k_64_and_n_pass():
    """Boundary: k = 64 passes; k = n (> 64) is the dense route and passes too."""
    q, c, a = torch.randn(2, 4), torch.randn(70, 4), torch.randn(70, 2)
    torch.testing.assert_close(rapkern.lda_route(q, c, a, top_k=70, backend=B), rapkern.lda_route(q, c, a),
                               atol=1e-6, rtol=1e-5)
    assert rapkern.lda_route(q, c, a, top_k=64, backend=B).shape == (2, 2)


@pytest.mark.parametrize("top_k", [None, 3])
def test_backend_triton_serves_routing(top_k):
    """backend="triton" (the name users know from attention) runs lda_route through the routing kernels."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    q, c, a = (torch.randn(n, 16, generator=g).to(dev) for n in (9, 7, 7))
    got = rapkern.lda_route(q, c, a, top_k=top_k, backend="triton")
    ref = rapkern.testing.reference_lda_route(q, c, a, top_k=top_k)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    be = rapkern.dispatch.get("triton")
    assert be.route_reasons(check_route(q, c, a, tau=0.1, top_k=top_k, normalize=True)) == []
