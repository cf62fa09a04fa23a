"""Launchers: allocate outputs, compute grids, launch. No validation (rapkern.validate and the backend's
reasons do that). Inputs are (G, ·, ·) with unit last stride; group strides may be 0 (a shared table)."""

from __future__ import annotations

import os

import torch
import triton

from . import configs as C
from ._bwd_kernels import (
    _route_bwd_dc_kernel,
    _route_bwd_dq_kernel,
    _route_topk_bwd_rows_kernel,
    _segment_sum_kernel,
)
from ._fwd_kernels import _route_fwd_kernel, _route_topk_fwd_kernel

LOG2E = 1.4426950408889634
_NORM_EPS = 1e-8
GRID_X_MAX = 2**31 - 1  # CUDA's limit on grid dim 0; dims 1 and 2 stop at GRID_YZ_MAX
GRID_YZ_MAX = 65535


# ---------------------------------------------------------------------------------------------- grids
# Large counts (groups x row blocks, segments) go on dim 0, folded with the block index fastest; dim 1
# holds only d/e chunk counts (<= MAX_DIM / 16). Each launcher's grid is one function so tests can check
# the limits for any size without launching.


def _checked(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    if grid[0] > GRID_X_MAX or any(x > GRID_YZ_MAX for x in grid[1:]):
        raise ValueError(f"lda_route: {what} needs a launch grid {grid}, beyond CUDA's limits "
                         f"({GRID_X_MAX}, {GRID_YZ_MAX}, {GRID_YZ_MAX}); split the call into smaller batches")
    return grid


def fwd_grid(g: int, n_q: int, e: int, cfg: dict) -> tuple[int, int]:
    """Dense forward: (G · query blocks, e chunks)."""
    return _checked((g * triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(e, cfg["BLOCK_E"])), "the forward")


def topk_fwd_grid(g: int, n_q: int, cfg: dict) -> tuple[int]:
    """Top-k forward: (G · query blocks,)."""
    return _checked((g * triton.cdiv(n_q, cfg["BLOCK_M"]),), "the top-k forward")


def dq_grid(g: int, n_q: int, d: int, cfg: dict) -> tuple[int, int]:
    """Dense backward, query side: (G · query blocks, d chunks)."""
    return _checked((g * triton.cdiv(n_q, cfg["BLOCK_M"]), triton.cdiv(d, cfg["BLOCK_W"])), "the backward")


def dc_grid(g: int, n: int, d: int, e: int, cfg: dict) -> tuple[int, int]:
    """Dense backward, cluster side: (G · cluster blocks, d chunks + e chunks)."""
    chunks = triton.cdiv(d, cfg["BLOCK_W"]) + triton.cdiv(e, cfg["BLOCK_W"])
    return _checked((g * triton.cdiv(n, cfg["BLOCK_N"]), chunks), "the backward")


def topk_rows_grid(g: int, n_q: int, cfg: dict) -> tuple[int]:
    """Top-k backward, row side: (G · query blocks,)."""
    return _checked((g * triton.cdiv(n_q, cfg["BLOCK_M"]),), "the top-k backward")


def segment_grid(n_seg: int, width: int, cfg: dict) -> tuple[int, int]:
    """Segmented sums: (segments = G · clusters, width chunks)."""
    return _checked((n_seg, triton.cdiv(width, cfg["BLOCK_W"])), "the top-k backward")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(kernel: str, dtype=None) -> dict:
    if interpreting():
        return C.config(kernel, True)
    major, minor = torch.cuda.get_device_capability()
    return C.config(kernel, False, dtype == torch.float32, major * 10 + minor)


def _launch_kw(cfg: dict, *names) -> dict:
    kw = {n: cfg[n] for n in names}
    if not interpreting():
        kw.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return kw


def col_scale(c: torch.Tensor, normalize: bool) -> torch.Tensor:
    """1/max(|c_j|, eps) per centroid (G, n) fp32, once per call (a placeholder without normalize)."""
    if not normalize:
        return torch.empty(1, dtype=torch.float32, device=c.device)
    return c.float().norm(dim=-1).clamp_min(_NORM_EPS).reciprocal().contiguous()


def _mask_arg(mask, q):
    if mask is None:
        return torch.empty(1, dtype=torch.uint8, device=q.device), 0
    return mask.to(torch.uint8).contiguous(), mask.shape[-1]


def _common(q, c, a, rc, mask, tau, normalize):
    g, n_q, d = q.shape
    n, e = c.shape[1], a.shape[-1]
    m, sm_g = _mask_arg(mask, q)
    args = dict(N=n_q, NC=n, D=d, E=e, sq_g=q.stride(0), sq_n=q.stride(1), sc_g=c.stride(0), sc_n=c.stride(1),
                sa_g=a.stride(0), sa_n=a.stride(1))
    flags = dict(NORMALIZE=normalize, HAS_MASK=mask is not None, IEEE=q.dtype == torch.float32)
    return g, n_q, d, n, e, m, sm_g, args, flags


def route_fwd(q, c, a, rc, mask, tau: float, normalize: bool):
    """Dense: (out (G, N, e) in q's dtype, lse (G, N) fp32 in log2 units, rq (G, N) fp32)."""
    g, n_q, d, n, e, m, sm_g, args, flags = _common(q, c, a, rc, mask, tau, normalize)
    out = torch.empty(g, n_q, e, dtype=q.dtype, device=q.device)
    lse = torch.empty(g, n_q, dtype=torch.float32, device=q.device)
    rq = torch.empty(g, n_q, dtype=torch.float32, device=q.device)
    cfg = _cfg("fwd", q.dtype)
    _route_fwd_kernel[fwd_grid(g, n_q, e, cfg)](
        q, c, a, rc, m, out, lse, rq, args["N"], args["NC"], args["D"], args["E"], args["sq_g"], args["sq_n"],
        args["sc_g"], args["sc_n"], args["sa_g"], args["sa_n"], out.stride(0), out.stride(1), sm_g, LOG2E / tau,
        **flags, **_launch_kw(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E"),
    )
    return out, lse, rq


def route_topk_fwd(q, c, a, rc, mask, tau: float, normalize: bool, k: int):
    """Top-k: (out, weights (G, N, k) fp32, indices (G, N, k) int64, rq (G, N) fp32)."""
    g, n_q, d, n, e, m, sm_g, args, flags = _common(q, c, a, rc, mask, tau, normalize)
    out = torch.empty(g, n_q, e, dtype=q.dtype, device=q.device)
    w = torch.empty(g, n_q, k, dtype=torch.float32, device=q.device)
    idx = torch.empty(g, n_q, k, dtype=torch.int64, device=q.device)
    rq = torch.empty(g, n_q, dtype=torch.float32, device=q.device)
    cfg = _cfg("topk_fwd", q.dtype)
    _route_topk_fwd_kernel[topk_fwd_grid(g, n_q, cfg)](
        q, c, a, rc, m, out, w, idx, rq, args["N"], args["NC"], args["D"], args["E"], args["sq_g"], args["sq_n"],
        args["sc_g"], args["sc_n"], args["sa_g"], args["sa_n"], out.stride(0), out.stride(1), sm_g, LOG2E / tau,
        K=k, K_PAD=C.k_pad(k), **flags, **_launch_kw(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E"),
    )
    return out, w, idx, rq


def route_bwd(q, c, a, rc, mask, tau, normalize, out, lse, rq, dout):
    """Dense backward: (U (G, N, d), V (G, n, d), dA (G, n, e)), fp32 (see _bwd_kernels)."""
    g, n_q, d, n, e, m, sm_g, args, flags = _common(q, c, a, rc, mask, tau, normalize)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    u = torch.empty(g, n_q, d, dtype=torch.float32, device=q.device)
    v = torch.empty(g, n, d, dtype=torch.float32, device=q.device)
    da = torch.empty(g, n, e, dtype=torch.float32, device=q.device)
    common = (args["N"], args["NC"], args["D"], args["E"], args["sq_g"], args["sq_n"], args["sc_g"], args["sc_n"],
              args["sa_g"], args["sa_n"], dout.stride(0), dout.stride(1), sm_g, LOG2E / tau, 1.0 / tau)
    cfg = _cfg("dq", q.dtype)
    blocks = _launch_kw(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E", "BLOCK_W")
    _route_bwd_dq_kernel[dq_grid(g, n_q, d, cfg)](q, c, a, dout, rc, m, lse, rq, delta, u, *common, **flags, **blocks)
    cfg = _cfg("dc", q.dtype)
    n_dchunk = triton.cdiv(d, cfg["BLOCK_W"])
    blocks = _launch_kw(cfg, "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E", "BLOCK_W")
    _route_bwd_dc_kernel[dc_grid(g, n, d, e, cfg)](q, c, a, dout, rc, m, lse, rq, delta, v, da, *common, n_dchunk,
                                                   **flags, **blocks)
    return u, v, da


def segment_sum(src, rows, wt, offsets, n_seg: int):
    """``out[s] = Σ_{r in segment s} wt[r]·src[rows[r]]`` (fp32), segments given by ``offsets``."""
    width = src.shape[-1]
    out = torch.empty(n_seg, width, dtype=torch.float32, device=src.device)
    cfg = _cfg("segment", src.dtype)
    grid = segment_grid(n_seg, width, cfg)
    kw = {"BLOCK_T": cfg["BLOCK_M"], "BLOCK_W": cfg["BLOCK_W"]}
    if not interpreting():
        kw.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _segment_sum_kernel[grid](src, rows, wt, offsets, out, width, src.stride(0), **kw)
    return out


def route_topk_bwd(q, c, a, rc, normalize, tau, w, idx, rq, dout):
    """Top-k backward through the selected entries: (U, V, dA) fp32. The cluster side gathers each
    cluster's entries after a stable sort by cluster (fixed order): no atomics."""
    g, n_q, d = q.shape
    n, e, k = c.shape[1], a.shape[-1], idx.shape[-1]
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    u = torch.empty(g, n_q, d, dtype=torch.float32, device=q.device)
    dx = torch.empty(g, n_q, k, dtype=torch.float32, device=q.device)
    cfg = _cfg("topk_rows", q.dtype)
    grid = topk_rows_grid(g, n_q, cfg)
    kw = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_W": cfg["BLOCK_W"]}
    if not interpreting():
        kw.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _route_topk_bwd_rows_kernel[grid](c, a, dout, rc, w, idx, rq, u, dx, n_q, n, d, e, c.stride(0), c.stride(1),
                                      a.stride(0), a.stride(1), dout.stride(0), dout.stride(1), 1.0 / tau,
                                      K=k, K_PAD=C.k_pad(k), NORMALIZE=normalize, **kw)
    target = (idx + torch.arange(g, device=idx.device).view(-1, 1, 1) * n).reshape(-1)
    target, order = torch.sort(target, stable=True)
    rows = (order // k).contiguous()  # global query row g·N + i of each sorted entry
    offsets = torch.zeros(g * n + 1, dtype=torch.int64, device=q.device)
    offsets[1:] = torch.cumsum(torch.bincount(target, minlength=g * n), 0)
    da = segment_sum(dout.reshape(g * n_q, e), rows, w.reshape(-1)[order].contiguous(), offsets, g * n)
    v = segment_sum(q.reshape(g * n_q, d), rows, dx.reshape(-1)[order].contiguous(), offsets, g * n)
    return u, v.view(g, n, d), da.view(g, n, e)
