"""Backward, dk/dv kernel (FlashAttention-2 recomputation from the LSE), deterministic, no atomics.

``_attn_bwd_dkdv_kernel``: one program per (key block, batch·kv head), loops over the query heads of its
GQA group and over query blocks, with key-major tiles (k, v are the resident MMA A operands, as in the
Triton tutorial). Owns dk, dv, low-rank ``dv_f = α·dSᵀ·u`` (per query head) and the lag-table partials:
with square tiles, each tile whose block diagonal can meet the window stores its diagonal sums
(``_lag_diag.py``, a row-skewing ``tl.gather``) in a slot indexed by (key block, block diagonal); tiles
entirely beyond ±W only add their total to one of two end scalars. launch._reduce_lag decodes the slots.
Every partial is reduced on the host with dense torch ops over fixed dims (bitwise reproducible).

One kernel per module: the config tables' fingerprint of the dk/dv keys (configs.KERNEL_FILES) covers this
file and what it imports, so editing the dq kernel leaves the dk/dv keys verified.
"""

import triton
import triton.language as tl

from ._common import _dot, _dot_f32, _dropout_uniform, _load_factor, _logits
from ._lag_diag import _lag_diag_sums


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV_, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    DPR, dpr_r, DL, dl_bh, LAG_K,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_m,
    sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n, skpm_b,
    Hq, Hkv, Lq, Lk, D, DV, GROUP, qk_scale, scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IEEE: tl.constexpr, NEED_DPRIOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAG_T: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    n_nb = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)  # launch.dkdv_grid: (b·Hkv + kv head) · n_nb + key block
    off_bkh = pid // n_nb
    start_n = pid % n_nb
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
        lag_ends = tl.zeros((2,), dtype=tl.float32)  # mass of tiles entirely at lag <= -W / >= W
        dl_base = DL + off_bh.to(tl.int64) * dl_bh + start_n * (2 * LAG_K - 1) * LAG_T
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
            # low-rank: the prior tile is computed for every head (alpha = 0 included, a product of finite
            # factors times 0) rather than behind a branch on alpha, measured: the branch's two paths cost the
            # registers that keep (32, 64) spill-free at head dims 64/128
            sT, bT = _logits(k, qT, qk_scale, alpha, offs_m[None, :], offs_n[:, None], offs_m, offs_n, Lq, Lk,
                             off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                             PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_N, BLOCK_M, PRIOR == 3, True)
            pT = tl.math.exp2(sT - lse2[None, :])
            dpT = _dot(v, tl.trans(do), IEEE)
            if DROPOUT:
                uT = tl.trans(_dropout_uniform(seed, off_bh, offs_m, start_n * BLOCK_N, BLOCK_M, BLOCK_N))
                multT = tl.where(uT >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
                pdT = pT * multT
                dpT = dpT * multT
            else:
                pdT = pT
            dv += _dot(pdT.to(do.dtype), do, IEEE)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
            if NEED_DPRIOR:
                dsaT = dsT * alpha
                if PRIOR == 1:
                    # BLOCK_M == BLOCK_N here: the tile's lags are (dm·B - (B-1)) + t, dm = block diagonal
                    dm = start_m // BLOCK_M - start_n
                    if (dm > -LAG_K) & (dm < LAG_K):  # may meet the window: store its diagonal sums
                        diag = _lag_diag_sums(dsaT, BLOCK_M, BLOCK_N, LAG_T)
                        tl.store(dl_base + (dm + LAG_K - 1) * LAG_T + tl.arange(0, LAG_T), diag)
                    else:  # every lag of the tile clamps to one end of the table
                        tot = tl.sum(tl.sum(dsaT, 1), 0)
                        side = tl.where(dm > 0, 1, 0)
                        lag_ends += tl.where(tl.arange(0, 2) == side, tot, 0.0)
                if PRIOR == 3:
                    u = _load_factor(P_ptr, p_base, offs_m, Lq, sp_r, sp_c, PW, R_PAD)
                    dvf += _dot_f32(dsaT, u, IEEE)
        if NEED_DPRIOR:
            if PRIOR == 1:
                ends_base = DL + off_bh.to(tl.int64) * dl_bh + n_nb * (2 * LAG_K - 1) * LAG_T
                tl.store(ends_base + start_n * 2 + tl.arange(0, 2), lag_ends)
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
