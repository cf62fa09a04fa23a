"""Kernels for attention statistics (entropy, key mass) and the attention KL, forward and backward.

Logits are those of the attention kernels (``_common._logits``: scale·q kᵀ + α_h·B, every mask as -inf,
log2 domain, prior read compactly); the KL divides both logit sets by T by folding 1/T into the scale and
into α. With p = softmax over the visible keys (s natural logits):

* ``_stats_fwd_kernel`` (one program per query block, b·Hq): one online pass keeps the running max m, Σe and
  a = Σe·(s − m), rescaled when m moves; then lse = m + log l and entropy H = log l − a/l.
* ``_stats_mass_kernel`` (one program per key block, b·Hq): key-major after lse is known,
  ``M_j = Σ_i exp(s_ij − lse_i)``.
* ``_kl_fwd_kernel`` (query block, b·Hq): both logit tiles over the union of the keys either side can see,
  online in both LSEs and in a = Σ e_t·(s_t − s_s); ``KL_i = a/l_t − lse_t + lse_s``. A key the teacher sees
  and the student masks makes the row +inf; a row where the teacher sees nothing is 0.
* ``_score_bwd_dq_kernel`` / ``_score_bwd_dk_kernel``: dL/ds for either op (``KL`` constexpr), then the
  attention backward's reductions: dq, per-row prior gradients (banded, dense, low-rank u) and per-block dα
  partials row-major; dk, lag-table diagonal sums and low-rank v key-major (GQA group looped inside).
  Stats: ``ds_ij = p_ij [gM_j − c_i − gH_i (s_ij − μ_i)]`` with μ_i = lse_i − H_i and c_i = Σ_k p_ik gM_k (a
  first loop of the dq kernel, stored for the dk kernel). KL: ``ds_ij = g_i (p_s,ij − p_t,ij) / T`` on the
  student's visible keys (0 where the student masks).

Everything is written once per element or reduced on the host in a fixed order: no atomics, bitwise
reproducible. Not yet run on a GPU: checked through the Triton interpreter and by ahead-of-time compiles
for sm_80/sm_90 (tests/test_triton_stats_compile.py).
"""

import triton
import triton.language as tl

