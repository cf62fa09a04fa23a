"""The "triton_routing" backend: fused Triton kernels for ``lda_route`` (dense and top-k, fwd and bwd).

Algorithm. Forward, one program per (query block, e chunk, group): the query norms in a first pass
over d, then cluster tiles ``x = q·cᵀ`` (d walked in chunks, so d and e up to 1024), scaled by the
inverse norms (centroid norms once per call) and log2(e)/τ, an online softmax in exp2 with fp32
accumulators, and ``acc += p·a``; e is split across programs when it does not fit one accumulator.
Top-k (k <= 64): per query block a running set of the k largest int64 keys (the score's
order-preserving bits, then the inverted index, so equal scores go to the lower index as documented),
admitted against the set's minimum, then the k winners' softmax and a gathered weighted sum of the
answers: no N×n buffer and no second matmul. Backward (dense): one kernel per query block for
``U = dX·C`` and one per cluster block for ``V = dXᵀ·Q`` and ``dA = Pᵀ·dout``, tiles recomputed from
the saved log2-LSE; top-k backward runs through the selected entries (a row kernel for U and the score
gradients, then a segmented sum per cluster over the entries sorted by cluster). Every sum has a fixed
order: no atomics, bitwise-reproducible. The normalization Jacobians and the temperature gradient
(``dτ = -(1/τ) Σ q·U``) are O(N·d) torch ops in function.py. ``cluster_mask`` is read per tile.
``return_weights=True`` runs the torch backend's differentiable dense path (the caller asked for the
N×n weights anyway).

Limits (each a reason): fp16/bf16/fp32 (bf16 not under the interpreter); d, e <= 1024 (on a GPU
multiples of 16: the specialization checked spill-free; inputs with other strides are copied); top_k <= 64;
CPU tensors only under TRITON_INTERPRET=1 (tests). Hardware: configs written for sm_80/sm_90 and
checked ahead of time (spill-free, shared memory within limits: tests/test_triton_routing_compile.py);
verified numerically only through the Triton interpreter on CPU: **not yet run or timed on a GPU**.
"""

from __future__ import annotations

import torch

from ..base import Backend, triton_reasons
from . import configs as C

_IMPORT_ERROR: str | None = None
try:  # never fail at import on a machine without triton
    from .function import triton_route
except Exception as e:  # pragma: no cover - depends on the machine
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    triton_route = None


class TritonRoutingBackend(Backend):
    name = "triton_routing"
    devices = ("cuda", "cpu")
    auto_devices = ("cuda",)
    dtypes = ("float16", "bfloat16", "float32")
    deterministic = True

    def availability(self):
        if _IMPORT_ERROR is not None:
            return f"triton not importable: {_IMPORT_ERROR}"
        return None

    def route_reasons(self, p):
        dev = p.device.type
        why = triton_reasons(self.devices, dev, p.dtype)
        d, e = p.q.shape[-1], p.answers.shape[-1]
        if d > C.MAX_DIM or e > C.MAX_DIM:
            why.append(f"feature dims d = {d}, e = {e} must be <= {C.MAX_DIM}")
        elif dev == "cuda" and (d % 16 or e % 16):
            why.append(f"feature dims d = {d}, e = {e} must be multiples of 16 on a GPU (spill-free configs)")
        if p.top_k is not None and p.top_k > C.MAX_TOP_K and p.top_k < p.centroids.shape[1]:
            why.append(f"top_k = {p.top_k} > {C.MAX_TOP_K}")
        return why

    def route(self, p, return_weights=False):
        from ..torch_blocked.routing import _scaled_inputs, _with_weights, compute_dtype

        if return_weights:  # differentiable weights (N, n) or (N, k): the torch backend's plain path
            qs, cs, a, bias, keep = _scaled_inputs(p, compute_dtype(p.dtype))
            out, w, idx = _with_weights(p, qs, cs, a, bias)
            return _finish(p, out, w, idx, keep)
        mask, keep = p.cluster_mask, None
        if mask is not None:
            empty = mask.all(-1)
            if bool(empty.any()):  # groups with no present cluster: computed unmasked, then zeroed
                mask = mask & ~empty[:, None]
                keep = (~empty).to(p.dtype).view(-1, 1, 1)
        top_k = p.top_k if p.top_k is not None and p.top_k < p.centroids.shape[1] else None
        out = triton_route(p.q, p.centroids, p.answers, mask, p.tau, p.tau_value, top_k, p.normalize)
        return _finish(p, out, None, None, keep)


def _finish(p, out, w, idx, keep):
    if keep is not None:
        out = out * keep.to(out.dtype)
        if w is not None:
            w = w * keep.to(w.dtype)
        if idx is not None:
            idx = torch.where(keep.bool(), idx, torch.arange(idx.shape[-1], device=idx.device).expand_as(idx))
    return out.to(p.dtype), None if w is None else w.to(p.dtype), idx
