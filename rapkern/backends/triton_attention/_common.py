"""Device helpers shared by the forward and backward kernels: one tile of the prior, read compactly.

Prior kinds (``PRIOR`` constexpr): 0 none, 1 lag table, 2 banded, 3 low-rank, 4 dense. Semantics are
those of rapkern/priors.py; the prior tensor is addressed as (Bp, Hp, rows, cols) through strides, with
stride 0 on a broadcast lead dim (the caller folds b/h offsets into ``p_base``).
"""

import triton
import triton.language as tl

PRIOR_NONE = 0
PRIOR_LAG = 1
PRIOR_BANDED = 2
PRIOR_LOWRANK = 3
PRIOR_DENSE = 4


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_factor(ptr, base, offs, n, s_r, s_c, R, R_PAD: tl.constexpr):
    """Rows ``offs`` of a low-rank factor as fp32 (len(offs), R_PAD), zero beyond n rows / R columns."""
    offs_r = tl.arange(0, R_PAD)
    ptrs = ptr + base + offs[:, None].to(tl.int64) * s_r + offs_r[None, :].to(tl.int64) * s_c
    return tl.load(ptrs, mask=(offs[:, None] < n) & (offs_r[None, :] < R), other=0.0).to(tl.float32)


@triton.jit
def _prior_tile(
    P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
    offs_m, offs_n, Lq, Lk,
    PRIOR: tl.constexpr, R_PAD: tl.constexpr,
):
    """B[offs_m, offs_n] in fp32; 0 outside valid rows/cols and outside a band (masking is the caller's)."""
    ok = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    if PRIOR == 1:
        lag = offs_m[:, None] - offs_n[None, :]
        idx = tl.minimum(tl.maximum(lag, -PW), PW) + PW
        b = tl.load(P_ptr + p_base + idx.to(tl.int64) * sp_c, mask=ok, other=0.0).to(tl.float32)
    elif PRIOR == 2:
        off = offs_n[None, :] - offs_m[:, None] + PW
        inside = ok & (off >= 0) & (off <= 2 * PW)
        ptrs = P_ptr + p_base + offs_m[:, None].to(tl.int64) * sp_r + off.to(tl.int64) * sp_c
        b = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    elif PRIOR == 3:
        u = _load_factor(P_ptr, p_base, offs_m, Lq, sp_r, sp_c, PW, R_PAD)
        w = _load_factor(P2_ptr, p2_base, offs_n, Lk, sp2_r, sp2_c, PW, R_PAD)
        b = tl.dot(u, tl.trans(w), input_precision="ieee")
    else:
        ptrs = P_ptr + p_base + offs_m[:, None].to(tl.int64) * sp_r + offs_n[None, :].to(tl.int64) * sp_c
        b = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    return b


@triton.jit
def _logits(
    q, k, qk_scale, alpha, offs_m, offs_n, Lq, Lk, off_b, Kpm, skpm_b,
    P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FORCE_PRIOR: tl.constexpr,
):
    """Masked logits in the log2 domain (-inf where a key is not visible) and the prior tile (0 if none).

    ``k`` is the (D_PAD, BLOCK_N) transposed key tile; ``qk_scale`` = scale·log2(e).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    s = _dot(q, k, IEEE) * qk_scale
    valid = (offs_m[:, None] >= 0) & (offs_n[None, :] < Lk)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if HAS_KPM:
        pad = tl.load(Kpm + off_b.to(tl.int64) * skpm_b + offs_n, mask=offs_n < Lk, other=1)
        valid = valid & (pad[None, :] == 0)
    b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PRIOR == 2:
        if MASK_OUT:
            off = offs_n[None, :] - offs_m[:, None] + PW
            valid = valid & (off >= 0) & (off <= 2 * PW)
    if PRIOR == 4:
        # a -inf in a user's dense bias masks for every alpha, even 0
        b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                        offs_m, offs_n, Lq, Lk, PRIOR, R_PAD)
        hole = b == float("-inf")
        valid = valid & (hole == 0)
        b = tl.where(hole, 0.0, b)
        s = s + (alpha * LOG2E) * b
    elif PRIOR != 0:
        if FORCE_PRIOR:  # d(alpha) needs B even where alpha = 0
            b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                            offs_m, offs_n, Lq, Lk, PRIOR, R_PAD)
            s = s + (alpha * LOG2E) * b
        else:
            if alpha != 0:  # heads with alpha = 0 skip the prior read
                b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                                offs_m, offs_n, Lq, Lk, PRIOR, R_PAD)
                s = s + (alpha * LOG2E) * b
    s = tl.where(valid, s, float("-inf"))
    return s, b


@triton.jit
def _dropout_keep(seed, dropout_p, off_bh, Lq, Lk, offs_m, offs_n):
    """Counter-based keep mask: the same (seed, b, h, i, j) gives the same bit in forward and backward."""
    offs = (off_bh.to(tl.int64) * Lq + offs_m[:, None].to(tl.int64)) * Lk + offs_n[None, :].to(tl.int64)
    return tl.rand(seed, offs) >= dropout_p