from ._lag_diag import _lag_diag_sums
from ._common import _dot, _dot_f32, _key_block_range, _load_factor, _load_rows_T, _logits

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _query_block_range(start_n, Lq, PW, PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that can see key block ``start_n`` (the key-major twin of _key_block_range,
    as inlined in the attention dk/dv kernel)."""
    lo = start_n * 0
    hi = lo + Lq
    if CAUSAL:
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    if PRIOR == 2:
        if MASK_OUT:
            lo = tl.maximum(lo, tl.maximum(start_n * BLOCK_N - PW, 0) // BLOCK_M * BLOCK_M)
            hi = tl.minimum(hi, (start_n + 1) * BLOCK_N + PW)
    return lo, hi


@triton.jit
def _lse2(Lse, off_bh, offs, L):
    """Saved natural LSE -> log2 domain; +inf for dead rows and rows past L, so that exp2(s − lse2) = 0."""
    lse = tl.load(Lse + off_bh.to(tl.int64) * L + offs, mask=offs < L, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _vec(X, off_bh, offs, L):
    return tl.load(X + off_bh.to(tl.int64) * L + offs, mask=offs < L, other=0.0)


@triton.jit
def _q_tile(Q, off_b, off_h, sq_b, sq_h, sq_m, offs_m, offs_d, Lq, D):
    return tl.load(Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
                   + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :],
                   mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _stats_fwd_kernel(
    Q, K, Lse, Ent, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, skpm_b,
    Hq, Lq, Lk, D, GROUP, qk_scale,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    q = _q_tile(Q, off_b, off_h, sq_b, sq_h, sq_m, offs_m, offs_d, Lq, D)
    k_base = K + off_b.to(tl.int64) * sk_b + (off_h // GROUP).to(tl.int64) * sk_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    alpha = tl.load(Alpha + off_h)
    lo, hi = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e·(s − m_i), log2 domain
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _load_rows_T(k_base, start_n, sk_n, offs_d, offs_n < Lk, D, BLOCK_N)
        s, b = _logits(q, kT, qk_scale, alpha, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                       off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                       PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, False, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.math.exp2(s - m_safe[:, None])
        z = tl.where(s == float("-inf"), 0.0, s - m_safe[:, None])
        corr = tl.math.exp2(m_i - m_safe)
        shift = tl.where(m_i == float("-inf"), 0.0, m_i - m_safe)  # re-centre a on the new max
        a_i = corr * (a_i + shift * l_i) + tl.sum(e * z, 1)
        l_i = l_i * corr + tl.sum(e, 1)
        m_i = m_new

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    ent = tl.where(dead, 0.0, (tl.math.log2(l_safe) - a_i / l_safe) * LN2)
    m_ok = offs_m < Lq
    tl.store(Lse + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)
    tl.store(Ent + off_bh.to(tl.int64) * Lq + offs_m, ent, mask=m_ok)


@triton.jit
def _stats_mass_kernel(
    Q, K, Lse, Mass, Alpha, Kpm,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, skpm_b,
    Hq, Lq, Lk, D, GROUP, qk_scale,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, D_PAD: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = _q_tile(K, off_b, off_h // GROUP, sk_b, sk_h, sk_n, offs_n, offs_d, Lk, D)
    q_base = Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    alpha = tl.load(Alpha + off_h)
    lo, hi = _query_block_range(start_n, Lq, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)

    mass = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qT = _load_rows_T(q_base, start_m, sq_m, offs_d, offs_m < Lq, D, BLOCK_M)
        sT, bT = _logits(k, qT, qk_scale, alpha, offs_m[None, :], offs_n[:, None], offs_m, offs_n, Lq, Lk,
                         off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                         PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_N, BLOCK_M, False, True)
        mass += tl.sum(tl.math.exp2(sT - _lse2(Lse, off_bh, offs_m, Lq)[None, :]), 1)
    tl.store(Mass + off_bh.to(tl.int64) * Lk + offs_n, mass, mask=offs_n < Lk)


@triton.jit
def _kl_fwd_kernel(
    Q, K, Lse, Alpha, Kpm, KLrow,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    Qt, Kt, LseT, AlphaT,
    Pt_ptr, spt_b, spt_h, spt_r, spt_c, Pt2_ptr, spt2_b, spt2_h, spt2_r, spt2_c, PWT,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n, skpm_b,
    Hq, Lq, Lk, D, DT, GROUP, GROUP_T, qk_scale, qk_scale_t, inv_t,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr,
    PRIOR_T: tl.constexpr, MASK_OUT_T: tl.constexpr, R_PAD_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, D_PAD: tl.constexpr, DT_PAD: tl.constexpr,
    IEEE: tl.constexpr, IEEE_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Unsuffixed arguments are the student's, ``*t``/``*T`` the teacher's; both logit sets already carry 1/T."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dt = tl.arange(0, DT_PAD)
    q = _q_tile(Q, off_b, off_h, sq_b, sq_h, sq_m, offs_m, offs_d, Lq, D)
    qt = _q_tile(Qt, off_b, off_h, sqt_b, sqt_h, sqt_m, offs_m, offs_dt, Lq, DT)
    k_base = K + off_b.to(tl.int64) * sk_b + (off_h // GROUP).to(tl.int64) * sk_h
    kt_base = Kt + off_b.to(tl.int64) * skt_b + (off_h // GROUP_T).to(tl.int64) * skt_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    pt_base = off_b.to(tl.int64) * spt_b + off_h.to(tl.int64) * spt_h
    pt2_base = off_b.to(tl.int64) * spt2_b + off_h.to(tl.int64) * spt2_h
    alpha = tl.load(Alpha + off_h) * inv_t
    alpha_t = tl.load(AlphaT + off_h) * inv_t
    lo_s, hi_s = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)
    lo_t, hi_t = _key_block_range(start_m, Lk, PWT, PRIOR_T, MASK_OUT_T, CAUSAL, BLOCK_M, BLOCK_N)

    m_t = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_t = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e_t·(s_t − s_s) on keys both sides see
    m_s = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_M,), dtype=tl.float32)  # 1 where the teacher sees a key the student masks
    for start_n in range(tl.minimum(lo_s, lo_t), tl.maximum(hi_s, hi_t), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = _load_rows_T(k_base, start_n, sk_n, offs_d, n_ok, D, BLOCK_N)
        ss, b = _logits(q, kT, qk_scale, alpha, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                        off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                        PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, False, False)
        ktT = _load_rows_T(kt_base, start_n, skt_n, offs_dt, n_ok, DT, BLOCK_N)
        st, bt = _logits(qt, ktT, qk_scale_t, alpha_t, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                         off_b, Kpm, skpm_b, Pt_ptr, pt_base, spt_r, spt_c, Pt2_ptr, pt2_base, spt2_r, spt2_c, PWT,
                         PRIOR_T, MASK_OUT_T, R_PAD_T, CAUSAL, HAS_KPM, IEEE_T, BLOCK_M, BLOCK_N, False, False)
        seen_t = st != float("-inf")
        seen_s = ss != float("-inf")
        mt_new = tl.maximum(m_t, tl.max(st, 1))
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        e_t = tl.math.exp2(st - mt_safe[:, None])
        corr_t = tl.math.exp2(m_t - mt_safe)
        diff = tl.where(seen_t & seen_s, st - ss, 0.0)
        a_t = a_t * corr_t + tl.sum(e_t * diff, 1)
        l_t = l_t * corr_t + tl.sum(e_t, 1)
        m_t = mt_new
        ms_new = tl.maximum(m_s, tl.max(ss, 1))
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        l_s = l_s * tl.math.exp2(m_s - ms_safe) + tl.sum(tl.math.exp2(ss - ms_safe[:, None]), 1)
        m_s = ms_new
        bad = tl.maximum(bad, tl.max(tl.where(seen_t & (seen_s == 0), 1.0, 0.0), 1))

    dead_t = l_t == 0.0
    dead_s = l_s == 0.0
    lt_safe = tl.where(dead_t, 1.0, l_t)
    ls_safe = tl.where(dead_s, 1.0, l_s)
    lse2_t = m_t + tl.math.log2(lt_safe)
    lse2_s = m_s + tl.math.log2(ls_safe)
    kl = tl.where(dead_t | dead_s, 0.0, (a_t / lt_safe - lse2_t + lse2_s) * LN2)
    kl = tl.where(bad > 0, float("inf"), kl)
    m_ok = offs_m < Lq
    row = off_bh.to(tl.int64) * Lq + offs_m
    tl.store(KLrow + row, kl, mask=m_ok)
    tl.store(Lse + row, tl.where(dead_s, float("-inf"), lse2_s * LN2), mask=m_ok)
    tl.store(LseT + row, tl.where(dead_t, float("-inf"), lse2_t * LN2), mask=m_ok)


@triton.jit
def _score_bwd_dq_kernel(
    Q, K, Lse, Alpha, Kpm, DQ,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    GR, Mu, GM, C,
    Qt, Kt, LseT, AlphaT,
    Pt_ptr, spt_b, spt_h, spt_r, spt_c, Pt2_ptr, spt2_b, spt2_h, spt2_r, spt2_c, PWT,
    DPR, dpr_r, DA, da_bh,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n,
    sdq_b, sdq_h, sdq_m, skpm_b,
    Hq, Lq, Lk, D, DT, GROUP, GROUP_T, qk_scale, qk_scale_t, inv_t, scale,
    KL: tl.constexpr, PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr,
    PRIOR_T: tl.constexpr, MASK_OUT_T: tl.constexpr, R_PAD_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_GH: tl.constexpr, HAS_GM: tl.constexpr,
    D_PAD: tl.constexpr, DT_PAD: tl.constexpr, IEEE: tl.constexpr, IEEE_T: tl.constexpr,
    NEED_DPRIOR: tl.constexpr, NEED_DALPHA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Row-major backward. Stats: GR = gH, Mu = μ, GM = gM (b·Hq, Lk), C = c (written here). KL: GR = g (0 on
    rows the teacher does not see), teacher arguments as in _kl_fwd_kernel."""
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    m_ok = offs_m < Lq
    q = _q_tile(Q, off_b, off_h, sq_b, sq_h, sq_m, offs_m, offs_d, Lq, D)
    lse2 = _lse2(Lse, off_bh, offs_m, Lq)
    gr = _vec(GR, off_bh, offs_m, Lq)
    k_base = K + off_b.to(tl.int64) * sk_b + (off_h // GROUP).to(tl.int64) * sk_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    dpr_base = off_bh.to(tl.int64) * Lq * dpr_r
    alpha = tl.load(Alpha + off_h)
    alpha_l = alpha * inv_t
    # only the student's visible keys carry a gradient (ds = 0 where its logit is masked)
    lo, hi = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)
    if KL:
        offs_dt = tl.arange(0, DT_PAD)
        qt = _q_tile(Qt, off_b, off_h, sqt_b, sqt_h, sqt_m, offs_m, offs_dt, Lq, DT)
        lse2_t = _lse2(LseT, off_bh, offs_m, Lq)
        kt_base = Kt + off_b.to(tl.int64) * skt_b + (off_h // GROUP_T).to(tl.int64) * skt_h
        pt_base = off_b.to(tl.int64) * spt_b + off_h.to(tl.int64) * spt_h
        pt2_base = off_b.to(tl.int64) * spt2_b + off_h.to(tl.int64) * spt2_h
        alpha_t = tl.load(AlphaT + off_h) * inv_t
    else:
        mu = _vec(Mu, off_bh, offs_m, Lq)
        c = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if HAS_GM:  # c_i = Σ_k p_ik gM_k needs the whole row before any ds
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                kT = _load_rows_T(k_base, start_n, sk_n, offs_d, offs_n < Lk, D, BLOCK_N)
                s, b = _logits(q, kT, qk_scale, alpha_l, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                               off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                               PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, False, False)
                gm = _vec(GM, off_bh, offs_n, Lk)
                c += tl.sum(tl.math.exp2(s - lse2[:, None]) * gm[None, :], 1)
            tl.store(C + off_bh.to(tl.int64) * Lq + offs_m, c, mask=m_ok)

    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    da = tl.zeros((BLOCK_M,), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = _load_rows_T(k_base, start_n, sk_n, offs_d, n_ok, D, BLOCK_N)
        s, b = _logits(q, kT, qk_scale, alpha_l, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                       off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                       PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, NEED_DALPHA, False)
        p = tl.math.exp2(s - lse2[:, None])
        if KL:
            ktT = _load_rows_T(kt_base, start_n, skt_n, offs_dt, n_ok, DT, BLOCK_N)
            st, bt = _logits(qt, ktT, qk_scale_t, alpha_t, offs_m[:, None], offs_n[None, :], offs_m, offs_n,
                             Lq, Lk, off_b, Kpm, skpm_b, Pt_ptr, pt_base, spt_r, spt_c, Pt2_ptr, pt2_base, spt2_r,
                             spt2_c, PWT, PRIOR_T, MASK_OUT_T, R_PAD_T, CAUSAL, HAS_KPM, IEEE_T, BLOCK_M, BLOCK_N,
                             False, False)
            p_t = tl.math.exp2(st - lse2_t[:, None])
            # a float 0/1 tile, not a bool one: i1 tiles cannot change layout through shared memory
            seen = tl.where(s == float("-inf"), 0.0, 1.0)
            ds = seen * ((gr * inv_t)[:, None] * (p - p_t))
        else:
            ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_GM:
                ds += p * (_vec(GM, off_bh, offs_n, Lk)[None, :] - c[:, None])
            if HAS_GH:
                z = tl.where(s == float("-inf"), 0.0, s * LN2 - mu[:, None])
                ds -= gr[:, None] * p * z
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), IEEE)
        if NEED_DALPHA:
            da += tl.sum(ds * b, 1)
        if NEED_DPRIOR:
            dsa = ds * alpha
            if PRIOR == 2:
                off = offs_n[None, :] - offs_m[:, None] + PW
                inside = m_ok[:, None] & n_ok[None, :] & (off >= 0) & (off <= 2 * PW)
                tl.store(DPR + dpr_base + offs_m[:, None].to(tl.int64) * dpr_r + off.to(tl.int64), dsa, mask=inside)
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
def _score_bwd_dk_kernel(
    Q, K, Lse, Alpha, Kpm, DK,
    P_ptr, sp_b, sp_h, sp_r, sp_c, P2_ptr, sp2_b, sp2_h, sp2_r, sp2_c, PW,
    GR, Mu, GM, C,
    Qt, Kt, LseT, AlphaT,
    Pt_ptr, spt_b, spt_h, spt_r, spt_c, Pt2_ptr, spt2_b, spt2_h, spt2_r, spt2_c, PWT,
    DPR, dpr_r, DL, dl_bh, LAG_K,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sqt_b, sqt_h, sqt_m, skt_b, skt_h, skt_n,
    sdk_b, sdk_h, sdk_n, skpm_b,
    Hq, Hkv, Lq, Lk, D, DT, GROUP, GROUP_T, qk_scale, qk_scale_t, inv_t, scale,
    KL: tl.constexpr, PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr,
    PRIOR_T: tl.constexpr, MASK_OUT_T: tl.constexpr, R_PAD_T: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_GH: tl.constexpr, HAS_GM: tl.constexpr,
    D_PAD: tl.constexpr, DT_PAD: tl.constexpr, IEEE: tl.constexpr, IEEE_T: tl.constexpr,
    NEED_DPRIOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAG_T: tl.constexpr,
):
    """Key-major backward, one program per (key block, b·Hkv of the student). Lag-table partials need square
    tiles (BLOCK_M == BLOCK_N) and use the attention dk/dv kernel's slot layout (launch._reduce_lag)."""
    start_n = tl.program_id(0)
    off_bkh = tl.program_id(1)
    off_b = off_bkh // Hkv
    off_kh = off_bkh % Hkv
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dt = tl.arange(0, DT_PAD)
    n_ok = offs_n < Lk
    k = _q_tile(K, off_b, off_kh, sk_b, sk_h, sk_n, offs_n, offs_d, Lk, D)
    q_lo, q_hi = _query_block_range(start_n, Lq, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)

    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    for g in range(0, GROUP):
        off_h = off_kh * GROUP + g
        off_bh = off_b * Hq + off_h
        alpha = tl.load(Alpha + off_h)
        alpha_l = alpha * inv_t
        p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
        p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
        q_base = Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
        if KL:
            kt = _q_tile(Kt, off_b, off_h // GROUP_T, skt_b, skt_h, skt_n, offs_n, offs_dt, Lk, DT)
            qt_base = Qt + off_b.to(tl.int64) * sqt_b + off_h.to(tl.int64) * sqt_h
            pt_base = off_b.to(tl.int64) * spt_b + off_h.to(tl.int64) * spt_h
            pt2_base = off_b.to(tl.int64) * spt2_b + off_h.to(tl.int64) * spt2_h
            alpha_t = tl.load(AlphaT + off_h) * inv_t
        else:
            gm = _vec(GM, off_bh, offs_n, Lk)
        lag_ends = tl.zeros((2,), dtype=tl.float32)  # mass of tiles entirely at lag <= -W / >= W
        dl_base = DL + off_bh.to(tl.int64) * dl_bh + start_n * (2 * LAG_K - 1) * LAG_T
        dvf = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < Lq
            qT = _load_rows_T(q_base, start_m, sq_m, offs_d, m_ok, D, BLOCK_M)
            sT, bT = _logits(k, qT, qk_scale, alpha_l, offs_m[None, :], offs_n[:, None], offs_m, offs_n, Lq, Lk,
                             off_b, Kpm, skpm_b, P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                             PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_N, BLOCK_M, False, True)
            pT = tl.math.exp2(sT - _lse2(Lse, off_bh, offs_m, Lq)[None, :])
            gr = _vec(GR, off_bh, offs_m, Lq)
            if KL:
                qtT = _load_rows_T(qt_base, start_m, sqt_m, offs_dt, m_ok, DT, BLOCK_M)
                stT, btT = _logits(kt, qtT, qk_scale_t, alpha_t, offs_m[None, :], offs_n[:, None], offs_m, offs_n,
                                   Lq, Lk, off_b, Kpm, skpm_b, Pt_ptr, pt_base, spt_r, spt_c, Pt2_ptr, pt2_base,
                                   spt2_r, spt2_c, PWT, PRIOR_T, MASK_OUT_T, R_PAD_T, CAUSAL, HAS_KPM, IEEE_T,
                                   BLOCK_N, BLOCK_M, False, True)
                ptT = tl.math.exp2(stT - _lse2(LseT, off_bh, offs_m, Lq)[None, :])
                seenT = tl.where(sT == float("-inf"), 0.0, 1.0)  # float, not i1 (see the dq kernel)
                dsT = seenT * ((gr * inv_t)[None, :] * (pT - ptT))
            else:
                dsT = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                if HAS_GM:
                    dsT += pT * (gm[:, None] - _vec(C, off_bh, offs_m, Lq)[None, :])
                if HAS_GH:
                    zT = tl.where(sT == float("-inf"), 0.0, sT * LN2 - _vec(Mu, off_bh, offs_m, Lq)[None, :])
                    dsT -= gr[None, :] * pT * zT
            dk += _dot(dsT.to(qT.dtype), tl.trans(qT), IEEE)
            if NEED_DPRIOR:
                dsaT = dsT * alpha
                if PRIOR == 1:
                    dm = start_m // BLOCK_M - start_n
                    if (dm > -LAG_K) & (dm < LAG_K):
                        diag = _lag_diag_sums(dsaT, BLOCK_M, BLOCK_N, LAG_T)
                        tl.store(dl_base + (dm + LAG_K - 1) * LAG_T + tl.arange(0, LAG_T), diag)
                    else:
                        tot = tl.sum(tl.sum(dsaT, 1), 0)
                        side = tl.where(dm > 0, 1, 0)
                        lag_ends += tl.where(tl.arange(0, 2) == side, tot, 0.0)
                if PRIOR == 3:
                    u = _load_factor(P_ptr, p_base, offs_m, Lq, sp_r, sp_c, PW, R_PAD)
                    dvf += _dot_f32(dsaT, u, IEEE)
        if NEED_DPRIOR:
            if PRIOR == 1:
                ends_base = DL + off_bh.to(tl.int64) * dl_bh + tl.num_programs(0) * (2 * LAG_K - 1) * LAG_T
                tl.store(ends_base + start_n * 2 + tl.arange(0, 2), lag_ends)
            if PRIOR == 3:
                offs_r = tl.arange(0, R_PAD)
                tl.store(DPR + off_bh.to(tl.int64) * Lk * dpr_r + offs_n[:, None].to(tl.int64) * dpr_r
                         + offs_r[None, :], dvf, mask=n_ok[:, None] & (offs_r[None, :] < PW))

    dk = dk * scale
    tl.store(DK + off_b.to(tl.int64) * sdk_b + off_kh.to(tl.int64) * sdk_h
             + offs_n[:, None].to(tl.int64) * sdk_n + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
