"""Attention statistics and attention distillation without an Lq×Lk buffer (issue 9).

``attention_stats`` gives per-query entropy and per-key attention mass; ``attention_kl`` gives
KL(teacher attention ‖ student attention) per query row. Both validate here (with rapkern.attention's
checks and messages), build one problem object and dispatch (``dispatch.choose("attention_stats" |
"attention_kl", problem, backend)``). Backends return unreduced results; the reduction of the KL is
applied here, so it is the same for every backend.

Result dtypes: float64 when the inputs are float64 (for the KL: when either side is), else float32,
also for float16/bfloat16 inputs (the statistics are sums over a whole sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from . import dispatch
from .priors import DensePrior, Prior, lead4
from .validate import QKProblem, check_attention

__all__ = ["AttentionStats", "StatsProblem", "KLProblem", "attention_stats", "attention_kl", "check_stats", "check_kl"]

REDUCTIONS = ("none", "sum", "mean")


class AttentionStats(NamedTuple):
    entropy: Tensor  # (B, Hq, Lq): -Σ_j p_ij log p_ij, natural log; 0 for a row with no visible key
    key_mass: Tensor  # (B, Hq, Lk): Σ_i p_ij, attention received by each key


def _result_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@dataclass
class StatsProblem(QKProblem):
    q: Tensor  # (B, Hq, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D), Hq % Hkv == 0
    prior: Prior | None
    alpha: float | Tensor  # float, or tensor () / (Hq,)
    causal: bool
    key_padding_mask: Tensor | None  # bool (B, Lk), True = ignore
    scale: float

    @property
    def out_dtype(self) -> torch.dtype:
        """dtype of entropy and key_mass: float64 for float64 inputs, else float32."""
        return _result_dtype(self.q.dtype)

    def describe(self) -> str:
        return (
            f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} {self.dtype} on {self.device}, "
            f"prior={self.prior_kind}, causal={self.causal}"
        )

    def live_rows(self) -> Tensor:
        """Bool (B, Hq, Lq): query rows that see at least one key. O(B·Lq) from the causal, padding and band
        masks; a dense prior's -inf entries are read in row blocks (never an Lq×Lk bool of our own)."""
        b, hq, lq, lk, dev = self.batch, self.heads_q, self.lq, self.lk, self.device
        i = torch.arange(lq, device=dev)
        lo = torch.zeros_like(i)
        hi = torch.full_like(i, lk)
        if self.causal:
            hi = torch.minimum(hi, i + 1)
        if self.prior is not None and self.prior.masks_outside:
            w = self.prior.half_width
            lo, hi = torch.clamp(i - w, min=0), torch.minimum(hi, i + w + 1)
        lo = lo.clamp(max=lk)
        hi = torch.maximum(hi.clamp(max=lk), lo)  # an empty range [lo, lo) where nothing is visible
        if self.key_padding_mask is None:
            live = (hi > lo).reshape(1, 1, lq)
        else:
            kept = torch.cumsum((~self.key_padding_mask).to(torch.int64), -1)
            kept = torch.nn.functional.pad(kept, (1, 0))  # kept[b, j] = unpadded keys among the first j
            live = (kept[:, hi] > kept[:, lo]).reshape(b, 1, lq)
        if isinstance(self.prior, DensePrior):
            live = live & self._dense_live_rows()
        return live.expand(b, hq, lq)

    def _dense_live_rows(self) -> Tensor:
        bias = lead4(self.prior.bias, 2)
        bp, hp = bias.shape[:2]
        b, lq, lk = self.batch, self.lq, self.lk
        rows = max(1, 2**24 // max(1, b * hp * lk))
        out = []
        jj = torch.arange(lk, device=self.device)
        kpm = None if self.key_padding_mask is None else self.key_padding_mask[:, None, None, :]
        for i0 in range(0, lq, rows):
            i1 = min(i0 + rows, lq)
            ok = bias[..., i0:i1, :] != float("-inf")
            if self.causal:
                ok = ok & (jj[None, :] <= torch.arange(i0, i1, device=self.device)[:, None])
            if kpm is not None:
                ok = ok & ~kpm
            out.append(ok.any(-1))
        if not out:
            return torch.ones(bp, hp, 0, dtype=torch.bool, device=self.device)
        return torch.cat(out, -1)


@dataclass
class KLProblem:
    teacher: StatsProblem  # the teacher's q, k, prior, alpha, scale (no gradient flows to it)
    student: StatsProblem  # the student's; shares causal and key_padding_mask with the teacher
    temperature: float  # divides both logit sets
    reduction: str  # "none" | "sum" | "mean"

    @property
    def device(self) -> torch.device:
        return self.student.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.student.q.dtype

    @property
    def out_dtype(self) -> torch.dtype:
        """dtype of the KL: float64 when either side's inputs are float64, else float32."""
        return _result_dtype(self.teacher.q.dtype, self.student.q.dtype)

    def describe(self) -> str:
        return (
            f"teacher {self.teacher.describe()}; student {self.student.describe()}; "
            f"temperature={self.temperature}, reduction={self.reduction!r}"
        )


def _check_batch(q, k, qn: str, kn: str) -> None:
    """check_attention reports a batch mismatch as "q, k, v ..."; with no v, say it for q and k."""
    if isinstance(q, Tensor) and isinstance(k, Tensor) and q.dim() == 4 and k.dim() == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"{qn} and {kn} must share the batch size: got {q.shape[0]} and {k.shape[0]}")


def check_stats(q, k, *, prior, alpha, causal, key_padding_mask, scale) -> StatsProblem:
    _check_batch(q, k, "q", "k")
    p = check_attention(
        q, k, k, prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
        dropout_p=0.0,
    )
    return StatsProblem(p.q, p.k, p.prior, p.alpha, p.causal, p.key_padding_mask, p.scale)


