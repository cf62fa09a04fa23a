"""Tile helpers shared by the routing kernels: raw score tiles over d in chunks, scaled and masked scores,
and the order-preserving int64 keys of the top-k selection."""

from __future__ import annotations

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-8)  # the torch backend's clamp: cos(q, c) of a zero vector is 0
INT64_MIN = tl.constexpr(-9223372036854775808)
INT64_MAX = tl.constexpr(9223372036854775807)
LOW_BITS = tl.constexpr(2147483647)  # key low word: LOW_BITS - cluster index (lower index wins equal scores)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: 3xTF32 keeps fp32 accuracy on tensor cores
    if IEEE:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _raw_scores(Q, C, q_base, c_base, offs_m, offs_n, N, NC, D, sq_n, sc_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    """``q_i · c_j`` on a (BLOCK_M, BLOCK_N) tile in fp32, d walked in chunks (any d, no padding rule)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = offs_m[:, None].to(tl.int64) * sq_n
    rows_c = offs_n[:, None].to(tl.int64) * sc_n
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        qt = tl.load(Q + q_base + rows_q + dd[None, :], mask=(offs_m[:, None] < N) & (dd[None, :] < D), other=0.0)
        ct = tl.load(C + c_base + rows_c + dd[None, :], mask=(offs_n[:, None] < NC) & (dd[None, :] < D), other=0.0)
        acc += _dot(qt, tl.trans(ct), IEEE)
    return acc


@triton.jit
def _col_scale(RC, Mask, rc_base, m_base, offs_n, NC, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr):
    """(1/|c_j| or 1, valid_j): valid = in range and not absent."""
    valid = offs_n < NC
    if NORMALIZE:
        rc = tl.load(RC + rc_base + offs_n, mask=valid, other=0.0)
    else:
        rc = tl.where(valid, 1.0, 0.0)
    if HAS_MASK:
        absent = tl.load(Mask + m_base + offs_n, mask=valid, other=1)
        valid = valid & (absent == 0)
    return rc, valid


@triton.jit
def _score_key(z, offs_n):
    """int64 key ordered like (z desc, index asc): the float's order-preserving bits in the high word,
    ``LOW_BITS - index`` in the low word. Keys are unique per row."""
    zb = z.to(tl.int32, bitcast=True)
    k32 = tl.where(zb >= 0, zb, zb ^ 0x7FFFFFFF)
    return k32.to(tl.int64) * 4294967296 + (-offs_n[None, :] + LOW_BITS).to(tl.int64)


@triton.jit
def _key_score(key):
    """Inverse of ``_score_key``: (z fp32, cluster index int32)."""
    k32 = (key >> 32).to(tl.int32)
    zb = tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    idx = -(key - ((key >> 32) << 32)).to(tl.int32) + LOW_BITS
    return zb.to(tl.float32, bitcast=True), idx
