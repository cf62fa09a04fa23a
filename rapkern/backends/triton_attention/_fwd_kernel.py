"""Forward kernel: one program per (query block, batch·head); FlashAttention-2 online softmax in exp2.

Logits ``scale·q kᵀ + α_h·B`` are built tile by tile with the prior read compactly; fp32 accumulators;
causal and ``mask_outside`` bands shrink the key loop bounds (block skipping).

Register pressure decides the tile (a spilling kernel is slow), so the key loop of one query block is
split, as the Triton tutorial splits its causal stages, into ranges that each compile to a lean loop:

    [lo, a)   no masking, constant prior cA    (lag: every |i-j| >= W there, one table end; others 0)
    [a, b)    no masking, prior read            (lag: blocks near the diagonal; band: blocks meeting it)
    [b, m0)   no masking, constant prior cC
    [m0, hi)  boundary blocks: causal diagonal and ragged key end masked, prior read

Only the last range carries mask tiles; only the read ranges carry prior index tiles; constant ranges
are the tutorial's loop plus one scalar add. At head dims > 64 with a prior, the read and boundary ranges
step half a key block (BLOCK_N / 2): the tile stays BLOCK_M x BLOCK_N where no prior is gathered, and the
gathered tiles stay small where it is (what makes 128 x 64 spill-free on sm_80), and key padding is
read unmasked (vectorizable) where the keys lie below Lk. Heads with α = 0 read no prior (except a dense bias, whose
-inf entries mask for every α, and a ``mask_outside`` band, whose edge masks). Query rows beyond Lq are
computed (never stored) with in-bounds prior rows, so no row mask is needed in the loop. Rows with no
visible key give out 0 and lse -inf.

The grid is one dimension: program id = (b·Hq + h) · cdiv(Lq, BLOCK_M) + query block (launch.fwd_grid),
so B·Hq is not bounded by CUDA's 65,535 limit on grid dims 1 and 2, and consecutive programs share a
head's keys in L2.
"""

import triton
import triton.language as tl

