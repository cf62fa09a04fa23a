"""Diagonal sums of a key-major tile (the lag-table gradient), shared by the dk/dv kernel and the
statistics kernels (_stats_kernels.py)."""

import triton
import triton.language as tl


@triton.jit
def _lag_diag_sums(dsaT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAG_T: tl.constexpr):
    """Diagonal sums of one key-major tile ``dsaT[c, r]`` (key c, query r): g[t] = Σ over r - c = t - (BN - 1),
    i.e. lag i - j = (i0 - j0) - (BLOCK_N - 1) + t. Each key row is read skewed (``tl.gather``) so that
    column t holds that row's entry of diagonal t; a column sum finishes. No scatter, fixed order."""
    c = tl.arange(0, BLOCK_N)[:, None]
    t = tl.arange(0, LAG_T)[None, :]
    r = c + t - (BLOCK_N - 1)
    ok = (r >= 0) & (r < BLOCK_M)
    skew = tl.gather(dsaT, tl.minimum(tl.maximum(r, 0), BLOCK_M - 1), 1)
    return tl.sum(tl.where(ok, skew, 0.0), 0)
