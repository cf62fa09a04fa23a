"""The call site of ``torch.ops.rapkern.attention_fwd``: establishes the kernels' preconditions, nothing else.

Autograd is the op's own (a C++ kernel for the Autograd key, csrc/autograd.cpp), so ``out`` and ``lse`` are
differentiable w.r.t. q, k, v, alpha and the prior tensors; the conversions below are ordinary autograd ops
that carry each gradient back to its leaf (the (Hq,) expand of a scalar alpha sums, the float32 cast of a
half prior rounds back, lead4's view restores the user's shape).

Preconditions (csrc/ops.cpp, the contract): q, k, v with unit stride in the last dim (copied only when not);
alpha None or float32 (Hq,); prior tensors float32 viewed as (Bp, Hp, ...); the dropout seed drawn from torch's
default generator, so ``torch.manual_seed`` reproduces a run and the backward regenerates the same mask.
"""

from __future__ import annotations

import torch

from ...priors import lead4

KIND = {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}
SEED_MAX = 2**62
_F32 = torch.float32


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # clone, not .contiguous(): a size-1 last dim with another stride already counts as contiguous
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype is _F32 else t.to(_F32)


def cpp_attention(p):
    """Run an ``AttentionProblem`` through the C++ op; returns (out in q's dtype, lse float32).

    This is a per-call cost (issue 10: validation + dispatch + autograd entry <= 25 µs on a tiny input), so it
    does only what the contract needs, skipping no-op conversions."""
    prior = p.prior
    prior0 = prior1 = None
    kind, mask_outside = 0, False
    if prior is not None:
        kind = KIND[prior.kind]
        mask_outside = prior.masks_outside
        if kind == 1:
            prior0 = _f32(lead4(prior.table, 1))
        elif kind == 3:
            prior0, prior1 = _f32(lead4(prior.u, 2)), _f32(lead4(prior.v, 2))
        else:
            prior0 = _f32(lead4(prior.tensors()[0], 2))
    alpha = p.alpha
    if type(alpha) is float:
        alpha_t, alpha_value = None, alpha
    else:
        alpha_t, alpha_value = _f32(alpha).expand(p.q.shape[1]), 0.0
    seed = int(torch.randint(0, SEED_MAX, (1,)).item()) if p.dropout_p > 0 else 0
    return _FWD(
        _unit_last(p.q), _unit_last(p.k), _unit_last(p.v), p.key_padding_mask, alpha_t, alpha_value, kind,
        prior0, prior1, mask_outside, p.causal, p.scale, p.dropout_p, seed,
    )


def _fwd_op(*args):
    global _FWD
    _FWD = torch.ops.rapkern.attention_fwd.default  # resolved once, after rapkern._C has loaded
    return _FWD(*args)


_FWD = _fwd_op
