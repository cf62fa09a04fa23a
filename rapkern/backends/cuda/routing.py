"""``lda_route`` through ``rapkern::route_fwd`` / ``route_bwd`` (csrc/cuda/route_*, issue 15): dense and top-k,
forward and backward (deterministic: fixed-order sums, no atomics).

UNVERIFIED ON A GPU: the kernels compile without spills and their code matches reference_lda_route (values and
gradients) under the host emulation (tests/test_cuda_routing.py); no GPU has run them.
"""

from __future__ import annotations

import torch

from ..base import guard_double_backward, unnormalize_grad

MAX_TOP_K = 64  # csrc/cuda/route_params.h kRouteMaxTopK: the top-k kernel keeps the winners in shared memory
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_NORM_EPS = 1e-8  # as reference_lda_route and the kernels


def route_reasons(p) -> list[str]:
    why = []
    if p.device.type != "cuda":
        why.append(f"device type {p.device.type!r} not in ('cuda',)")
    if p.dtype not in _DTYPES:
        why.append(f"dtype {p.dtype} not supported by the CUDA routing kernels (float16, bfloat16, float32)")
    n = p.centroids.shape[1]
    if p.top_k is not None and MAX_TOP_K < p.top_k < n:
        why.append(f"top_k = {p.top_k} > {MAX_TOP_K} (the CUDA top-k kernel's limit; triton_routing has the same)")
    return why


def cuda_route(p, return_weights: bool):
    """(out, weights, indices) with a leading group dim, as ``Backend.route`` returns them."""
    if return_weights:  # the caller asked for the N x n (or N x k) weights: the torch backend's plain path
        from ..torch_blocked.routing import route

        return route(p, True)
    n = p.centroids.shape[1]
    top_k = p.top_k if p.top_k is not None and p.top_k < n else 0  # top_k = n: every cluster, the dense kernel
    tau_t = p.tau if isinstance(p.tau, torch.Tensor) else None
    cfg = (p.tau_value, p.normalize, top_k)
    return CudaRouteFunction.apply(cfg, p.q, p.centroids, p.answers, p.cluster_mask, tau_t), None, None


def _inv_norm(x):
    return x.float().norm(dim=-1).clamp_min(_NORM_EPS).reciprocal()


class CudaRouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, c, a, mask, tau_t):
        tau, normalize, top_k = cfg
        out, lse, w, idx = torch.ops.rapkern.route_fwd(q, c, a, mask, tau, normalize, top_k)
        ctx.save_for_backward(q, c, a, mask, out, lse, w, idx, tau_t)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.no_grad():
            grads = CudaRouteFunction._backward(ctx, dout)
        return guard_double_backward(grads, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, dout):
        tau, normalize, top_k = ctx.cfg
        q, c, a, mask, out, lse, w, idx, tau_t = ctx.saved_tensors
        u, v, da, dz_logp = torch.ops.rapkern.route_bwd(dout, q, c, a, mask, tau, normalize, top_k, out, lse, w,
                                                        idx)
        nig = ctx.needs_input_grad
        dtau = None
        if tau_t is not None and nig[5]:  # z = x·rq·rc/τ: dτ = -(1/τ) Σ dZ·z = -(1/τ) Σ dZ·log P (Σ_j dZ_ij = 0)
            dtau = (-dz_logp.double().sum() / tau).to(tau_t.dtype).reshape(tau_t.shape)
        dq = dc = None
        if nig[1]:
            dq = (unnormalize_grad(q, u, _inv_norm(q)) if normalize else u).to(q.dtype)
        if nig[2]:
            dc = (unnormalize_grad(c, v, _inv_norm(c)) if normalize else v).to(c.dtype)
        return None, dq, dc, da.to(a.dtype) if nig[3] else None, None, dtau
