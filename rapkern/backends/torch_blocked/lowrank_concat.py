"""A low-rank prior as one unbiased attention call, exactly: ``scale·q·kᵀ + α·u·vᵀ = [scale·q, α·u]·[k, v]ᵀ``.

The logits of a ``LowRankPrior(u, v)`` are those of an unbiased attention with head dim D + r and scale 1
over the concatenated operands, so the torch backend's CPU path runs it through the fused flash kernel
with no prior tile at all (the prior's tile loop builds ``u·vᵀ`` per tile instead). Gradients to q, k,
u, v and α flow through the concatenation by autograd; masks, dead rows and the LSE are those of the
inner call. The fused op needs equal head dims for q/k and v, so v is zero-padded to D + r columns
(cost: r/D more work in P·V; Dv > D + r is left to the tile loop), and the output is sliced back.

Extra memory is O(L·(D + r)) for the concatenated operands; a per-head ``v`` factor with grouped-query
heads repeats k and v per query head (the kv heads no longer share a key).
"""

from __future__ import annotations

import dataclasses
import types

import torch

from ...priors import LowRankPrior, lead4
from . import cpu_flash


def applies(p) -> bool:
    """On CPU in float32/float64 where the fused kernel would then run (as the tile loop is the fallback)."""
    if not isinstance(p.prior, LowRankPrior) or p.device.type != "cpu":
        return False
    if p.dtype not in (torch.float32, torch.float64):
        return False
    d = p.head_dim + p.prior.rank
    plan = types.SimpleNamespace(device=p.device, d=d, dv=d if p.head_dim_v <= d else -1,
                                 dropout_p=p.dropout_p, cdt=p.dtype)
    return cpu_flash.usable(plan)


def as_unbiased(p):
    """The equivalent problem without a prior, and the head dim to slice the output back to."""
    b, hq, hkv, lq, lk = p.batch, p.heads_q, p.heads_kv, p.lq, p.lk
    u4, v4 = lead4(p.prior.u, 2), lead4(p.prior.v, 2)
    r = u4.shape[-1]
    alpha = p.alpha.reshape(1, -1, 1, 1) if isinstance(p.alpha, torch.Tensor) else p.alpha
    au = (u4 * alpha).to(p.dtype).expand(b, hq, lq, r)  # a float64 alpha or factor must not promote q
    q2 = torch.cat([p.q * p.scale, au], dim=-1)

    k, v = p.k, p.v
    heads_k = hkv
    if v4.shape[1] != 1 and hq != hkv:  # a per-query-head key factor: kv heads are no longer shared
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
        heads_k = hq
    k2 = torch.cat([k, v4.to(p.dtype).expand(b, heads_k, lk, r)], dim=-1)
    v = torch.nn.functional.pad(v, (0, p.head_dim + r - p.head_dim_v))  # the fused op needs equal head dims
    return dataclasses.replace(p, q=q2, k=k2, v=v, prior=None, alpha=1.0, scale=1.0), p.head_dim_v
