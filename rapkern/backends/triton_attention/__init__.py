"""The "triton" backend: fused FlashAttention-2-style kernels that read the prior compactly in-kernel.

Algorithm: forward is an online softmax over key tiles (exp2 with log2(e) folded into the scale, fp32
accumulators) that adds ``α_h·B`` with B gathered from the compact prior per tile (lag-table gather,
band values read only inside the band, low-rank u·vᵀ as an in-tile product, dense tiles through strides
with stride 0 on broadcast dims). Heads with α = 0 skip the prior read. Causal and banded
``mask_outside`` priors shrink the loop bounds (block skipping), so banded work grows as L·w. Dropout
is a Philox counter-based mask keyed on (seed, b, h, i, j), regenerated in backward. Backward recomputes
tiles from the LSE in two kernels (dq, and key-major dk/dv), writes prior-gradient partials per block
and reduces them on the host in a fixed order: no atomics anywhere, bitwise-reproducible gradients.

Layering: _fwd_kernel.py / _dq_kernel.py / _dkdv_kernel.py (@triton.jit, _common.py holds the prior tile) ->
launch.py (allocation, grids, autotune over configs.py) -> ops.py (the torch.library ops
``rapkern_triton::attention_fwd`` / ``attention_bwd`` with fake implementations, so torch.compile with
fullgraph=True records them as opaque nodes) -> function.py (their autograd) -> here.

Limits (each is a reason, never a crash): fp16/bf16/fp32 (bf16 not under the interpreter); head dims
D, Dv <= 256; low-rank rank <= 128; a lag table whose gradient is needed
has 2W+1 <= 16385 entries (its scratch grows with W); CPU tensors only under ``TRITON_INTERPRET=1``.
fp32 inputs use 3xTF32 dots. The kernels index q, k, v, out, dout with unit stride in the last dim: an
input with another last stride is copied once (function.py), which costs O(L·D) against the O(L²·D) of
the kernels, far less than falling back to the torch backend would.

Hardware: written for sm80/sm90 (configs.py). Verified on CPU through the Triton interpreter and by
ahead-of-time compilation for sm_80/sm_90 (resource usage in tests/test_triton_compile.py); not yet
run or timed on a GPU when this was written.
"""

from __future__ import annotations

import torch

from ..base import Backend, triton_reasons
from . import configs as C

_IMPORT_ERROR: str | None = None
try:  # never fail at import on a machine without triton
    from .function import triton_attention
except Exception as e:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    triton_attention = None

_STATS_IMPORT_ERROR: str | None = None
try:  # attention_stats / attention_kl kernels (stats.py)
    from . import stats as _stats
except Exception as e:  # pragma: no cover - depends on the machine
    _STATS_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    _stats = None

MAX_HEAD_DIM = 256
MAX_RANK = 128
MAX_LAG_GRAD_ENTRIES = 16385  # scratch grows as B·Hq·Lk·(4W/32 + 6) floats


@torch.compiler.assume_constant_result
def _arch(device: torch.device) -> int:
    """sm_<arch> of a CUDA device. A constant under torch.compile: Dynamo would otherwise record the
    capability query as a graph node (it is not one of the functions it constant-folds)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _routing():
    from .. import dispatch

    return dispatch.get("triton_routing")


class TritonBackend(Backend):
    name = "triton"
    devices = ("cuda", "cpu")
    auto_devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    deterministic = True

    def availability(self):
        if _IMPORT_ERROR is not None:
            return f"triton not importable: {_IMPORT_ERROR}"
        return None

    def attention_reasons(self, p):
        dev = p.device.type
        why = triton_reasons(self.devices, dev, p.dtype)
        if p.head_dim > MAX_HEAD_DIM or p.head_dim_v > MAX_HEAD_DIM:
            why.append(f"head dims D = {p.head_dim}, Dv = {p.head_dim_v} must be <= {MAX_HEAD_DIM}")
        if p.prior is not None:
            if p.prior.kind == "lowrank" and p.prior.rank > MAX_RANK:
                why.append(f"LowRankPrior rank {p.prior.rank} > {MAX_RANK}")
            if p.prior.kind == "lag" and p.prior.table.requires_grad:
                n = p.prior.table.shape[-1]
                if n > MAX_LAG_GRAD_ENTRIES:
                    why.append(
                        f"RelativeLagPrior table with {n} > {MAX_LAG_GRAD_ENTRIES} entries cannot get a gradient"
                    )

        if dev == "cuda" and not why:
            grad = torch.is_grad_enabled()
            spill = C.unsupported_reason(
                _arch(p.device), max(p.head_dim, p.head_dim_v), p.dtype == torch.float32, p.dropout_p > 0,
                p.prior_kind, grad and p.needs_prior_grad, grad and p.needs_alpha_grad and p.prior is not None,
            )
            if spill:
                why.append(spill)
        return why

    def attention(self, p):
        return triton_attention(p)

    # lda_route: backend="triton" serves it through the routing kernels (rapkern/backends/triton_routing/)
    def route_reasons(self, p):
        return _routing().route_reasons(p)

    def route(self, p, return_weights=False):
        return _routing().route(p, return_weights)

    # attention_stats / attention_kl: kernels and limits in stats.py
    def stats_reasons(self, p):
        if _stats is None:
            return [f"triton statistics kernels not importable: {_STATS_IMPORT_ERROR}"]
        return _stats.stats_reasons(p)

    def attention_stats(self, p):
        return _stats.triton_stats(p)

    def kl_reasons(self, p):
        if _stats is None:
            return [f"triton statistics kernels not importable: {_STATS_IMPORT_ERROR}"]
        return _stats.kl_reasons(p)

    def attention_kl(self, p):
        return _stats.triton_kl(p)
