"""Autotune configurations for the Triton attention kernels, per architecture.

Each entry is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``. The forward tunes over all four; the two
backward kernels tune too. Configs are pruned by head dim (``prune``) so large head dims never try tiles
that would spill or overflow shared memory. ``AOT_CASES`` is what tests/test_triton_compile.py
compiles for sm_80 and sm_90: every config the autotuner may pick for a representative head dim.

The autotune key is a coarse bucket of the sequence lengths (``length_bucket``), so a new length only
retunes when it crosses a power of two.
"""

from __future__ import annotations

FWD = {
    80: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    90: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
}
BWD = {
    80: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    90: [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
}

# Tiles allowed per padded head dim (max of D_PAD, DV_PAD): BLOCK_M * BLOCK_N upper bound for fwd/bwd.
_MAX_TILE = {
    "fwd": {16: 128 * 128, 32: 128 * 128, 64: 128 * 128, 128: 128 * 64, 256: 64 * 64},
    "bwd": {16: 64 * 128, 32: 64 * 128, 64: 64 * 64, 128: 64 * 64, 256: 32 * 32},
}

# Block sizes used under TRITON_INTERPRET=1 (no tuning: the interpreter runs programs one at a time).
INTERPRET_FWD = (32, 32, 4, 1)
INTERPRET_BWD = (32, 32, 4, 1)


def length_bucket(n: int) -> int:
    """Next power of two (min 64): the autotune key, so new lengths rarely trigger a retune."""
    b = 64
    while b < n:
        b *= 2
    return b


def pad_dim(d: int) -> int:
    p = 16
    while p < d:
        p *= 2
    return p


def allowed(kind: str, cfg: tuple, d_pad: int, rank_pad: int = 16) -> bool:
    bm, bn, _w, _s = cfg
    limit = _MAX_TILE[kind][max(16, min(256, d_pad))]
    return bm * bn <= limit


def configs_for(kind: str, arch: int, d_pad: int) -> list[tuple]:
    table = FWD if kind == "fwd" else BWD
    base = table[90 if arch >= 90 else 80]
    out = [c for c in base if allowed(kind, c, d_pad)]
    if not out:
        out = [(32, 32, 4, 1)]
    return out


def all_configs(kind: str) -> list[tuple]:
    """Union over architectures (what triton.autotune is given); pruned at run time per arch/head dim."""
    seen: list[tuple] = []
    for arch in (80, 90):
        for c in (FWD if kind == "fwd" else BWD)[arch]:
            if c not in seen:
                seen.append(c)
    # the fallback used when every config is pruned
    if (32, 32, 4, 1) not in seen:
        seen.append((32, 32, 4, 1))
    return seen


AOT_HEAD_DIMS = (64, 128, 256)
