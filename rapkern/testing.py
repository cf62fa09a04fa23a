"""Float64 references: everything materialized, every formula spelled out once.

``reference_attention`` and ``reference_lda_route`` take the public functions' arguments (minus
``backend``) and return results in the input dtype (lse in float32). ``compute_dtype`` (default float64)
lets tests run the *same eager math in the input dtype* to measure the rounding error an honest
implementation is allowed (FlashAttention's "2x the error of eager PyTorch" rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .validate import check_attention, check_route

__all__ = ["reference_attention", "reference_lda_route", "max_error", "assert_close_to_reference"]

_NORM_EPS = 1e-8


def reference_attention(
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
    compute_dtype: torch.dtype = torch.float64,
):
    p = check_attention(
        q, k, v, prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask,
        scale=scale, dropout_p=dropout_p,
    )
    cdt = compute_dtype
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.to(cdt)
    kf = k.to(cdt).repeat_interleave(g, dim=1)
    vf = v.to(cdt).repeat_interleave(g, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * p.scale
    if prior is not None:
        bias = prior.with_tensors(*(t.to(cdt) for t in prior.tensors())).materialize(b, hq, lq, lk)
        a = p.alpha.to(cdt).reshape(-1, 1, 1) if isinstance(p.alpha, Tensor) else p.alpha
        hole = bias == float("-inf")  # masks (band, -inf in a dense bias) hold for every alpha, even 0
        s = s + (bias.masked_fill(hole, 0.0) * a).masked_fill(hole, float("-inf"))
    masked = torch.zeros(b, 1, lq, lk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        masked = masked | (j > i)
    if key_padding_mask is not None:
        masked = masked | key_padding_mask[:, None, None, :]
    s = s.masked_fill(masked, float("-inf"))
    dead = (s == float("-inf")).all(-1, keepdim=True)  # no visible key: output 0, lse -inf
    s = s.masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    probs = torch.exp(s - lse).masked_fill(dead, 0.0)
    if p.dropout_p > 0:
        keep = torch.rand(probs.shape, device=q.device, dtype=cdt) >= p.dropout_p
        probs = probs * keep / (1.0 - p.dropout_p)
    out = torch.matmul(probs, vf).to(q.dtype)
    lse = lse.masked_fill(dead, float("-inf")).squeeze(-1).float()
    return (out, lse) if return_lse else out


def reference_lda_route(
    q,
    centroids,
    answers,
    *,
    tau=0.1,
    top_k=None,
    normalize=True,
    return_weights=False,
    compute_dtype: torch.dtype = torch.float64,
):
    p = check_route(q, centroids, answers, tau=tau, top_k=top_k, normalize=normalize)
    cdt = compute_dtype
    qf, cf, af = p.q.to(cdt), p.centroids.to(cdt), p.answers.to(cdt)
    if normalize:
        qf = qf / qf.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
        cf = cf / cf.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    s = torch.matmul(qf, cf.transpose(-1, -2)) / p.tau
    idx = None
    if top_k is not None:
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_k]
        w_k = torch.softmax(torch.gather(s, -1, idx), dim=-1)
        w = torch.zeros_like(s).scatter(-1, idx, w_k)
    else:
        w = torch.softmax(s, dim=-1)
    out = torch.matmul(w, af)
    sq = (lambda t: t.squeeze(0)) if p.squeeze_group else (lambda t: t)
    out = sq(out).to(q.dtype)
    if not return_weights:
        return out
    if top_k is None:
        return out, sq(w).to(q.dtype)
    return out, (sq(w_k).to(q.dtype), sq(idx))


def max_error(x: Tensor, ref: Tensor) -> float:
    """Max abs difference, treating equal infinities (e.g. lse of dead rows) as exact."""
    x, ref = x.double(), ref.double()
    same_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    d = (x - ref).abs().masked_fill(same_inf, 0.0)
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_reference(name: str, got: Tensor, ref64: Tensor, eager_low: Tensor, floor: float) -> None:
    """FlashAttention's rule: error(got) <= 2 * error(same eager math in the input dtype) + floor."""
    if torch.isnan(got).any():
        raise AssertionError(f"{name}: NaN in result")
    err, base = max_error(got, ref64), max_error(eager_low, ref64)
    if not err <= 2 * base + floor:
        raise AssertionError(f"{name}: max error {err:.3e} > 2 x eager error {base:.3e} + floor {floor:.1e}")