def _check_side(role: str, sfx: str, q, k, prior, alpha, scale) -> StatsProblem:
    """One side of the KL through rapkern.attention's checks; messages get the side's argument names."""
    _check_batch(q, k, f"q{sfx}", f"k{sfx}")
    try:
        return check_stats(q, k, prior=prior, alpha=alpha, causal=False, key_padding_mask=None, scale=scale)
    except (TypeError, ValueError) as e:
        names = ", ".join(f"{n} = {n}{sfx}" for n in ("q", "k", "prior", "alpha", "scale"))
        raise type(e)(f"attention_kl {role} ({names}): {e}") from e


def _detached(p: StatsProblem) -> StatsProblem:
    prior = None if p.prior is None else p.prior.with_tensors(*(t.detach() for t in p.prior.tensors()))
    alpha = p.alpha.detach() if isinstance(p.alpha, Tensor) else p.alpha
    return StatsProblem(p.q.detach(), p.k.detach(), prior, alpha, p.causal, p.key_padding_mask, p.scale)


def check_kl(
    q_t, k_t, q_s, k_s, *, prior_t, prior_s, alpha_t, alpha_s, causal, key_padding_mask, temperature, reduction,
    scale_t, scale_s,
) -> KLProblem:
    t = _check_side("teacher", "_t", q_t, k_t, prior_t, alpha_t, scale_t)
    s = _check_side("student", "_s", q_s, k_s, prior_s, alpha_s, scale_s)
    for what, a, b in (
        ("batch size B (dim 0 of q and k)", t.batch, s.batch),
        ("query heads Hq (dim 1 of q)", t.heads_q, s.heads_q),
        ("query length Lq (dim 2 of q)", t.lq, s.lq),
        ("key length Lk (dim 2 of k)", t.lk, s.lk),
    ):
        if a != b:
            raise ValueError(f"teacher and student must agree in the {what}: q_t/k_t give {a}, q_s/k_s give {b}")
    if t.device != s.device:
        raise ValueError(f"q_s must be on the same device as q_t ({t.device}), got {s.device}")
    # the shared masks, checked once against the (now known to agree) shapes
    shared = check_attention(
        t.q, t.k, t.k, prior=None, alpha=1.0, causal=causal, key_padding_mask=key_padding_mask, scale=t.scale,
        dropout_p=0.0,
    )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if not isinstance(reduction, str):
        raise TypeError(f"reduction must be a str, got {type(reduction).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    for side in (t, s):
        side.causal, side.key_padding_mask = shared.causal, shared.key_padding_mask
    return KLProblem(_detached(t), s, float(temperature), reduction)


def reduce_kl(rows: Tensor, p: KLProblem) -> Tensor:
    """Apply ``p.reduction`` to per-row KL ``(B, H, Lq)``; the mean counts only rows where the teacher sees a
    key (the others are 0 and are not counted; with none at all the mean is 0)."""
    if p.reduction == "none":
        return rows
    if p.reduction == "sum":
        return rows.sum()
    count = p.teacher.live_rows().sum().clamp_min(1)
    return rows.sum() / count.to(rows.dtype)


def attention_stats(q, k, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None, backend="auto"):
    """Per-query attention entropy and per-key attention mass of ``softmax(scale·QKᵀ + α_h·B + M)``.

    q ``(B, Hq, Lq, D)``, k ``(B, Hkv, Lk, D)`` (Hq % Hkv == 0), prior/alpha/causal/key_padding_mask/scale as in
    ``rapkern.attention``. Returns ``AttentionStats(entropy (B, Hq, Lq), key_mass (B, Hq, Lk))`` in float32
    (float64 for float64 inputs); entropy in nats. A row with no visible key has entropy 0 and adds nothing
    to key_mass. Differentiable w.r.t. q, k, the prior tensors and alpha. Never builds an Lq×Lk tensor.
    """
    p = check_stats(q, k, prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    entropy, key_mass = dispatch.choose("attention_stats", p, backend).attention_stats(p)
    return AttentionStats(entropy, key_mass)


def attention_kl(
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
    backend="auto",
):
    """KL(teacher attention ‖ student attention) per query row, both logit sets divided by ``temperature``.

    ``KL_i = Σ_j p_t,ij (log p_t,ij − log p_s,ij)``, computed blockwise from the two LSEs (no Lq×Lk tensor).
    Teacher (q_t, k_t, prior_t, alpha_t, scale_t) and student (q_s, ...) each follow ``rapkern.attention``'s
    rules; they must agree in B, Hq, Lq, Lk and device, and share ``causal`` and ``key_padding_mask``. They
    may differ in head dim D (and so in the default scale 1/sqrt(D)), in Hkv (GQA), in dtype, and in prior
    and alpha. No gradient flows to the teacher (its tensors are detached); the student's q, k, prior
    tensors and alpha get gradients. A row where the teacher sees no key has KL 0; where the teacher sees a
    key that only the student's prior masks (band with mask_outside, -inf in a dense bias) the KL is +inf.

    ``reduction``: "none" → ``(B, Hq, Lq)``; "sum" → sum over all rows; "mean" → that sum over the number of
    rows where the teacher sees a key. float32, or float64 when either side's inputs are float64.
    """
    p = check_kl(
        q_t, k_t, q_s, k_s, prior_t=prior_t, prior_s=prior_s, alpha_t=alpha_t, alpha_s=alpha_s, causal=causal,
        key_padding_mask=key_padding_mask, temperature=temperature, reduction=reduction, scale_t=scale_t,
        scale_s=scale_s,
    )
    rows = dispatch.choose("attention_kl", p, backend).attention_kl(p)
    return reduce_kl(rows, p)
