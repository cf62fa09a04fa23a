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
    # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores (plain "ieee" falls back to FMA loops)
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _dot_f32(a, b, IEEE: tl.constexpr):
    """Products of fp32 tiles of the prior (low-rank factors, their gradients).

    fp32 inputs: 3xTF32 (fp32-accurate on tensor cores). fp16/bf16 inputs: operands rounded to fp16,
    fp32 accumulation -- the rounding the same math in the input dtype has anyway, and far fewer
    registers than an fp32 product.
    """
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))


@triton.jit
def _key_block_range(start_m, Lk, PW, PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys query block ``start_m`` can see (block skipping): the causal prefix, and for a
    banded prior with ``mask_outside`` only the key blocks that meet the band, so work grows as L·w.
    The in-kernel twin of ``Prior.key_range`` plus causal in the torch backend."""
    lo = start_m * 0
    hi = lo + Lk
    if CAUSAL:
        hi = tl.minimum(hi, (start_m + 1) * BLOCK_M)
    if PRIOR == 2:
        if MASK_OUT:
            lo = tl.maximum(start_m * BLOCK_M - PW, 0) // BLOCK_N * BLOCK_N
            hi = tl.minimum(hi, (start_m + 1) * BLOCK_M + PW)
    return lo, hi


@triton.jit
def _load_rows_T(base, start_n, stride, offs_c, n_ok, C, BLOCK_N: tl.constexpr):
    """Rows [start_n, start_n + BLOCK_N) of a (L, C) matrix, transposed to (C_PAD, BLOCK_N); the int64
    row base is computed once per tile, in-tile offsets stay 32-bit."""
    row = base + tl.cast(start_n, tl.int64) * stride
    return tl.load(row + (tl.arange(0, BLOCK_N)[None, :] * stride + offs_c[:, None]),
                   mask=n_ok[None, :] & (offs_c[:, None] < C), other=0.0)


@triton.jit
def _load_factor(ptr, base, offs, n, s_r, s_c, R, R_PAD: tl.constexpr):
    """Rows ``offs`` of a low-rank factor as fp32 (len(offs), R_PAD), zero beyond n rows / R columns."""
    offs_r = tl.arange(0, R_PAD)
    ptrs = ptr + base + offs[:, None].to(tl.int64) * s_r + offs_r[None, :].to(tl.int64) * s_c
    return tl.load(ptrs, mask=(offs[:, None] < n) & (offs_r[None, :] < R), other=0.0).to(tl.float32)


@triton.jit
def _prior_tile(
    P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
    qi, kj, offs_m, offs_n, Lq, Lk,
    PRIOR: tl.constexpr, R_PAD: tl.constexpr, IEEE: tl.constexpr, TRANS: tl.constexpr,
):
    """B[i, j] in fp32 on the tile given by the broadcastable query/key index tensors ``qi``, ``kj``
    ((BM, 1) and (1, BN), or transposed with ``TRANS``); 0 outside valid rows/cols and outside a band
    (masking is the caller's). ``offs_m``/``offs_n`` are the same indices as 1-D vectors."""
    ok = (qi < Lq) & (kj < Lk)
    if PRIOR == 1:
        lag = qi - kj
        idx = tl.minimum(tl.maximum(lag, -PW), PW) + PW
        b = tl.load(P_ptr + p_base + idx.to(tl.int64) * sp_c, mask=ok, other=0.0).to(tl.float32)
    elif PRIOR == 2:
        off = kj - qi + PW
        inside = ok & (off >= 0) & (off <= 2 * PW)
        ptrs = P_ptr + p_base + qi.to(tl.int64) * sp_r + off.to(tl.int64) * sp_c
        b = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    elif PRIOR == 3:
        u = _load_factor(P_ptr, p_base, offs_m, Lq, sp_r, sp_c, PW, R_PAD)
        w = _load_factor(P2_ptr, p2_base, offs_n, Lk, sp2_r, sp2_c, PW, R_PAD)
        if TRANS:
            b = _dot_f32(w, tl.trans(u), IEEE)
        else:
            b = _dot_f32(u, tl.trans(w), IEEE)
    else:
        ptrs = P_ptr + p_base + qi.to(tl.int64) * sp_r + kj.to(tl.int64) * sp_c
        b = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    return b


@triton.jit
def _logits(
    a, b_op, qk_scale, alpha, qi, kj, offs_m, offs_n, Lq, Lk, off_b, Kpm, skpm_b,
    P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
    PRIOR: tl.constexpr, MASK_OUT: tl.constexpr, R_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
    FORCE_PRIOR: tl.constexpr, TRANS: tl.constexpr,
):
    """Masked logits ``a @ b_op`` (q·kᵀ, or k·qᵀ with ``TRANS``) in the log2 domain, -inf where a key is
    not visible, and the prior tile (0 if none). ``qk_scale`` = scale·log2(e)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    s = _dot(a, b_op, IEEE) * qk_scale
    valid = (qi >= 0) & (kj < Lk)
    if CAUSAL:
        valid = valid & (kj <= qi)
    if HAS_KPM:
        pad = tl.load(Kpm + off_b.to(tl.int64) * skpm_b + kj, mask=kj < Lk, other=1)
        valid = valid & (pad == 0)
    b = tl.zeros((ROWS, COLS), dtype=tl.float32)
    if PRIOR == 2:
        if MASK_OUT:
            off = kj - qi + PW
            valid = valid & (off >= 0) & (off <= 2 * PW)
    if PRIOR == 4:
        # a -inf in a user's dense bias masks for every alpha, even 0
        b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                        qi, kj, offs_m, offs_n, Lq, Lk, PRIOR, R_PAD, IEEE, TRANS)
        hole = b == float("-inf")
        valid = valid & (hole == 0)
        b = tl.where(hole, 0.0, b)
        s = s + (alpha * LOG2E) * b
    elif PRIOR != 0:
        if FORCE_PRIOR:  # d(alpha) needs B even where alpha = 0
            b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                            qi, kj, offs_m, offs_n, Lq, Lk, PRIOR, R_PAD, IEEE, TRANS)
            s = s + (alpha * LOG2E) * b
        else:
            if alpha != 0:  # heads with alpha = 0 skip the prior read
                b = _prior_tile(P_ptr, p_base, sp_r, sp_c, P2_ptr, p2_base, sp2_r, sp2_c, PW,
                                qi, kj, offs_m, offs_n, Lq, Lk, PRIOR, R_PAD, IEEE, TRANS)
                s = s + (alpha * LOG2E) * b
    s = tl.where(valid, s, float("-inf"))
    return s, b


@triton.jit
def _dropout_uniform(seed, off_bh, offs_m, start_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Uniform [0, 1) numbers for the dropout keep mask (kept where >= p), a function of
    (seed, b·Hq + h, i, j) only (not of the tile shape), so
    forward and backward regenerate the same bits whatever blocks each was tuned to.

    One Philox call on the counter (j // 4, i, b·Hq + h, 0) yields four words, used for keys
    4(j // 4) .. 4(j // 4) + 3: a quarter of the Philox work and registers of one call per element.
    Needs BLOCK_N % 4 == 0 and start_n % 4 == 0.
    """
    QN: tl.constexpr = BLOCK_N // 4
    zero = (offs_m[:, None] * 0 + tl.arange(0, QN)[None, :] * 0).to(tl.uint32)
    c0 = zero + (start_n // 4 + tl.arange(0, QN))[None, :].to(tl.uint32)
    c1 = zero + offs_m[:, None].to(tl.uint32)
    c2 = zero + off_bh.to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, c0, c1, c2, zero)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    # floats, not a bool tile: layout conversions of i1 tiles through shared memory do not compile
    return tl.random.uint_to_uniform_float(r)
