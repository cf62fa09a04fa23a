"""Public functions: the only place that validates inputs and fills defaults, then dispatches."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import dispatch
from .priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from .validate import check_attention, check_route

_BUILTIN_PRIORS = frozenset((RelativeLagPrior, BandedPrior, LowRankPrior, DensePrior))


def attention(
    q,
    k,
    v,
    *,
    prior=None,
    alpha=1.0,
    causal=False,
    key_padding_mask=None,
    scale=None,
    dropout_p=0.0,
    return_lse=False,
    backend="auto",
):
    """``softmax(scale·QKᵀ + α_h·B + M) V`` with B given compactly by ``prior``.

    Shapes as SDPA: q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)``, v ``(B, Hkv, Lk, Dv)`` with Hq % Hkv == 0.
    Returns out ``(B, Hq, Lq, Dv)`` in q's dtype, and with ``return_lse=True`` also the float32 natural-log
    LSE ``(B, Hq, Lq)``. A query row with no visible key gives 0 and lse -inf. See README for semantics.
    """
    # The direct path (a per-call cost, issue 10): the kernel validates, and check_attention runs only after a
    # failure, to raise the documented error.
    direct = _direct_backend(q, prior, alpha, causal, scale, dropout_p, return_lse, backend)
    if direct is not None:
        try:
            out, lse = direct.attention_direct(
                q, k, v, prior, alpha, causal, key_padding_mask,
                1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, dropout_p,
            )
        except Exception as kernel_error:  # noqa: BLE001  (raised before computing; reworded below)
            _raise_documented(kernel_error, q, k, v, prior=prior, alpha=alpha, causal=causal,
                              key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p)
        return (out, lse) if return_lse else out

    p = check_attention(
        q, k, v, prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask,
        scale=scale, dropout_p=dropout_p, check_values=False,
    )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    chosen = dispatch.choose("attention", p, backend)
    # The prior's values are checked before any kernel runs: here, or by a kernel that checks them itself
    # (not while compiling: the graph then carries this check as an in-graph assert).
    if p.prior is not None and (not chosen.checks_prior_values or torch.compiler.is_compiling()):
        p.prior.check_values()
    out, lse = chosen.attention(p)
    return (out, lse) if return_lse else out


def _direct_backend(q, prior, alpha, causal, scale, dropout_p, return_lse, backend):
    """The backend for the direct path, or None: arguments of the usual Python types (anything else takes the
    checked path, which words its error), not while compiling (the graph keeps the Python checks), and a backend
    chosen by device and dtype alone whose kernel checks every condition check_attention checks
    (``Backend.validates_in_kernel``; tests/test_direct_path.py holds it to that)."""
    if (type(q) is Tensor and (prior is None or type(prior) in _BUILTIN_PRIORS)
            and (type(alpha) is float or isinstance(alpha, Tensor)) and type(causal) is bool
            and type(dropout_p) is float and type(return_lse) is bool and (scale is None or type(scale) is float)
            and not torch.compiler.is_compiling()):
        device_type = "cpu" if q.is_cpu else q.device.type  # is_cpu: no torch.device object built
        direct = dispatch.choice_by_device_dtype("attention", device_type, q.dtype, backend)
        if direct is not None and direct.validates_in_kernel:
            return direct
    return None


def _raise_documented(kernel_error: Exception, q, k, v, **kwargs):
    """Raise check_attention's error for the arguments a kernel rejected (it names the argument as the
    documentation does); the kernel's own error when the Python checks pass (e.g. a prior's values)."""
    try:
        check_attention(q, k, v, check_values=False, **kwargs)
    except (TypeError, ValueError) as documented:
        raise documented from None
    raise kernel_error


def lda_route(q, centroids, answers, *, tau=0.1, top_k=None, normalize=True, cluster_mask=None,
              return_weights=False, backend="auto"):
    """LDA routing softmax: ``w = softmax(cos(q, c_i)/τ)``, ``out = Σ_i w_i a_i``.

    q ``(N, d)`` or ``(G, N, d)``; centroids ``(n, d)``/``(G, n, d)``; answers ``(n, e)``/``(G, n, e)``; a 2-D
    table with 3-D q is shared by every group. ``tau``: a float, or a 0-d tensor that receives a gradient
    (a learnable temperature). ``cluster_mask``: bool ``(n,)`` or ``(G, n)``, True = absent (weight 0).
    ``top_k``: softmax over the k largest scores only (ties to the lower index). ``return_weights``
    also returns the dense weights ``(…, N, n)``, or with top_k ``(weights (…, N, k), indices (…, N, k))``.
    """
    p = check_route(q, centroids, answers, tau=tau, top_k=top_k, normalize=normalize, cluster_mask=cluster_mask)
    if not isinstance(return_weights, bool):
        raise TypeError(f"return_weights must be a bool, got {type(return_weights).__name__}")
    out, w, idx = dispatch.choose("lda_route", p, backend).route(p, return_weights)

    def shape(t):  # (G', N', ·) -> (*lead, N, ·): undoes the folding of a shared table's query batch
        return None if t is None else t.reshape(*p.lead, -1, t.shape[-1])

    out, w, idx = shape(out), shape(w), shape(idx)
    if not return_weights:
        return out
    return (out, w) if p.top_k is None else (out, (w, idx))
