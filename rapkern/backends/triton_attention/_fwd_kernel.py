"""Forward kernel: one program per (query block, batch·head); FlashAttention-2 online softmax in exp2.

Logits ``scale·q kᵀ + α_h·B`` are built tile by tile with the prior read compactly (_common._prior_tile);
fp32 accumulators; causal and ``mask_outside`` bands shrink the key loop bounds (block skipping).
"""

import triton
import triton.language as tl

from ._common import _dot, _dropout_uniform, _key_block_range, _load_rows_T, _logits


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
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // Hq
    off_h = off_bh % Hq
    off_kh = off_h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_ok = offs_m < Lq

    q_ptrs = (Q + off_b.to(tl.int64) * sq_b + off_h.to(tl.int64) * sq_h
              + offs_m[:, None].to(tl.int64) * sq_m + offs_d[None, :])
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + off_b.to(tl.int64) * sk_b + off_kh.to(tl.int64) * sk_h
    v_base = V + off_b.to(tl.int64) * sv_b + off_kh.to(tl.int64) * sv_h
    p_base = off_b.to(tl.int64) * sp_b + off_h.to(tl.int64) * sp_h
    p2_base = off_b.to(tl.int64) * sp2_b + off_h.to(tl.int64) * sp2_h
    alpha = tl.load(Alpha + off_h)

    lo, hi = _key_block_range(start_m, Lk, PW, PRIOR, MASK_OUT, CAUSAL, BLOCK_M, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, DV_PAD), dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = _load_rows_T(k_base, start_n, sk_n, offs_d, n_ok, D, BLOCK_N)
        s, b = _logits(q, kT, qk_scale, alpha, offs_m[:, None], offs_n[None, :], offs_m, offs_n, Lq, Lk,
                       off_b, Kpm, skpm_b,
                       P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                       PRIOR, MASK_OUT, R_PAD, CAUSAL, HAS_KPM, IEEE, BLOCK_M, BLOCK_N, False, False)
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
        v_row = v_base + tl.cast(start_n, tl.int64) * sv_n
        v = tl.load(v_row + (tl.arange(0, BLOCK_N)[:, None] * sv_n + offs_dv[None, :]),
                    mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    dead = l_i == 0.0  # no visible key: output 0, lse -inf
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (Out + off_b.to(tl.int64) * so_b + off_h.to(tl.int64) * so_h
              + offs_m[:, None].to(tl.int64) * so_m + offs_dv[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + off_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)
