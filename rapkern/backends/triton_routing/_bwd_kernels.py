"""Backward routing kernels. Each program owns its outputs and sums in a fixed order: no atomics.

With ``p = exp2(z - lse)``, ``dS = p·(dout·a_j - delta_i)`` (delta = dout·out) is the gradient of the natural
score ``s = x·rq·rc/τ`` (x = q·c raw), and ``dX = dS·rq·rc/τ`` that of x. The kernels write
``U = dX·C`` (N, d), ``V = dXᵀ·Q`` (n, d) and ``dA = Pᵀ·dout`` (n, e) in fp32; the launcher applies the
normalization Jacobians (``dq = U - (q̂·U) q̂ /|q|``-style, see function.py) and the temperature gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import _col_scale, _dot, _raw_scores


@triton.jit
def _dp_tile(DO, A, do_base, a_base, offs_m, offs_n, N, NC, E, sdo_n, sa_n,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr):
    """``dout_i · a_j`` on a (BLOCK_M, BLOCK_N) tile, e in chunks, fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_e = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        ee = e0 + offs_e
        dot_ = tl.load(DO + do_base + offs_m[:, None].to(tl.int64) * sdo_n + ee[None, :],
                       mask=(offs_m[:, None] < N) & (ee[None, :] < E), other=0.0)
        at = tl.load(A + a_base + offs_n[:, None].to(tl.int64) * sa_n + ee[None, :],
                     mask=(offs_n[:, None] < NC) & (ee[None, :] < E), other=0.0)
        acc += _dot(dot_, tl.trans(at.to(dot_.dtype)), IEEE)
    return acc


