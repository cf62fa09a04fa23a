"""Forward routing kernels: dense (online softmax) and top-k (running selection, then a gathered sum).

Scores in the log2 domain: ``z = (q·c)·rq_i·rc_j·log2(e)/τ`` with ``rq``/``rc`` the inverse row norms
(1 without normalize); the query norm is computed here, the centroid norms once per call by the launcher.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import INT64_MAX, INT64_MIN, NORM_EPS, _col_scale, _dot, _key_score, _raw_scores, _score_key


@triton.jit
def _row_scale(Q, q_base, offs_m, N, D, sq_n, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """1/max(|q_i|, eps) (or 1) for the rows of a query block, fp32."""
    if NORMALIZE:
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            qt = tl.load(Q + q_base + offs_m[:, None].to(tl.int64) * sq_n + dd[None, :],
                         mask=(offs_m[:, None] < N) & (dd[None, :] < D), other=0.0).to(tl.float32)
            ss += tl.sum(qt * qt, 1)
        return 1.0 / tl.maximum(tl.sqrt(ss), NORM_EPS)
    else:
        return tl.full((BLOCK_M,), 1.0, dtype=tl.float32)


@triton.jit
def _route_fwd_kernel(
    Q, C, A, RC, Mask, Out, Lse, RQ,
    N, NC, D, E,
    sq_g, sq_n, sc_g, sc_n, sa_g, sa_n, so_g, so_n, sm_g,
    qk_scale,
    NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid (G · query blocks, e chunks): dim 0 folds the group and the query block (block fastest), so
    only the small e-chunk count sits on dim 1 (CUDA's limit there is 65,535). Writes out, and from the
    first e chunk lse (log2) and rq."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(N, BLOCK_M)
    g32 = pid // n_mb  # one division; pid - g·n instead of pid % n keeps the top-k forward spill-free
    pid_m = pid - g32 * n_mb
    g = g32.to(tl.int64)
    pid_e = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    q_base, c_base, a_base = g * sq_g, g * sc_g, g * sa_g
    rq = _row_scale(Q, q_base, offs_m, N, D, sq_n, NORMALIZE, BLOCK_M, BLOCK_D)
    rs = rq * qk_scale
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
    for n0 in range(0, NC, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = _raw_scores(Q, C, q_base, c_base, offs_m, offs_n, N, NC, D, sq_n, sc_n, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
        rc, valid = _col_scale(RC, Mask, g * NC, g * sm_g, offs_n, NC, NORMALIZE, HAS_MASK)
        z = tl.where(valid[None, :], x * rs[:, None] * rc[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid cluster: exp2 stays finite
        p = tl.math.exp2(z - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        at = tl.load(A + a_base + offs_n[:, None].to(tl.int64) * sa_n + offs_e[None, :],
                     mask=(offs_n[:, None] < NC) & (offs_e[None, :] < E), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(at.dtype), at, IEEE)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    row_ok = offs_m < N
    tl.store(Out + g * so_g + offs_m[:, None].to(tl.int64) * so_n + offs_e[None, :],
             (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))
    if pid_e == 0:
        tl.store(Lse + g * N + offs_m, m_i + tl.math.log2(l_safe), mask=row_ok)
        tl.store(RQ + g * N + offs_m, rq, mask=row_ok)


@triton.jit
def _route_topk_fwd_kernel(
    Q, C, A, RC, Mask, Out, W, Idx, RQ,
    N, NC, D, E,
    sq_g, sq_n, sc_g, sc_n, sa_g, sa_n, so_g, so_n, sm_g,
    qk_scale,
    K: tl.constexpr, K_PAD: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid (G · query blocks,), block fastest. A running set of the K largest keys per row (unsorted; its
    minimum is the admission threshold), then the K winners in (score desc, index asc) order, their softmax
    and ``Σ_t w_t a[idx_t]`` over e in chunks. Writes out, weights (G, N, K) fp32, indices (G, N, K) int64."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(N, BLOCK_M)
    g32 = pid // n_mb  # one division; pid - g·n instead of pid % n keeps the top-k forward spill-free
    pid_m = pid - g32 * n_mb
    g = g32.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, K_PAD)
    q_base, c_base, a_base = g * sq_g, g * sc_g, g * sa_g
    rq = _row_scale(Q, q_base, offs_m, N, D, sq_n, NORMALIZE, BLOCK_M, BLOCK_D)
    rs = rq * qk_scale
    # empty slots hold distinct keys below every real key; padding slots distinct keys above all
    empty = tl.where(slot < K, slot.to(tl.int64) + INT64_MIN, -slot.to(tl.int64) + INT64_MAX)
    best = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int64) + empty[None, :]
    kth = tl.min(best, 1)
    for n0 in range(0, NC, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        x = _raw_scores(Q, C, q_base, c_base, offs_m, offs_n, N, NC, D, sq_n, sc_n, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
        rc, valid = _col_scale(RC, Mask, g * NC, g * sm_g, offs_n, NC, NORMALIZE, HAS_MASK)
        z = tl.where(valid[None, :], x * rs[:, None] * rc[None, :], float("-inf"))
        key = tl.where((offs_n < NC)[None, :], _score_key(z, offs_n), INT64_MIN)
        cand = tl.where(key > kth[:, None], key, INT64_MIN)
        n_new = tl.minimum(tl.max(tl.sum((cand > INT64_MIN).to(tl.int32), 1), 0), K)
        for _ in range(0, n_new):  # insert this tile's best candidate of each row over the current minimum
            c_max = tl.max(cand, 1)
            ins = c_max > kth
            best = tl.where((best == kth[:, None]) & ins[:, None], c_max[:, None], best)
            cand = tl.where(cand == c_max[:, None], INT64_MIN, cand)
            kth = tl.min(best, 1)
    # winners in descending key order
    rest = tl.where(slot[None, :] < K, best, INT64_MIN)
    zs = tl.zeros((BLOCK_M, K_PAD), dtype=tl.float32)
    ids = tl.zeros((BLOCK_M, K_PAD), dtype=tl.int32)
    for t in range(0, K):
        top = tl.max(rest, 1)
        rest = tl.where(rest == top[:, None], INT64_MIN, rest)
        zt, it = _key_score(top)
        zs = tl.where(slot[None, :] == t, zt[:, None], zs)
        ids = tl.where(slot[None, :] == t, it[:, None], ids)
    zs = tl.where(slot[None, :] < K, zs, float("-inf"))
    m = tl.max(zs, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.math.exp2(zs - m[:, None])
    w = p / tl.sum(p, 1)[:, None]
    row_ok = offs_m < N
    kmask = row_ok[:, None] & (slot[None, :] < K)
    rk = (g * N + offs_m)[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(W + rk, w, mask=kmask)
    tl.store(Idx + rk, ids.to(tl.int64), mask=kmask)
    tl.store(RQ + g * N + offs_m, rq, mask=row_ok)
    offs_e0 = tl.arange(0, BLOCK_E)
    for e0 in range(0, E, BLOCK_E):
        offs_e = e0 + offs_e0
        acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
        for t in range(0, K):
            wt = tl.sum(tl.where(slot[None, :] == t, w, 0.0), 1)
            it = tl.sum(tl.where(slot[None, :] == t, ids, 0), 1)
            at = tl.load(A + a_base + it[:, None].to(tl.int64) * sa_n + offs_e[None, :],
                         mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            acc += wt[:, None] * at.to(tl.float32)
        tl.store(Out + g * so_g + offs_m[:, None].to(tl.int64) * so_n + offs_e[None, :],
                 acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_e[None, :] < E))
