"""TritonRouteFunction: saves tensors, calls the launchers, applies the normalization Jacobians."""

from __future__ import annotations

import torch

from ..base import guard_double_backward, unnormalize_grad
from .launch import col_scale, route_bwd, route_fwd, route_topk_bwd, route_topk_fwd


def _unit_last(t):
    """Unit last stride; on a GPU also 16-divisible row/group strides and a 16-byte aligned start, the
    specialization whose configs are checked spill-free ahead of time (an O(rows·d) copy otherwise)."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if t.is_cuda and (t.data_ptr() % 16 or any(s % 16 for s in t.stride()[:-1])):
        return t.contiguous()
    return t


class TritonRouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, c, a, mask, tau_t):
        tau, k, normalize = cfg["tau"], cfg["top_k"], cfg["normalize"]
        q, c, a = _unit_last(q), _unit_last(c), _unit_last(a)
        rc = col_scale(c, normalize)
        if k is None:
            out, lse, rq = route_fwd(q, c, a, rc, mask, tau, normalize)
            ctx.save_for_backward(q, c, a, rc, mask, rq, lse, out, tau_t)
        else:
            out, w, idx, rq = route_topk_fwd(q, c, a, rc, mask, tau, normalize, k)
            ctx.save_for_backward(q, c, a, rc, mask, rq, w, idx, tau_t)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.no_grad():
            grads = TritonRouteFunction._backward(ctx, dout)
        return guard_double_backward(grads, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, dout):
        cfg = ctx.cfg
        tau, normalize = cfg["tau"], cfg["normalize"]
        q, c, a, rc, mask, rq, s1, s2, tau_t = ctx.saved_tensors
        dout = _unit_last(dout)
        if cfg["top_k"] is None:
            u, v, da = route_bwd(q, c, a, rc, mask, tau, normalize, s2, s1, rq, dout)
        else:
            u, v, da = route_topk_bwd(q, c, a, rc, normalize, tau, s1, s2, rq, dout)
        nig = ctx.needs_input_grad
        dtau = None
        if tau_t is not None and nig[5]:  # d/dτ of x·rq·rc/τ summed against dX: -(1/τ) Σ_i q_i·U_i
            dtau = (-(q.float() * u).sum() / tau).to(tau_t.dtype).reshape(tau_t.shape)
        dq = dc = None
        if nig[1]:
            dq = (unnormalize_grad(q, u, rq) if normalize else u).to(q.dtype)
        if nig[2]:
            dc = (unnormalize_grad(c, v, rc) if normalize else v).to(c.dtype)
        return None, dq, dc, da.to(a.dtype) if nig[3] else None, None, dtau


def triton_route(q, c, a, mask, tau, tau_value: float, top_k, normalize):
    tau_t = tau if isinstance(tau, torch.Tensor) else None
    cfg = {"tau": tau_value, "top_k": top_k, "normalize": normalize}
    return TritonRouteFunction.apply(cfg, q, c, a, mask, tau_t)