@triton.jit
def _dx_tile(Q, C, A, DO, RC, Mask, Lse, RQ, Delta, g, offs_m, offs_n,
             N, NC, D, E, sq_g, sq_n, sc_g, sc_n, sa_g, sa_n, sdo_g, sdo_n, sm_g, qk_scale, inv_tau,
             NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """(p, dX) of a tile: probabilities and the gradient w.r.t. the raw dot products (0 outside)."""
    row_ok = offs_m < N
    x = _raw_scores(Q, C, g * sq_g, g * sc_g, offs_m, offs_n, N, NC, D, sq_n, sc_n, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
    rc, valid = _col_scale(RC, Mask, g * NC, g * sm_g, offs_n, NC, NORMALIZE, HAS_MASK)
    rq = tl.load(RQ + g * N + offs_m, mask=row_ok, other=0.0)
    lse = tl.load(Lse + g * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + g * N + offs_m, mask=row_ok, other=0.0)
    z = x * (rq * qk_scale)[:, None] * rc[None, :]
    ok = row_ok[:, None] & valid[None, :]
    p = tl.where(ok, tl.math.exp2(z - lse[:, None]), 0.0)
    dp = _dp_tile(DO, A, g * sdo_g, g * sa_g, offs_m, offs_n, N, NC, E, sdo_n, sa_n, BLOCK_M, BLOCK_N, BLOCK_E, IEEE)
    dx = p * (dp - delta[:, None]) * (rq * inv_tau)[:, None] * rc[None, :]
    return p, dx


@triton.jit
def _route_bwd_dq_kernel(
    Q, C, A, DO, RC, Mask, Lse, RQ, Delta, U,
    N, NC, D, E,
    sq_g, sq_n, sc_g, sc_n, sa_g, sa_n, sdo_g, sdo_n, sm_g,
    qk_scale, inv_tau,
    NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid (G · query blocks, d chunks of BLOCK_W), block fastest on dim 0:
    ``U[i, chunk] = Σ_j dX_ij c_j[chunk]`` (fp32)."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(N, BLOCK_M)
    g32 = pid // n_mb  # one division; pid - g·n instead of pid % n keeps the top-k forward spill-free
    pid_m = pid - g32 * n_mb
    g = g32.to(tl.int64)
    pid_w = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for n0 in range(0, NC, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        _, dx = _dx_tile(Q, C, A, DO, RC, Mask, Lse, RQ, Delta, g, offs_m, offs_n, N, NC, D, E, sq_g, sq_n, sc_g,
                         sc_n, sa_g, sa_n, sdo_g, sdo_n, sm_g, qk_scale, inv_tau, NORMALIZE, HAS_MASK, IEEE,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E)
        ct = tl.load(C + g * sc_g + offs_n[:, None].to(tl.int64) * sc_n + offs_w[None, :],
                     mask=(offs_n[:, None] < NC) & (offs_w[None, :] < D), other=0.0)
        acc += _dot(dx.to(ct.dtype), ct, IEEE)
    tl.store(U + (g * N + offs_m)[:, None].to(tl.int64) * D + offs_w[None, :], acc,
             mask=(offs_m[:, None] < N) & (offs_w[None, :] < D))


@triton.jit
def _route_bwd_dc_kernel(
    Q, C, A, DO, RC, Mask, Lse, RQ, Delta, V, DA,
    N, NC, D, E,
    sq_g, sq_n, sc_g, sc_n, sa_g, sa_n, sdo_g, sdo_n, sm_g,
    qk_scale, inv_tau, N_DCHUNK,
    NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Grid (G · cluster blocks, N_DCHUNK d chunks + e chunks), block fastest on dim 0: chunk w < N_DCHUNK
    writes ``V[j, chunk] = Σ_i dX_ij q_i[chunk]``, the others ``dA[j, chunk] = Σ_i p_ij dout_i[chunk]``
    (fp32), walking the query blocks in order."""
    pid = tl.program_id(0)
    n_nb = tl.cdiv(NC, BLOCK_N)
    g32 = pid // n_nb  # one division; pid - g·n instead of pid % n keeps the top-k forward spill-free
    pid_n = pid - g32 * n_nb
    g = g32.to(tl.int64)
    pid_w = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    is_v = pid_w < N_DCHUNK
    w0 = tl.where(is_v, pid_w, pid_w - N_DCHUNK) * BLOCK_W
    offs_w = w0 + tl.arange(0, BLOCK_W)
    width = tl.where(is_v, D, E)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        p, dx = _dx_tile(Q, C, A, DO, RC, Mask, Lse, RQ, Delta, g, offs_m, offs_n, N, NC, D, E, sq_g, sq_n, sc_g,
                         sc_n, sa_g, sa_n, sdo_g, sdo_n, sm_g, qk_scale, inv_tau, NORMALIZE, HAS_MASK, IEEE,
                         BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E)
        if is_v:
            src = tl.load(Q + g * sq_g + offs_m[:, None].to(tl.int64) * sq_n + offs_w[None, :],
                          mask=(offs_m[:, None] < N) & (offs_w[None, :] < D), other=0.0)
            acc += _dot(tl.trans(dx).to(src.dtype), src, IEEE)
        else:
            src = tl.load(DO + g * sdo_g + offs_m[:, None].to(tl.int64) * sdo_n + offs_w[None, :],
                          mask=(offs_m[:, None] < N) & (offs_w[None, :] < E), other=0.0)
            acc += _dot(tl.trans(p).to(src.dtype), src, IEEE)
    ptrs = (g * NC + offs_n)[:, None].to(tl.int64) * width + offs_w[None, :]
    ok = (offs_n[:, None] < NC) & (offs_w[None, :] < width)
    if is_v:
        tl.store(V + ptrs, acc, mask=ok)
    else:
        tl.store(DA + ptrs, acc, mask=ok)


@triton.jit
def _route_topk_bwd_rows_kernel(
    C, A, DO, RC, W, Idx, RQ, U, DX,
    N, NC, D, E,
    sc_g, sc_n, sa_g, sa_n, sdo_g, sdo_n,
    inv_tau,
    K: tl.constexpr, K_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Grid (G · query blocks,), block fastest, through the K selected entries of each row: ``dw_t = dout·a[idx_t]``,
    ``dS_t = w_t (dw_t - Σ w dw)``, ``dX_t = dS_t rq rc[idx_t]/τ`` (written, for the cluster side) and
    ``U_i = Σ_t dX_t c[idx_t]`` (fp32)."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(N, BLOCK_M)
    g32 = pid // n_mb  # one division; pid - g·n instead of pid % n keeps the top-k forward spill-free
    pid_m = pid - g32 * n_mb
    g = g32.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    slot = tl.arange(0, K_PAD)
    kmask = row_ok[:, None] & (slot[None, :] < K)
    rk = (g * N + offs_m)[:, None].to(tl.int64) * K + slot[None, :]
    w = tl.load(W + rk, mask=kmask, other=0.0)
    ids = tl.load(Idx + rk, mask=kmask, other=0)
    offs_w0 = tl.arange(0, BLOCK_W)
    dw = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_W):
        ee = e0 + offs_w0
        dot_ = tl.load(DO + g * sdo_g + offs_m[:, None].to(tl.int64) * sdo_n + ee[None, :],
                       mask=row_ok[:, None] & (ee[None, :] < E), other=0.0).to(tl.float32)
        for t in range(0, K):
            it = tl.sum(tl.where(slot[None, :] == t, ids, 0), 1)
            at = tl.load(A + g * sa_g + it[:, None] * sa_n + ee[None, :], mask=row_ok[:, None] & (ee[None, :] < E),
                         other=0.0).to(tl.float32)
            dw += tl.where(slot[None, :] == t, tl.sum(dot_ * at, 1)[:, None], 0.0)
    ds = w * (dw - tl.sum(w * dw, 1)[:, None])
    rq = tl.load(RQ + g * N + offs_m, mask=row_ok, other=0.0)
    if NORMALIZE:
        rc = tl.load(RC + g * NC + ids, mask=kmask, other=0.0)
    else:
        rc = tl.where(kmask, 1.0, 0.0)
    dx = ds * (rq * inv_tau)[:, None] * rc
    tl.store(DX + rk, dx, mask=kmask)
    for d0 in range(0, D, BLOCK_W):
        dd = d0 + offs_w0
        acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
        for t in range(0, K):
            it = tl.sum(tl.where(slot[None, :] == t, ids, 0), 1)
            xt = tl.sum(tl.where(slot[None, :] == t, dx, 0.0), 1)
            ct = tl.load(C + g * sc_g + it[:, None] * sc_n + dd[None, :], mask=row_ok[:, None] & (dd[None, :] < D),
                         other=0.0).to(tl.float32)
            acc += xt[:, None] * ct
        tl.store(U + (g * N + offs_m)[:, None].to(tl.int64) * D + dd[None, :], acc,
                 mask=row_ok[:, None] & (dd[None, :] < D))


@triton.jit
def _segment_sum_kernel(
    Src, Rows, Wt, Offs, Dst,
    WIDTH, s_src,
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Grid (segments, width chunks): ``Dst[s] = Σ_{r in segment s} Wt[r] · Src[Rows[r]]`` in segment order
    (the entries sorted by target on the host): the deterministic replacement of a scatter-add."""
    seg = tl.program_id(0).to(tl.int64)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    start = tl.load(Offs + seg)
    end = tl.load(Offs + seg + 1)
    acc = tl.zeros((BLOCK_W,), dtype=tl.float32)
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        tt = t0 + offs_t
        ok = tt < end
        rows = tl.load(Rows + tt, mask=ok, other=0)
        wt = tl.load(Wt + tt, mask=ok, other=0.0)
        x = tl.load(Src + rows[:, None] * s_src + offs_w[None, :], mask=ok[:, None] & (offs_w[None, :] < WIDTH),
                    other=0.0).to(tl.float32)
        acc += tl.sum(wt[:, None] * x, 0)
    tl.store(Dst + seg * WIDTH + offs_w, acc, mask=offs_w < WIDTH)
