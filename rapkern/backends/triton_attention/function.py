"""Autograd of ``rapkern_triton::attention_fwd`` (ops.py): saves tensors, calls the backward op. Nothing else.

Registered with ``torch.library.register_autograd``, so eager mode and ``torch.compile`` run the same
formula: the gradient reaching the LSE (dlse) is honoured, an unused out or lse gets no zero-filled gradient
(``set_materialize_grads(False)``), the dropout seed travels to the backward as a tensor, α's gradient is
summed for a scalar α, and differentiating the gradients again raises (base.guard_double_backward).
"""

from __future__ import annotations

import torch

from ..base import alpha_grad, guard_double_backward
from .ops import _unit_last, attention_bwd, attention_fwd, prior_args

_SEED_MAX = 2**31 - 1  # the kernels' seed is int32


def _setup_context(ctx, inputs, output):
    q, k, v, alpha, kpm, p0, p1, kind, mask_outside, alpha_value, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alpha, kpm, p0, p1, seed)
    ctx.args = (kind, mask_outside, alpha_value, causal, scale, dropout_p)
    ctx.set_materialize_grads(False)  # an unused out or lse gets no zero-filled gradient


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alpha, kpm, p0, p1, seed = ctx.saved_tensors
    kind, mask_outside, alpha_value, causal, scale, dropout_p = ctx.args
    nig = ctx.needs_input_grad
    need0, need1 = p0 is not None and nig[5], p1 is not None and nig[6]
    need_dalpha = alpha is not None and nig[3] and kind != 0
    with torch.no_grad():  # the backward is not differentiable: see guard_double_backward
        dq, dk, dv, da, dp0, dp1 = attention_bwd(
            dout, dlse, q, k, v, out, lse, alpha, kpm, p0, p1, kind, mask_outside, alpha_value, causal, scale,
            dropout_p, seed, need_dalpha, need0, need1,
        )
        grads = (
            dq if nig[0] else None,
            dk if nig[1] else None,
            dv if nig[2] else None,
            alpha_grad(alpha, da if need_dalpha else None, q.shape[1], nig[3]),
            None,
            dp0 if need0 else None,
            dp1 if need1 else None,
        ) + (None,) * 7
    return guard_double_backward(grads, ctx.saved_tensors)


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_attention(p):
    """Run an ``AttentionProblem`` through ``rapkern_triton::attention_fwd``; returns (out, lse float32).

    The dropout seed is drawn from torch's default generator (so ``torch.manual_seed`` reproduces a run) and
    kept as a tensor for the backward to regenerate the same mask.
    """
    alpha_t = p.alpha if isinstance(p.alpha, torch.Tensor) else None
    alpha_value = 0.0 if alpha_t is not None else float(p.alpha)
    seed = torch.randint(0, _SEED_MAX, (1,)) if p.dropout_p > 0 else None
    kind, mask_outside, p0, p1 = prior_args(p.prior)
    q, k, v = _unit_last(p.q), _unit_last(p.k), _unit_last(p.v)
    return attention_fwd(q, k, v, alpha_t, p.key_padding_mask, p0, p1, kind, mask_outside, alpha_value,
                         bool(p.causal), float(p.scale), float(p.dropout_p), seed)
