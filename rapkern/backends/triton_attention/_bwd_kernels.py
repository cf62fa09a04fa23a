"""Backward kernels (FlashAttention-2 recomputation from the LSE), deterministic, no atomics.

* ``_attn_bwd_dq_kernel``: one program per (query block, batch·query head), loops over key blocks. Owns
  dq, and the prior gradients that live on query rows: banded values (each (i, w + j - i) is written by
  exactly one key tile, so a plain store suffices), low-rank ``du = α·dS·v_f``, dense ``α·dS`` tiles,
  and a per-program partial of ``dα_h = Σ dS∘B``.
* ``_attn_bwd_dkdv_kernel``: one program per (key block, batch·kv head), loops over the query heads of
  its GQA group and over query blocks. Owns dk, dv, low-rank ``dv_f = α·dSᵀ·u`` (per query head) and the
  lag-table partials: the diagonal sums of each dS tile (a row-skewing ``tl.gather``) folded into a
  register vector over the 2W+1 clamped lags, written per (b, h, key block) and reduced on the host.

Every partial is reduced on the host with ``torch.sum`` over a fixed dim, so gradients are bitwise
reproducible.
"""

import triton
import triton.language as tl

from ._common import _dot, _dot_f32, _dropout_keep, _load_factor, _logits


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    DPR, dpr_r, DA, da_bh,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m, sdq_b, sdq_h, sdq_m, skpm_b,
    Hq, Lq, Lk, D, DV, GROUP, qk_scale, scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IEEE: tl.constexpr, NEED_DPRIOR: tl.constexpr, NEED_DALPHA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_ok = offs_m < Lq

    q = tl.load(Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
                + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * sdo_b + off_h.to(tl.int64) * sdo_h
                 + offs_m[:, None].to(tl.int64) * sdo_m + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(Lse + off_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # dead rows: p = 0
    delta = tl.load(Delta + off_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
    k_base = K + off_b.to(tl.int64) * sk_b + off_kh.to(tl.int64) * sk_h
    v_base = V + off_b.to(tl.int64) * sv_b + off_kh.to(tl.int64) * sv_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    dpr_base = off_bh.to(tl.int64) * Lq * dpr_r
    alpha = tl.load(Alpha + off_h)

    lo = 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
    if PRIOR == 2:
        if MASK_OUT:
            lo = tl.maximum(start_m * BLOCK_M - PW, 0) // BLOCK_N * BLOCK_N
            hi = tl.minimum(hi, (start_m + 1) * BLOCK_M + PW)

    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    da = tl.zeros((BLOCK_M,), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k_row = k_base + tl.cast(start_n, tl.int64) * sk_n
        kT = tl.load(k_row + (tl.arange(0, BLOCK_N)[None, :] * sk_n + offs_d[:, None]),
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        s, b = _logits(q, kT, qk_scale, alpha, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk, off_b, Kpm, skpm_b,
                       P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                       PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, NEED_DALPHA, False)
        p = tl.math.exp2(s - lse2[:, None])
        v_row = v_base + tl.cast(start_n, tl.int64) * sv_n
        vT = tl.load(v_row + (tl.arange(0, BLOCK_N)[None, :] * sv_n + offs_dv[:, None]),
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        dp = _dot(do, vT, IEEE)
        if DROPOUT:
            keep = _dropout_keep(seed, dropout_p, off_bh, offs_m, start_n, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
        if NEED_DALPHA:
            da += tl.sum(ds * b, 1)
        if NEED_DPRIOR:
            dsa = ds * alpha
            if PRIOR == 2:
                off = offs_n[None, :] - offs_m[:, None] + PW
                inside = m_ok[:, None] & n_ok[None, :] & (off >= 0) & (off <= 2 * PW)
                tl.store(DPR + dpr_base + offs_m[:, None].to(tl.int64) * dpr_r + off.to(tl.int64),
                         dsa, mask=inside)
            if PRIOR == 3:
                wf = _load_factor(P2_ptr, p2_base, offs_n, Lk, sp2_r, sp2_c, PW, R_PAD)
                du += _dot_f32(dsa, wf, IEEE)
            if PRIOR == 4:
                tl.store(DPR + dpr_base + offs_m[:, None].to(tl.int64) * dpr_r + offs_n[None, :].to(tl.int64),
                         dsa, mask=m_ok[:, None] & n_ok[None, :])

    dq = dq * scale
    tl.store(DQ + off_b.to(tl.int64) * sdq_b + off_h.to(tl.int64) * sdq_h
             + offs_m[:, None].to(tl.int64) * sdq_m + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))
    if NEED_DALPHA:
        tl.store(DA + off_bh.to(tl.int64) * da_bh + start_m, tl.sum(da, 0))
    if NEED_DPRIOR:
        if PRIOR == 3:
            offs_r = tl.arange(0, R_PAD)
            tl.store(DPR + dpr_base + offs_m[:, None].to(tl.int64) * dpr_r + offs_r[None, :], du,
                     mask=m_ok[:, None] & (offs_r[None, :] < PW))


@triton.jit
def _lag_tile_sums(dsa, start_m, start_n, PW, lag_acc,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAG_T: tl.constexpr, WIN_PAD: tl.constexpr):
    """lag_acc[W + clamp(i - j, -W, W)] += Σ dsa[i, j] over one tile, without scatter.

    Diagonal sums first: row r is read skewed (column r + BLOCK_N - 1 - t) so that column t of the
    gathered tile holds lag i0 - j0 - (BLOCK_N - 1) + t; a column sum gives all BLOCK_M + BLOCK_N - 1
    diagonals. They are then placed into the window vector (one more gather) and the clamped ends.
    """
    r = tl.arange(0, BLOCK_M)[:, None]
    t = tl.arange(0, LAG_T)[None, :]
    c = r + (BLOCK_N - 1) - t
    cvalid = (c >= 0) & (c < BLOCK_N)
    skew = tl.gather(dsa, tl.minimum(tl.maximum(c, 0), BLOCK_N - 1), 1)
    g = tl.sum(tl.where(cvalid, skew, 0.0), 0)  # (LAG_T,)
    lag0 = start_m - start_n - (BLOCK_N - 1)
    lag_t = lag0 + tl.arange(0, LAG_T)
    lo_sum = tl.sum(tl.where(lag_t <= -PW, g, 0.0), 0)
    hi_sum = tl.sum(tl.where((lag_t >= PW) & (lag_t > -PW), g, 0.0), 0)
    l = tl.arange(0, WIN_PAD)
    lag_l = l - PW
    tt = lag_l - lag0
    inner = (lag_l > -PW) & (lag_l < PW) & (tt >= 0) & (tt < LAG_T)
    gi = tl.gather(g, tl.minimum(tl.maximum(tt, 0), LAG_T - 1), 0)
    lag_acc += tl.where(inner, gi, 0.0)
    lag_acc += tl.where(l == 0, lo_sum, 0.0) + tl.where(l == 2 * PW, hi_sum, 0.0)
    return lag_acc


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV_, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    DPR, dpr_r, DL, dl_bh,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
    sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, skpm_b,
    Hq, Hkv, Lq, Lk, D, DV, GROUP, qk_scale, scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IEEE: tl.constexpr, NEED_DPRIOR: tl.constexpr, WIN_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAG_T: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    start_n = tl.program_id(0)
    off_bkh = tl.program_id(1)
    off_b = off_bkh // Hkv
    off_kh = off_bkh % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    n_ok = offs_n < Lk

    k = tl.load(K + off_b.to(tl.int64) * sk_b + off_kh.to(tl.int64) * sk_h
                + offs_n[:, None].to(tl.int64) * sk_n + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + off_b.to(tl.int64) * sv_b + off_kh.to(tl.int64) * sv_h
                + offs_n[:, None].to(tl.int64) * sv_n + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)

    q_lo = 0
    q_hi = Lq
    if CAUSAL:
        q_lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    if PRIOR == 2:
        if MASK_OUT:
            q_lo = tl.maximum(q_lo, tl.maximum(start_n * BLOCK_N - PW, 0) // BLOCK_M * BLOCK_M)
            q_hi = tl.minimum(q_hi, (start_n + 1) * BLOCK_N + PW)

    # Key-major ("transposed") tiles throughout, as in the Triton tutorial's dk/dv loop: k and v are the
    # A operands (each warp holds only its own key rows), q and dO stream through as B operands.
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, DV_PAD), dtype=tl.float32)
    for g in range(0, GROUP):
        off_h = off_kh * GROUP + g
        off_bh = off_b * Hq + off_h
        alpha = tl.load(Alpha + off_h)
        p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
        p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
        q_base = Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
        do_base = DO + off_b.to(tl.int64) * sdo_b + off_h.to(tl.int64) * sdo_h
        lag_acc = tl.zeros((WIN_PAD,), dtype=tl.float32)
        dvf = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            q_row = q_base + tl.cast(start_m, tl.int64) * sq_m
            qT = tl.load(q_row + (tl.arange(0, BLOCK_M)[None, :] * sq_m + offs_d[:, None]),
                         mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)
            do_row = do_base + tl.cast(start_m, tl.int64) * sdo_m
            do = tl.load(do_row + (tl.arange(0, BLOCK_M)[:, None] * sdo_m + offs_dv[None, :]),
                         mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            lse = tl.load(Lse + off_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
            delta = tl.load(Delta + off_bh.to(tl.int64) * Lq + offs_m, mask=m_ok, other=0.0)
            sT, bT = _logits(k, qT, qk_scale, alpha, offs_m[None, :], offs_n[:, None], offs_m, offs_n, Lq, Lk,
                             off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                             PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_N, BLOCK_M, False, True)
            pT = tl.math.exp2(sT - lse2[None, :])
            dpT = _dot(v, tl.trans(do), IEEE)
            if DROPOUT:
                keepT = tl.trans(_dropout_keep(seed, dropout_p, off_bh, offs_m, start_n * BLOCK_N, BLOCK_M, BLOCK_N))
                pdT = tl.where(keepT, pT / (1.0 - dropout_p), 0.0)
                dpT = tl.where(keepT, dpT / (1.0 - dropout_p), 0.0)
            else:
                pdT = pT
            dv += _dot(pdT.to(do.dtype), do, IEEE)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
            if NEED_DPRIOR:
                dsaT = dsT * alpha
                if PRIOR == 1:
                    lag_acc = _lag_tile_sums(tl.trans(dsaT), start_m, start_n * BLOCK_N, PW, lag_acc,
                                             BLOCK_M, BLOCK_N, LAG_T, WIN_PAD)
                if PRIOR == 3:
                    u = _load_factor(P_ptr, p_base, offs_m, Lq, sp_r, sp_c, PW, R_PAD)
                    dvf += _dot_f32(dsaT, u, IEEE)
        if NEED_DPRIOR:
            if PRIOR == 1:
                l = tl.arange(0, WIN_PAD)
                tl.store(DL + off_bh.to(tl.int64) * dl_bh + start_n * (2 * PW + 1) + l, lag_acc,
                         mask=l < 2 * PW + 1)
            if PRIOR == 3:
                offs_r = tl.arange(0, R_PAD)
                tl.store(DPR + off_bh.to(tl.int64) * Lk * dpr_r + offs_n[:, None].to(tl.int64) * dpr_r
                         + offs_r[None, :], dvf, mask=n_ok[:, None] & (offs_r[None, :] < PW))

    dk = dk * scale
    tl.store(DK + off_b.to(tl.int64) * sdk_b + off_kh.to(tl.int64) * sdk_h
             + offs_n[:, None].to(tl.int64) * sdk_n + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + off_b.to(tl.int64) * sdv_b + off_kh.to(tl.int64) * sdv_h
             + offs_n[:, None].to(tl.int64) * sdv_n + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))