from ._common import _dot, _dot_f32, _dropout_uniform, _key_block_range


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i, q, lo, hi, c_add, alpha2,
    k_base, v_base, sk_n, sv_n, offs_d, offs_dv, D, DV, offs_m, Lk,
    kpm_row, P_ptr, p_base, p_rows, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW, u_res,
    off_bh, dropout_p, seed, qk_scale,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, READ: tl.constexpr,
    STAGES: tl.constexpr, NARROW: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi). ``MASKED``: causal / ragged-end
    masks; ``READ``: read the prior tile (else add the log2-domain constant ``c_add``). ``STAGES``: software
    pipelining depth (None = the launch's num_stages; running the boundary blocks unpipelined measured
    more registers, not fewer, on triton 3.8 sm_90). ``NARROW``: the kernel runs its prior ranges at half a
    key block (wide heads with a prior, see _attn_fwd_kernel)."""
    d_ok = offs_d < D
    dv_ok = offs_dv < DV
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = tl.arange(0, BLOCK_N)
        offs_n = start_n + cols
        k_row = k_base + tl.cast(start_n, tl.int64) * sk_n
        v_row = v_base + tl.cast(start_n, tl.int64) * sv_n
        if MASKED:
            # keys beyond Lk read the last key (finite, in bounds) and are masked below: no mask tiles on loads
            n_ok = offs_n < Lk
            cols = tl.minimum(offs_n, Lk - 1) - start_n
        kT = tl.load(k_row + (cols[None, :] * sk_n + offs_d[:, None]), mask=d_ok[:, None], other=0.0)
        s = _dot(q, kT, IEEE) * qk_scale
        if READ:
            if PRIOR == 1:
                idx = tl.minimum(tl.maximum(offs_m[:, None] - offs_n[None, :], -PW), PW) + PW
                b = tl.load(P_ptr + p_base + idx * sp_c)
                s += alpha2 * b.to(tl.float32)
            elif PRIOR == 2:
                off = offs_n[None, :] - offs_m[:, None] + PW
                inside = (off >= 0) & (off <= 2 * PW)
                b = tl.load(p_rows[:, None] + off * sp_c, mask=inside, other=0.0)
                s += alpha2 * b.to(tl.float32)
                if MASK_OUT:
                    s = tl.where(inside, s, float("-inf"))
            elif PRIOR == 3:
                offs_r = tl.arange(0, R_PAD)
                w_row = P2_ptr + p2_base + tl.cast(start_n, tl.int64) * sp2_r
                wf = tl.load(w_row + (cols[:, None] * sp2_r + offs_r[None, :] * sp2_c),
                             mask=offs_r[None, :] < PW, other=0.0).to(tl.float32)
                s += alpha2 * _dot_f32(u_res, tl.trans(wf), IEEE)
            elif PRIOR == 4:
                b = tl.load(p_rows[:, None] + (start_n + cols)[None, :] * sp_c).to(tl.float32)
                s = tl.where(b == float("-inf"), float("-inf"), s + alpha2 * b)  # -inf masks for every alpha
        else:
            s += c_add
        if MASKED:
            valid = n_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
        if HAS_KPM:
            if NARROW:
                # unmasked ranges lie below Lk: an unmasked contiguous load (vectorizable); boundary blocks
                # read the clamped in-bounds columns (keys beyond Lk are masked above). Measured: spares
                # registers with a gathered prior at head dim 128, costs some without one (sm_80)
                if MASKED:
                    pad = tl.load(kpm_row + start_n + cols)
                else:
                    pad = tl.load(kpm_row + offs_n)
            else:
                pad = tl.load(kpm_row + offs_n, mask=offs_n < Lk, other=1)
            s = tl.where(pad[None, :] == 0, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: keep exp2 at 0
        p = tl.math.exp2(s - m_safe[:, None])
        corr = tl.math.exp2(m_i - m_safe)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None]
        if DROPOUT:
            # keep/(1-p) as a float tile: it may change layout, which an i1 tile cannot do
            u = _dropout_uniform(seed, off_bh, offs_m, start_n, BLOCK_M, BLOCK_N)
            p = p * tl.where(u >= dropout_p, 1.0 / (1.0 - dropout_p), 0.0)
        v = tl.load(v_row + (cols[:, None] * sv_n + offs_dv[None, :]), mask=dv_ok[None, :], other=0.0)
        acc += _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_m, skpm_b,
    Hq, Lq, Lk, D, DV, GROUP, qk_scale, dropout_p, seed,
    LQ_BUCKET, LK_BUCKET,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    off_bh = pid // n_mb
    start_m = pid % n_mb
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_ok = offs_m < Lq
    rows = tl.minimum(offs_m, Lq - 1)  # rows beyond Lq are never stored: read in-bounds prior rows

    q_ptrs = (Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
              + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :])
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_b.to(tl.int64) * sk_b + off_kh.to(tl.int64) * sk_h
    v_base = V + off_b.to(tl.int64) * sv_b + off_kh.to(tl.int64) * sv_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    p_rows = P_ptr + p_base + rows.to(tl.int64) * sp_r  # banded / dense: row starts, out of the loop
    kpm_row = Kpm + off_b.to(tl.int64) * skpm_b
    alpha = tl.load(Alpha + off_h)
    alpha2 = alpha * LOG2E
    u_res = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if PRIOR == 3:  # the query rows' low-rank factor stays resident
        offs_r = tl.arange(0, R_PAD)
        u_res = tl.load(P_ptr + p_base + rows[:, None].to(tl.int64) * sp_r + offs_r[None, :] * sp_c,
                        mask=offs_r[None, :] < PW, other=0.0).to(tl.float32)

    lo, hi = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)
    # [lo, m0): blocks needing no causal / ragged-end mask; [m0, hi): boundary blocks
    ulim = Lk
    if CAUSAL:
        ulim = tl.minimum(ulim, start_m * BLOCK_M + 1)
    m0 = tl.maximum(lo, tl.minimum(hi, ulim // BLOCK_N * BLOCK_N))
    if PRIOR == 4:  # measured: a dense bias (a full tile read anyway) compiles leaner as one masked loop
        m0 = lo
    # read sub-range [a, b) of [lo, m0) and the constants of the ranges around it
    first = start_m * BLOCK_M
    last = first + BLOCK_M - 1
    a = lo
    b = m0
    c_lo = 0.0
    c_hi = 0.0
    if PRIOR == 0:
        a = m0
    if PRIOR == 1:
        # every lag i - j >= W left of a (table end 2W), <= -W right of b (table entry 0)
        a = tl.maximum(first - PW + 1, 0) // BLOCK_N * BLOCK_N
        b = tl.cdiv(last + PW, BLOCK_N) * BLOCK_N
        c_lo = alpha2 * tl.load(P_ptr + p_base + 2 * PW * sp_c).to(tl.float32)
        c_hi = alpha2 * tl.load(P_ptr + p_base).to(tl.float32)
    if PRIOR == 2:
        if not MASK_OUT:  # blocks that meet the band |j - i| <= W
            a = tl.maximum(first - PW, 0) // BLOCK_N * BLOCK_N
            b = tl.cdiv(last + PW + 1, BLOCK_N) * BLOCK_N
    if PRIOR != 4:
        if not (PRIOR == 2 and MASK_OUT):
            if alpha == 0:  # no prior read for this head (the lag's end constants are 0 then too)
                a = m0
                b = m0
    a = tl.minimum(tl.maximum(a, lo), m0)
    b = tl.minimum(tl.maximum(b, a), m0)

    # Wide heads with a prior: the ranges that read the prior (near-diagonal / in-band blocks and the boundary
    # blocks) step BLOCK_N / 2 keys, halving the gathered index / value tiles live next to the score tile; the
    # constant ranges keep BLOCK_N. Every range bound is a multiple of BLOCK_N, so the steps tile it exactly.
    NARROW: tl.constexpr = PRIOR != 0 and D_PAD >= 128 and BLOCK_N >= 32
    BN_R: tl.constexpr = BLOCK_N // 2 if NARROW else BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    # boundary blocks first (measured: fewer registers than last, on sm_80 and sm_90, triton 3.8)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, m0, hi, 0.0, alpha2, k_base, v_base, sk_n, sv_n, offs_d, offs_dv, D, DV,
        offs_m, Lk, kpm_row, P_ptr, p_base, p_rows, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW, u_res, off_bh,
        dropout_p, seed, qk_scale, PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, DROPOUT, IEEE, BLOCK_M, BN_R,
        True, True, None, NARROW)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, lo, a, c_lo, alpha2, k_base, v_base, sk_n, sv_n, offs_d, offs_dv, D, DV,
        offs_m, Lk, kpm_row, P_ptr, p_base, p_rows, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW, u_res, off_bh,
        dropout_p, seed, qk_scale, PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, DROPOUT, IEEE, BLOCK_M, BLOCK_N,
        False, False, None, NARROW)
    if PRIOR != 0:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, a, b, 0.0, alpha2, k_base, v_base, sk_n, sv_n, offs_d, offs_dv, D, DV,
            offs_m, Lk, kpm_row, P_ptr, p_base, p_rows, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW, u_res, off_bh,
            dropout_p, seed, qk_scale, PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, DROPOUT, IEEE, BLOCK_M,
            BN_R, False, True, None, NARROW)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, b, m0, c_hi, alpha2, k_base, v_base, sk_n, sv_n, offs_d, offs_dv, D, DV,
            offs_m, Lk, kpm_row, P_ptr, p_base, p_rows, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW, u_res, off_bh,
            dropout_p, seed, qk_scale, PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, DROPOUT, IEEE, BLOCK_M,
            BLOCK_N, False, False, None, NARROW)
    dead = l_i == 0.0  # no visible key: output 0, lse -inf
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (Out + off_b.to(tl.int64) * so_b + off_h.to(tl.int64) * so_h
              + offs_m[:, None].to(tl.int64) * so_m + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)
