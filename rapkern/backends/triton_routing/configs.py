"""Block sizes of the routing kernels: one fixed config per kernel and architecture (no autotuning yet).

Every entry compiles spill-free within the shared-memory limit for sm_80 and sm_90 in fp16, bf16 and
fp32 (tests/test_triton_routing_compile.py) for what the backend runs on a GPU: d, e and row strides
multiples of 16 (the JIT then loads tiles as vectors; the backend declines other d, e on CUDA and
copies misaligned inputs). d and e are walked in chunks, so one config serves every d, e <= MAX_DIM.
Under the interpreter (CPU tests) small blocks make ragged edges and multi-chunk loops
show up at small sizes. Not timed on a GPU yet: these are starting points, not tuned values.

Register allocation differs between Triton versions: the same configs are gated under every version in
``GATED_TRITON`` (tests/test_triton_routing_compile.py runs under each environment of tests/side_env.py).
Under another version they are used unverified (a spill makes a kernel slower, not wrong), and
``describe_table()`` says so.
"""

from __future__ import annotations

MAX_DIM = 1024  # d and e
MAX_TOP_K = 64

# kernel -> (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_E, BLOCK_W, num_warps, num_stages), for 16-bit inputs and fp32
GPU = {
    "fwd": (64, 64, 64, 128, 0, 8, 2),
    "topk_fwd": (32, 64, 64, 64, 0, 8, 2),
    "dq": (64, 64, 64, 64, 64, 8, 1),
    "dc": (64, 64, 64, 64, 64, 8, 1),
    "topk_rows": (32, 0, 0, 0, 64, 4, 1),
    "segment": (32, 0, 0, 0, 128, 4, 1),
}
GPU_FP32 = {
    "fwd": (64, 32, 32, 64, 0, 8, 2),
    "topk_fwd": (32, 32, 32, 64, 0, 8, 2),
    "dq": (64, 32, 32, 32, 32, 8, 1),
    "dc": (64, 32, 32, 32, 32, 8, 1),
    "topk_rows": (32, 0, 0, 0, 64, 4, 1),
    "segment": (32, 0, 0, 0, 128, 4, 1),
}
# (arch, kernel) entries that differ from GPU (16-bit): sm_80's top-k spills 8 bytes with 8 warps
GPU_SM80 = {"topk_fwd": (32, 64, 64, 64, 0, 4, 2)}
INTERPRETER = {k: (16, 16, 16, 16, 16, 1, 1) for k in GPU}


def config(kernel: str, interpreter: bool, fp32: bool = False, arch: int = 90) -> dict:
    """Blocks for ``kernel``; ``arch`` below 90 takes the sm_80 entries, 90 and above the sm_90 ones."""
    if interpreter:
        entry = INTERPRETER[kernel]
    elif fp32:
        entry = GPU_FP32[kernel]
    else:
        entry = GPU_SM80.get(kernel, GPU[kernel]) if arch < 90 else GPU[kernel]
    bm, bn, bd, be, bw, warps, stages = entry
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_E=be, BLOCK_W=bw, num_warps=warps, num_stages=stages)


GATED_TRITON = ((3, 6), (3, 8))


def describe_table() -> str:
    """Which configs the Triton routing kernels use and whether the installed Triton was gated, for
    ``python -m rapkern.info``."""
    from ..triton_attention import _config_tables as T

    v = T.installed_triton()
    gated = " and ".join("%d.%d" % g for g in GATED_TRITON)
    base = f"one fixed config per kernel and architecture, compiled spill-free ahead of time under triton {gated}"
    if v is None:
        return f"{base}; triton not installed"
    if T.parse_version(v) in GATED_TRITON:
        return f"{base}; installed triton {v}: verified"
    return (f"{base}; installed triton {v}: UNVERIFIED (not gated under this version: a kernel may spill "
            f"registers, which costs speed, not correctness; run tests/test_triton_routing_compile.py)")


def k_pad(k: int) -> int:
    return max(2, 1 << (k - 1).bit_length())
