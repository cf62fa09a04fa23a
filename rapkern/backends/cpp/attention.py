"""The call site of ``torch.ops.rapkern.attention_fwd``: passes the user's tensors through as they are.

The op takes q, k, v, the prior tensors and alpha as the user made them (any strides, a prior's leading dims
(), (Hp,) or (Bp, Hp), any floating dtype for prior and alpha, alpha of shape () or (Hq,)) and establishes
its kernels' layouts in C++ (csrc/cpu/common.h, make_problem), where a conversion costs nanoseconds instead
of a Python-dispatched op and records no autograd node. Its autograd kernel (csrc/autograd.cpp) returns each
gradient in its input's shape and dtype; the forward checks the prior's values (ValueError) before computing.
So this function does nothing per call but pick the op's arguments: it is a per-call cost (issue 10:
validation + dispatch + autograd entry <= 25 µs on a tiny input).

The dropout seed is drawn from torch's default generator, so ``torch.manual_seed`` reproduces a run and the
backward regenerates the same mask.
"""

from __future__ import annotations

import torch

KIND = {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}
SEED_MAX = 2**62


def cpp_attention(p):
    """Run an ``AttentionProblem`` through the C++ op; returns (out in q's dtype, lse float32)."""
    return call_fwd(p.q, p.k, p.v, p.prior, p.alpha, p.causal, p.key_padding_mask, p.scale, p.dropout_p)


def call_fwd(q, k, v, prior, alpha, causal, key_padding_mask, scale, dropout_p):
    """The op on rapkern.attention's arguments: ``prior`` None or a built-in Prior, ``alpha`` a float or a
    tensor, ``scale`` a float. The op checks every argument itself (csrc/contract.h, csrc/cpu/common.h
    make_problem) and raises before computing."""
    prior0 = prior1 = None
    kind, mask_outside = 0, False
    if prior is not None:
        kind = KIND[prior.kind]
        mask_outside = prior.masks_outside
        if kind == 3:
            prior0, prior1 = prior.u, prior.v
        else:
            prior0 = prior.tensors()[0]
    if type(alpha) is float:
        alpha_t, alpha_value = None, alpha
    else:
        alpha_t, alpha_value = alpha, 0.0
    seed = int(torch.randint(0, SEED_MAX, (1,)).item()) if dropout_p > 0 else 0
    return _FWD(q, k, v, key_padding_mask, alpha_t, alpha_value, kind, prior0, prior1, mask_outside, causal, scale,
                dropout_p, seed)


def _fwd_op(*args):
    global _FWD
    _FWD = torch.ops.rapkern.attention_fwd.default  # resolved once, after rapkern._C has loaded
    return _FWD(*args)


_FWD = _fwd_op
