"""Backward, dq kernel (FlashAttention-2 recomputation from the LSE), deterministic, no atomics.

``_attn_bwd_dq_kernel``: one program per (query block, batch·query head), loops over key blocks. Owns dq,
and the prior gradients that live on query rows: banded values (each (i, w + j - i) is written by exactly
one key tile, so a plain store suffices), low-rank ``du = α·dS·v_f``, dense ``α·dS`` tiles, and a
per-program partial of ``dα_h = Σ dS∘B``. Reduced on the host (launch.py) with dense torch ops over fixed
dims, so gradients are bitwise reproducible. Dropout masks are regenerated from the forward's Philox
counters.

Register pressure decides the tile (tools/gen_triton_configs.py keeps the largest spill-free one), so the
prior is read here rather than through the general ``_common._prior_tile``, whose per-element int64 pointer
tiles spill at the no-prior tile: an int64 base per query block and 32-bit in-tile offsets built as a row
term plus a column term (band ``(i, j - i + W)``; dense with columns clamped to Lk - 1 and read unmasked),
the lag index clamped into the table (no mask), the low-rank query factor resident. Measured per launch key:
bench/results/triton_bwd_tiles-*.md. (The forward's split of the key loop into masked / unmasked / constant
ranges measured worse here: four loops of dq state.)

One kernel per module: the config tables' fingerprint of the dq keys (configs.KERNEL_FILES) covers this
file and what it imports, so editing the dk/dv kernel leaves the dq keys verified.
"""

import triton
import triton.language as tl

