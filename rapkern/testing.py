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
    cluster_mask=None,
    return_weights=False,
    compute_dtype: torch.dtype = torch.float64,
):
    """``w = softmax(s/τ)`` over the present clusters (``cluster_mask`` True = absent: weight 0; a group with
    no present cluster gives zeros, and with top_k the indices 0..k-1), ``out = w · answers``."""
    p = check_route(q, centroids, answers, tau=tau, top_k=top_k, normalize=normalize, cluster_mask=cluster_mask)
    cdt = compute_dtype
    qf, cf, af = p.q.to(cdt), p.centroids.to(cdt), p.answers.to(cdt)
    if normalize:
        qf = qf / qf.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
        cf = cf / cf.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
    tau_c = p.tau.to(device=qf.device, dtype=cdt) if isinstance(p.tau, Tensor) else p.tau
    s = torch.matmul(qf, cf.transpose(-1, -2)) / tau_c
    keep = None
    if p.cluster_mask is not None:
        empty = p.cluster_mask.all(-1)[:, None, None]  # (G, 1, 1): no cluster at all
        s = s.masked_fill(p.cluster_mask[:, None, :], float("-inf"))
        s = torch.where(empty, torch.zeros((), dtype=cdt, device=s.device), s)
        keep = (~empty).to(cdt)
    idx = None
    if top_k is not None:
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_k]
        w_k = torch.softmax(torch.gather(s, -1, idx), dim=-1)
        if keep is not None:
            w_k = w_k * keep
        w = torch.zeros_like(s).scatter(-1, idx, w_k)
    else:
        w = torch.softmax(s, dim=-1)
        if keep is not None:
            w = w * keep
    out = torch.matmul(w, af)

    def shape(t):  # (G', N', ·) -> (*lead, N, ·)
        return t.reshape(*p.lead, -1, t.shape[-1])

    out = shape(out).to(q.dtype)
    if not return_weights:
        return out
    if top_k is None:
        return out, shape(w).to(q.dtype)
    return out, (shape(w_k).to(q.dtype), shape(idx))


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


# ---------------------------------------------------------------------------------------------------------
# attention_stats / attention_kl (issue 9): dense float64 references with the public functions' arguments.
# Results are float32, or float64 for float64 inputs (for the KL: when either side's inputs are float64).

__all__ += ["reference_attention_stats", "reference_attention_kl"]


def _reference_logits(p, cdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dense logits ``scale·QKᵀ + α·B`` with every mask as -inf (B, Hq, Lq, Lk), and the rows with no visible
    key (B, Hq, Lq, 1), for a ``rapkern.stats.StatsProblem``; the same math as reference_attention."""
    b, hq, lq, _ = p.q.shape
    hkv, lk = p.k.shape[1], p.k.shape[2]
    kf = p.k.to(cdt).repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(p.q.to(cdt), kf.transpose(-1, -2)) * p.scale
    if p.prior is not None:
        bias = p.prior.with_tensors(*(t.to(cdt) for t in p.prior.tensors())).materialize(b, hq, lq, lk)
        a = p.alpha.to(cdt).reshape(-1, 1, 1) if isinstance(p.alpha, Tensor) else p.alpha
        hole = bias == float("-inf")
        s = s + (bias.masked_fill(hole, 0.0) * a).masked_fill(hole, float("-inf"))
    masked = torch.zeros(b, 1, lq, lk, dtype=torch.bool, device=p.q.device)
    if p.causal:
        masked = masked | (torch.arange(lk, device=p.q.device)[None, :] > torch.arange(lq, device=p.q.device)[:, None])
    if p.key_padding_mask is not None:
        masked = masked | p.key_padding_mask[:, None, None, :]
    s = s.masked_fill(masked, float("-inf"))
    return s, (s == float("-inf")).all(-1, keepdim=True)


def reference_attention_stats(
    q,
    k,
    *,
    prior=None,
    alpha=1.0,
    causal=False,
    key_padding_mask=None,
    scale=None,
    compute_dtype: torch.dtype = torch.float64,
):
    """``AttentionStats(entropy = -Σ_j p log p (B, Hq, Lq), key_mass = Σ_i p (B, Hq, Lk))``; rows with no
    visible key: entropy 0, no mass."""
    from .stats import AttentionStats, check_stats

    p = check_stats(q, k, prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    s, dead = _reference_logits(p, compute_dtype)
    hole = s == float("-inf")
    logp = torch.log_softmax(s.masked_fill(dead, 0.0), dim=-1)
    probs = logp.exp().masked_fill(hole, 0.0)
    entropy = -(probs * logp.masked_fill(hole, 0.0)).sum(-1)
    out = torch.float64 if q.dtype == torch.float64 else torch.float32
    return AttentionStats(entropy.to(out), probs.sum(-2).to(out))


def reference_attention_kl(
    q_t,
    k_t,
    q_s,
    k_s,
    *,
    prior_t=None,
    prior_s=None,
    alpha_t=1.0,
    alpha_s=1.0,
    causal=False,
    key_padding_mask=None,
    temperature=1.0,
    reduction="mean",
    scale_t=None,
    scale_s=None,
    compute_dtype: torch.dtype = torch.float64,
):
    """``KL_i = Σ_j p_t,ij (log p_t,ij − log p_s,ij)`` with both logit sets divided by ``temperature``; 0 where
    the teacher sees no key, +inf where it sees a key the student does not. The teacher is detached.
    "mean" divides the sum by the number of rows where the teacher sees a key."""
    from .stats import check_kl

    p = check_kl(
        q_t, k_t, q_s, k_s, prior_t=prior_t, prior_s=prior_s, alpha_t=alpha_t, alpha_s=alpha_s, causal=causal,
        key_padding_mask=key_padding_mask, temperature=temperature, reduction=reduction, scale_t=scale_t,
        scale_s=scale_s,
    )
    st, dead_t = _reference_logits(p.teacher, compute_dtype)
    ss, dead_s = _reference_logits(p.student, compute_dtype)
    st, ss = st / p.temperature, ss / p.temperature
    logp_t = torch.log_softmax(st.masked_fill(dead_t, 0.0), dim=-1)
    logp_s = torch.log_softmax(ss.masked_fill(dead_s, 0.0), dim=-1)
    seen_t = st != float("-inf")
    unseen_s = ss == float("-inf")
    term = torch.where(seen_t & ~unseen_s, logp_t.exp() * (logp_t - logp_s.masked_fill(unseen_s, 0.0)), 0.0)
    rows = term.sum(-1).masked_fill((seen_t & unseen_s).any(-1), float("inf"))
    out = torch.float64 if torch.float64 in (q_t.dtype, q_s.dtype) else torch.float32
    rows = rows.to(out)
    if p.reduction == "none":
        return rows
    if p.reduction == "sum":
        return rows.sum()
    return rows.sum() / (~dead_t).sum().clamp_min(1).to(out)
