"""Autotune configurations for the Triton attention kernels, per kernel, architecture and head dim.

Each entry is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, listed large to small. The autotuner is
given the union (``all_configs``) and prunes at launch to ``configs_for(kernel, arch, d_pad, heavy)``:
the list for the GPU's architecture and the padded head dim; "heavy" launches (``is_heavy``: more live
tiles) keep only the smallest entry.
Choices come from ahead-of-time compiles (registers / spills / shared memory, see
tests/test_triton_compile.py), not from timings: no GPU was available when they were written.

The autotune key is a power-of-two bucket of Lq and Lk (``length_bucket``), so a new length retunes only
when it crosses a power of two.
"""

from __future__ import annotations

# TABLE[kernel][arch][head-dim bucket]: sm80 keeps operands of mma.sync in registers, so it needs
# smaller tiles than sm90 to stay spill-free (and has 163 KB of shared memory, not 227 KB).
TABLE = {
    "fwd": {
        80: {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             128: [(64, 64, 4, 3), (64, 32, 4, 2)],
             256: [(64, 64, 8, 2)]},
        90: {64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
             256: [(128, 32, 8, 2), (64, 64, 8, 2)]},
    },
    "dq": {
        80: {64: [(64, 32, 4, 2), (32, 32, 4, 1)],
             128: [(64, 128, 8, 2), (64, 32, 4, 2)],
             256: [(32, 32, 4, 1)]},
        90: {64: [(64, 64, 4, 2), (64, 128, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
             128: [(128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2)],
             256: [(64, 32, 8, 1), (32, 32, 4, 1)]},
    },
    "dkdv": {
        80: {64: [(32, 64, 8, 2)],
             128: [(32, 64, 8, 2)],
             256: [(16, 64, 8, 1)]},
        90: {64: [(64, 64, 4, 2), (32, 128, 8, 2), (32, 64, 4, 2)],
             128: [(32, 128, 8, 2), (32, 64, 8, 2)],
             256: [(32, 64, 8, 1), (16, 64, 8, 1)]},
    },
}
HEAVY_KEEP = 1  # heavy launches keep this many of the smallest configs

# dk/dv with a lag-table gradient runs one square tile (not autotuned: the host decodes its layout)
LAG_GRAD = {64: (32, 32, 4, 1), 128: (32, 32, 8, 1), 256: (32, 32, 8, 1)}

# Block sizes used under TRITON_INTERPRET=1 (no tuning: the interpreter runs programs one at a time).
INTERPRET_FWD = (32, 32, 4, 1)
INTERPRET_BWD = (32, 32, 4, 1)
MIN_BLOCK = 16  # partial buffers are sized for this block size (the smallest in any table)


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


def _bucket(d_pad: int) -> int:
    return 64 if d_pad <= 64 else (128 if d_pad <= 128 else 256)


def configs_for(kernel: str, arch: int, d_pad: int, heavy: bool = False) -> list[tuple]:
    """The configs the autotuner may pick for ``kernel`` ("fwd", "dq", "dkdv") on sm_<arch>."""
    cands = TABLE[kernel][90 if arch >= 90 else 80][_bucket(d_pad)]
    return list(cands[-HEAVY_KEEP:] if heavy else cands)


def lag_grad_config(arch: int, d_pad: int) -> tuple:
    return LAG_GRAD[_bucket(d_pad)]


def all_configs(kernel: str) -> list[tuple]:
    """Union over architectures and head dims (what triton.autotune is given); pruned at launch."""
    seen: list[tuple] = []
    for per_arch in TABLE[kernel].values():
        for cands in per_arch.values():
            for c in cands:
                if c not in seen:
                    seen.append(c)
    return seen


def is_heavy(kernel: str, meta: dict) -> bool:
    """Launches with more live state than the plain loop; they get only the smallest config: in-kernel
    dropout; in backward, lag/low-rank prior gradients and dense bias tiles; in forward, lag/low-rank/
    dense priors at head dims above 64."""
    prior = meta.get("PRIOR", 0)
    if meta.get("DROPOUT"):
        return True
    if kernel == "fwd":
        return prior in (1, 3, 4) and max(meta.get("D_PAD", 64), meta.get("DV_PAD", 64)) > 64
    return prior == 4 or (bool(meta.get("NEED_DPRIOR")) and prior == 3)


AOT_HEAD_DIMS = (64, 128, 256)