from ._common import _dot, _dot_f32, _dropout_uniform, _key_block_range, _load_rows_T


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
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)  # launch.dq_grid: (b·Hq + h) · n_mb + query block
    off_bh = pid // n_mb
    start_m = pid % n_mb
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
    # prior-gradient rows of this block: an int64 block base, 32-bit in-tile offsets (as for the prior's rows).
    # Band gradient: the launcher's buffer has cdiv(Lq, 128)·128 rows of 128 + 2W columns, column = key -
    # (start of the row's 128-row group) + W; a block (BLOCK_M divides 128) lies in one group, so its store
    # needs a 1-D column mask only (measured: the (i, j - i + W) layout's 2-D mask tile spilled 150-500 B)
    BAND_GROUP: tl.constexpr = 128  # == launch.BAND_GRAD_GROUP
    dpr_rows = Lq
    if PRIOR == 2:
        dpr_rows = tl.cdiv(Lq, BAND_GROUP) * BAND_GROUP
    dpr_blk = DPR + (off_bh.to(tl.int64) * dpr_rows + start_m * BLOCK_M) * dpr_r
    rows_m = tl.arange(0, BLOCK_M)
    alpha = tl.load(Alpha + off_h)
    # prior rows of this query block (rows beyond Lq read row Lq - 1, never stored): an int64 block base and
    # 32-bit in-tile offsets, and the low-rank query factor resident; measured, each keeps dq at the no-prior
    # tile where the general _prior_tile's int64 pointer tiles spill
    p_blk = P_ptr + p_base + tl.cast(start_m * BLOCK_M, tl.int64) * sp_r
    rows_l = tl.minimum(offs_m, Lq - 1) - start_m * BLOCK_M
    first = start_m * BLOCK_M
    band_row = rows_l * sp_r - (offs_m - first) * sp_c
    offs_r = tl.arange(0, R_PAD)
    u_res = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if PRIOR == 3:
        u_res = tl.load(p_blk + (rows_l[:, None] * sp_r + offs_r[None, :] * sp_c),
                        mask=offs_r[None, :] < PW, other=0.0).to(tl.float32)

    lo, hi = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)

    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    da = tl.zeros((BLOCK_M,), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = _load_rows_T(k_base, start_n, sk_n, offs_d, n_ok, D, BLOCK_N)
        s = _dot(q, kT, IEEE) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if HAS_KPM:
            pad = tl.load(Kpm + off_b.to(tl.int64) * skpm_b + offs_n, mask=n_ok, other=1)
            valid = valid & (pad[None, :] == 0)
        b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PRIOR == 4:
            # a -inf in a user's dense bias masks for every alpha, even 0
            # unmasked: keys beyond Lk read column Lk - 1 (masked by valid); an affine row + column tile
            b = tl.load(p_blk + ((rows_l * sp_r)[:, None] + (tl.minimum(offs_n, Lk - 1) * sp_c)[None, :]))
            b = b.to(tl.float32)
            hole = b == float("-inf")
            valid = valid & (hole == 0)
            b = tl.where(hole, 0.0, b)
            s = s + (alpha * LOG2E) * b
        elif PRIOR != 0:
            if PRIOR == 2:
                off = offs_n[None, :] - offs_m[:, None] + PW
                inside = (off >= 0) & (off <= 2 * PW)
                if MASK_OUT:
                    valid = valid & inside
            if NEED_DALPHA or NEED_DPRIOR or alpha != 0:  # heads with alpha = 0 skip the read unless d(alpha) needs B
                if PRIOR == 1:  # lags clamp into the table: every index in bounds, no load mask
                    idx = tl.minimum(tl.maximum(offs_m[:, None] - offs_n[None, :], -PW), PW) + PW
                    b = tl.load(P_ptr + p_base + idx * sp_c).to(tl.float32)
                if PRIOR == 2:
                    # (i, j - i + W) as a row term plus a column term: an affine tile, no per-element products
                    b = tl.load(p_blk + (band_row[:, None] + (offs_n - first + PW)[None, :] * sp_c),
                                mask=inside & n_ok[None, :], other=0.0).to(tl.float32)
                if PRIOR == 3:
                    w_row = P2_ptr + p2_base + tl.cast(start_n, tl.int64) * sp2_r
                    wf = tl.load(w_row + (tl.arange(0, BLOCK_N)[:, None] * sp2_r + offs_r[None, :] * sp2_c),
                                 mask=n_ok[:, None] & (offs_r[None, :] < PW), other=0.0).to(tl.float32)
                    b = _dot_f32(u_res, tl.trans(wf), IEEE)
                s = s + (alpha * LOG2E) * b
        s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        vT = _load_rows_T(v_base, start_n, sv_n, offs_dv, n_ok, DV, BLOCK_N)
        dp = _dot(do, vT, IEEE)
        if DROPOUT:
            u = _dropout_uniform(seed, off_bh, offs_m, start_n, BLOCK_M, BLOCK_N)
            dp = dp * tl.where(u >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
        if NEED_DALPHA:
            da += tl.sum(ds * b, 1)
        if NEED_DPRIOR:
            dsa = ds * alpha
            if PRIOR == 2:
                col = offs_n - first // BAND_GROUP * BAND_GROUP + PW
                col_ok = (col >= 0) & (col < BAND_GROUP + 2 * PW) & n_ok
                tl.store(dpr_blk + (rows_m[:, None] * dpr_r + col[None, :]), dsa, mask=col_ok[None, :])
            if PRIOR == 3:
                du += _dot_f32(dsa, wf, IEEE)
            if PRIOR == 4:
                tl.store(dpr_blk + (rows_m[:, None] * dpr_r + offs_n[None, :]), dsa,
                         mask=m_ok[:, None] & n_ok[None, :])

    dq = dq * scale
    tl.store(DQ + off_b.to(tl.int64) * sdq_b + off_h.to(tl.int64) * sdq_h
             + offs_m[:, None].to(tl.int64) * sdq_m + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < D))
    if NEED_DALPHA:
        tl.store(DA + off_bh.to(tl.int64) * da_bh + start_m, tl.sum(da, 0))
    if NEED_DPRIOR:
        if PRIOR == 3:
            offs_r = tl.arange(0, R_PAD)
            tl.store(dpr_blk + (rows_m[:, None] * dpr_r + offs_r[None, :]), du,
                     mask=m_ok[:, None] & (offs_r[None, :] < PW))
