"""TritonAttentionFunction: saves tensors and calls the launchers. Nothing else."""

from __future__ import annotations

import torch

from ..base import alpha_grad, apply_attention_function, guard_double_backward
from .launch import PriorPack, attention_bwd, attention_fwd, reduce_prior_grads


def _unit_last(t):
    """The kernels' precondition: unit stride in the last dim (a copy only when it is not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class TritonAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, v, alpha_t, kpm, *prior_tensors):
        prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
        alpha = alpha_t if alpha_t is not None else cfg["alpha"]
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        pack = PriorPack(prior, q)
        out, lse = attention_fwd(q, k, v, pack, alpha, kpm, cfg["causal"], cfg["scale"], cfg["dropout_p"], cfg["seed"])
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, lse, alpha_t, kpm, *prior_tensors)
        ctx.set_materialize_grads(False)  # an unused out or lse gets no zero-filled gradient
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.no_grad():  # the backward is not differentiable: see guard_double_backward
            grads = TritonAttentionFunction._backward(ctx, dout, dlse)
        return guard_double_backward(grads, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, dout, dlse):
        q, k, v, out, lse, alpha_t, kpm, *prior_tensors = ctx.saved_tensors
        cfg = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:  # rows with no key (lse = -inf) have p = 0: whatever reaches them is dropped
            dlse = dlse.masked_fill(lse == float("-inf"), 0.0)
        prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
        alpha = alpha_t if alpha_t is not None else cfg["alpha"]
        nig = ctx.needs_input_grad
        need_dprior = prior is not None and any(nig[6:])
        need_dalpha = alpha_t is not None and nig[4] and prior is not None
        pack = PriorPack(prior, q)
        dq, dk, dv, dalpha, grads = attention_bwd(
            q, k, v, out, lse, dout, pack, alpha, kpm, cfg["causal"], cfg["scale"], cfg["dropout_p"],
            cfg["seed"], need_dprior, need_dalpha, dlse,
        )
        grads_prior = [None] * len(prior_tensors)
        if need_dprior:
            reduced = reduce_prior_grads(prior_tensors, grads, prior.kind)
            grads_prior = [g if need else None for g, need in zip(reduced, nig[6:])]
        dalpha_out = alpha_grad(alpha_t, dalpha, q.shape[1], nig[4])
        return (
            None,
            dq if nig[1] else None,
            dk if nig[2] else None,
            dv if nig[3] else None,
            dalpha_out,
            None,
            *grads_prior,
        )


def triton_attention(p):
    """Run an ``AttentionProblem`` through the Triton autograd function; returns (out, lse float32)."""
    return apply_attention_function(TritonAttentionFunction, p, 2**31 - 1)  # the kernels' seed is int32
