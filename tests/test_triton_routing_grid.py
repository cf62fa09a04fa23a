"""Launch grids of the routing kernels within CUDA's limits (dim 0 < 2^31, dims 1/2 <= 65,535).

On the CPU: every launcher's grid function, for group counts of 65,536 and beyond, with the
GPU and the interpreter block sizes, keeps every dim within the limits and covers every (group, block)
pair exactly once; a grid beyond dim 0's limit raises a ValueError that says so. On a GPU (``gpu`` mark): one
launch per kernel family with more than 65,535 groups, against the torch backend.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from rapkern.backends.triton_routing import configs as RC  # noqa: E402
from rapkern.backends.triton_routing import launch as RL  # noqa: E402

X_MAX, YZ_MAX = 2**31 - 1, 65535
GROUPS = [1, 65535, 65536, 70001, 2**20, 2**24]


def _within_limits(grid):
    assert 1 <= len(grid) <= 3
    assert grid[0] <= X_MAX, grid
    assert all(x <= YZ_MAX for x in grid[1:]), grid


def _routing_cfgs():
    out = [("interpreter", RC.config(k, True)) for k in RC.GPU]
    for fp32 in (False, True):
        for arch in (80, 90):
            out += [(f"{k}-fp32={fp32}-sm{arch}", RC.config(k, False, fp32, arch)) for k in RC.GPU]
    return out


def test_limits_match_cuda():
    assert RL.GRID_X_MAX == X_MAX and RL.GRID_YZ_MAX == YZ_MAX


@pytest.mark.parametrize("g", GROUPS, ids=[f"G{g}" for g in GROUPS])
def test_routing_grids_within_limits(g):
    n_q, n, d, e = 300, 70, RC.MAX_DIM, RC.MAX_DIM  # widest feature dims: the most chunks on dim 1
    for _, cfg in _routing_cfgs():
        grids = {
            "fwd": RL.fwd_grid(g, n_q, e, cfg) if cfg["BLOCK_E"] else None,
            "topk_fwd": RL.topk_fwd_grid(g, n_q, cfg),
            "dq": RL.dq_grid(g, n_q, d, cfg) if cfg["BLOCK_W"] else None,
            "dc": RL.dc_grid(g, n, d, e, cfg) if cfg["BLOCK_N"] and cfg["BLOCK_W"] else None,
            "topk_rows": RL.topk_rows_grid(g, n_q, cfg),
            "segment": RL.segment_grid(g * n, e, cfg) if cfg["BLOCK_W"] else None,
        }
        for grid in filter(None, grids.values()):
            _within_limits(grid)
        # every (group, block) pair gets exactly one program on dim 0 (the kernels split pid = g·blocks + block)
        if grids["fwd"]:
            assert grids["fwd"] == (g * triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(e, cfg["BLOCK_E"]))
        assert grids["topk_fwd"] == (g * triton.cdiv(n_q, cfg["BLOCK_M"]),)
        assert grids["topk_rows"] == (g * triton.cdiv(n_q, cfg["BLOCK_M"]),)
        if grids["dc"]:
            w = cfg["BLOCK_W"]
            assert grids["dc"] == (g * triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(d, w) + triton.cdiv(e, w))
        if grids["segment"]:
            assert grids["segment"][0] == g * n


def test_routing_grid_too_large_raises():
    cfg = RC.config("fwd", False, False, 90)
    blocks = triton.cdiv(10**6, cfg["BLOCK_M"])
    g_ok = X_MAX // blocks
    _within_limits(RL.fwd_grid(g_ok, 10**6, 64, cfg))
    with pytest.raises(ValueError, match=r"lda_route: the forward needs a launch grid .* beyond CUDA's limits"):
        RL.fwd_grid(g_ok + 1, 10**6, 64, cfg)
    with pytest.raises(ValueError, match="lda_route: the top-k backward needs a launch grid"):
        RL.segment_grid(X_MAX + 1, 64, RC.config("segment", False))


def test_stats_kernels_decline_beyond_their_grid_limit():
    """The statistics / KL kernels keep batch·heads on grid dim 1: beyond 65,535 a CUDA launch is declined with
    the reason (the torch backend serves it), at and below it is not; CPU (interpreter) launches never are."""
    from types import SimpleNamespace

    from rapkern.backends.triton_attention import stats as S

    def prob(b, h, dev="cuda"):
        return SimpleNamespace(device=torch.device(dev), batch=b, heads_q=h)

    assert S.GRID_YZ_MAX == YZ_MAX
    why = S._grid_reasons(prob(4097, 16))
    assert why and "4097 x 16 = 65552 exceeds" in why[0] and "65535" in why[0]
    assert S._grid_reasons(prob(4095, 16)) == [] and S._grid_reasons(prob(1, YZ_MAX)) == []
    assert S._grid_reasons(prob(4097, 16, "cpu")) == []


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _leaves(*shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).cuda().requires_grad_() for s in shapes]


def _route_all(backend, q, c, a, top_k, gout):
    import rapkern

    out = rapkern.lda_route(q, c, a, tau=0.5, top_k=top_k, backend=backend)
    return [out, *torch.autograd.grad(out, (q, c, a), gout)]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_gpu_routing_launch_beyond_65535_groups(top_k):
    """70,001 groups (above dim 1/2's 65,535) through the forward and backward kernels, against "torch"."""
    g, n_q, n, d, e = 70001, 3, 4, 16, 16
    q, c, a = _leaves((g, n_q, d), (g, n, d), (g, n, e), seed=1)
    gout = torch.randn(g, n_q, e, device="cuda")
    got = _route_all("triton_routing", q, c, a, top_k, gout)
    want = _route_all("torch", q, c, a, top_k, gout)
    for name, x, y in zip(["out", "dq", "dc", "da"], got, want):
        assert torch.isfinite(x).all(), name
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
