"""The Triton attention as torch.library ops: ``rapkern_triton::attention_fwd`` and ``attention_bwd``.

Opaque custom ops (``torch.library.custom_op``) with fake implementations (shapes and dtypes only), so that
``torch.compile(fullgraph=True)`` records one node per launch and never traces into the launchers: no graph
break, and the autotuner's cache (launch.py) is consulted per call as in eager mode, never re-tuned by the
compiler. The namespace is not ``rapkern``, which the C++ extension defines (csrc/ops.cpp).

A prior is a Python object, so it crosses the op boundary as its kind code (``PRIOR_KINDS``, the C++
codes), ``mask_outside`` and up to two tensors (lag table / band values / u, v / bias, as
``Prior.tensors()``). α is a tensor (shape () or (Hq,)) or, when None, the float ``alpha_value`` for every
head. The dropout seed is a 1-element int64 tensor (or None without dropout) so a compiled graph does not
specialize on it. Autograd for ``attention_fwd`` is registered in function.py.
"""

# No ``from __future__ import annotations``: custom_op reads the schema from these annotations, and
# typing.Optional keeps that working on older torch versions than ``X | None`` would.
from typing import Optional

import torch
from torch import Tensor

from ...priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from . import launch

NAMESPACE = "rapkern_triton"
PRIOR_KINDS = {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}
_KIND_NAMES = {v: k for k, v in PRIOR_KINDS.items()}


def make_prior(kind: int, mask_outside: bool, p0: Optional[Tensor], p1: Optional[Tensor]):
    """The prior object behind the op arguments (None for kind 0)."""
    if kind == 0:
        return None
    if kind == 1:
        return RelativeLagPrior(p0)
    if kind == 2:
        return BandedPrior(p0, mask_outside)
    if kind == 3:
        return LowRankPrior(p0, p1)
    if kind == 4:
        return DensePrior(p0)
    raise ValueError(f"prior_kind must be one of {sorted(_KIND_NAMES)}, got {kind}")


def prior_args(prior):
    """(kind code, mask_outside, tensor 0 or None, tensor 1 or None) of a prior object or None."""
    if prior is None:
        return 0, False, None, None
    ts = prior.tensors()
    return PRIOR_KINDS[prior.kind], bool(getattr(prior, "mask_outside", False)), ts[0], ts[1] if len(ts) > 1 else None


def _unit_last(t: Tensor) -> Tensor:
    """The kernels' precondition: unit stride in the last dim (a copy only when it is not; callers normally
    establish it already, see function.py, so this copies only strides a compiler chose)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _alpha(alpha: Optional[Tensor], alpha_value: float):
    return alpha if alpha is not None else alpha_value


def _seed(seed: Optional[Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _empty(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


@torch.library.custom_op(f"{NAMESPACE}::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, alpha: Optional[Tensor], key_padding_mask: Optional[Tensor],
    prior0: Optional[Tensor], prior1: Optional[Tensor], prior_kind: int, mask_outside: bool, alpha_value: float,
    causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Lq, Dv) in q's dtype, lse (B, Hq, Lq) float32), both contiguous."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    pack = launch.PriorPack(make_prior(prior_kind, mask_outside, prior0, prior1), q)
    return launch.attention_fwd(q, k, v, pack, _alpha(alpha, alpha_value), key_padding_mask, causal, scale, dropout_p,
                       _seed(seed))


@attention_fwd.register_fake
def _(q, k, v, alpha, key_padding_mask, prior0, prior1, prior_kind, mask_outside, alpha_value, causal, scale,
      dropout_p, seed):
    b, hq, lq, _ = q.shape
    out = q.new_empty((b, hq, lq, v.shape[3]))
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op(f"{NAMESPACE}::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Optional[Tensor], dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    alpha: Optional[Tensor], key_padding_mask: Optional[Tensor], prior0: Optional[Tensor], prior1: Optional[Tensor],
    prior_kind: int, mask_outside: bool, alpha_value: float, causal: bool, scale: float, dropout_p: float,
    seed: Optional[Tensor], need_dalpha: bool, need_dprior0: bool, need_dprior1: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv in the input dtypes and shapes, contiguous; dalpha in α's shape and dtype; dprior0/1 in
    the prior tensors' shapes and dtypes, contiguous). A gradient not asked for is an empty float32 tensor.

    ``dout`` None means zeros; ``dlse`` None means no gradient reaches the LSE (rows with lse = -inf drop
    whatever reaches them). ``need_dalpha`` needs a tensor α and a prior.
    """
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if dout is None:
        dout = torch.zeros_like(out)
    if dlse is not None:  # rows with no key (lse = -inf) have p = 0: whatever reaches them is dropped
        dlse = dlse.masked_fill(lse == float("-inf"), 0.0)
    prior = make_prior(prior_kind, mask_outside, prior0, prior1)
    prior_tensors = () if prior is None else prior.tensors()
    needs = (need_dprior0, need_dprior1)[: len(prior_tensors)]
    need_dprior = any(needs)
    need_dalpha = need_dalpha and alpha is not None and prior is not None
    dq, dk, dv, dalpha, grads = launch.attention_bwd(
        q, k, v, out, lse, dout, launch.PriorPack(prior, q), _alpha(alpha, alpha_value), key_padding_mask, causal,
        scale, dropout_p, _seed(seed), need_dprior, need_dalpha, dlse,
    )
    dprior = [_empty(q), _empty(q)]
    if need_dprior:
        for i, (g, need) in enumerate(zip(launch.reduce_prior_grads(prior_tensors, grads, prior.kind), needs)):
            if need:
                dprior[i] = g.contiguous()
    da = _empty(q)
    if alpha is not None and need_dalpha:
        da = (dalpha.sum() if alpha.dim() == 0 else dalpha).to(alpha.dtype)
    return dq, dk, dv, da, dprior[0], dprior[1]


@attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, alpha, key_padding_mask, prior0, prior1, prior_kind, mask_outside,
      alpha_value, causal, scale, dropout_p, seed, need_dalpha, need_dprior0, need_dprior1):
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    da = _empty(q)
    if need_dalpha and alpha is not None and prior_kind != 0:
        da = torch.empty(alpha.shape, dtype=alpha.dtype, device=alpha.device)
    dprior = [_empty(q), _empty(q)]
    n_tensors = {0: 0, 3: 2}.get(prior_kind, 1)
    for i, (t, need) in enumerate(((prior0, need_dprior0), (prior1, need_dprior1))[:n_tensors]):
        if need:
            dprior[i] = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    return dq, dk, dv, da, dprior[0], dprior[1]
