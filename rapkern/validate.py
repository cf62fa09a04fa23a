"""Input checks for the public functions: raise before any computation, return one normalized problem.

Errors name the argument, what was received and what is allowed: ``ValueError`` for shapes and values,
``TypeError`` for dtypes and types.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .priors import Prior

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class QKProblem:
    """Shape and prior questions shared by the attention and statistics problems (fields q, k, prior, alpha)."""

    __slots__ = ()  # lets a slotted subclass (AttentionProblem) go without a per-instance __dict__

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def lq(self) -> int:
        return self.q.shape[2]

    @property
    def lk(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def prior_kind(self) -> str:
        return "none" if self.prior is None else self.prior.kind

    @property
    def needs_prior_grad(self) -> bool:
        return self.prior is not None and any(t.requires_grad for t in self.prior.tensors())

    @property
    def needs_alpha_grad(self) -> bool:
        return isinstance(self.alpha, Tensor) and self.alpha.requires_grad


@dataclass(slots=True)  # built on every call: one object, no __dict__
class AttentionProblem(QKProblem):
    q: Tensor
    k: Tensor
    v: Tensor
    prior: Prior | None
    alpha: float | Tensor  # a float, or a tensor of shape () or (Hq,)
    causal: bool
    key_padding_mask: Tensor | None
    scale: float
    dropout_p: float

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    def describe(self) -> str:
        return (
            f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)} {self.dtype} "
            f"on {self.device}, prior={self.prior_kind}, causal={self.causal}"
        )


@dataclass
class RouteProblem:
    q: Tensor  # (G, N, d); a shared 2-D table over a query batch is folded into one group (see ``lead``)
    centroids: Tensor  # (G, n, d)
    answers: Tensor  # (G, n, e)
    tau: float | Tensor  # a float, or the 0-d tensor itself when its gradient is needed
    top_k: int | None
    normalize: bool
    squeeze_group: bool  # the outputs carry no group dim (``lead == ()``)
    cluster_mask: Tensor | None = None  # bool (G, n), True = absent cluster
    lead: tuple = ()  # leading dims of the outputs: out.reshape(*lead, -1, e)
    tau_value: float = 0.0  # tau as a Python float (for kernels and checks)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def needs_tau_grad(self) -> bool:
        return isinstance(self.tau, Tensor) and self.tau.requires_grad

    def describe(self) -> str:
        mask = "" if self.cluster_mask is None else ", cluster_mask"
        return (
            f"q{tuple(self.q.shape)} centroids{tuple(self.centroids.shape)} answers{tuple(self.answers.shape)} "
            f"{self.dtype} on {self.device}, top_k={self.top_k}{mask}"
        )


_SUPPORTED = frozenset(SUPPORTED_DTYPES)  # a hash lookup per call instead of a scan


def _tensor(name: str, t) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {t.dtype}")
    return t


def _same(name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")


def check_attention(q, k, v, *, prior, alpha, causal, key_padding_mask, scale, dropout_p,
                    check_values: bool = True) -> AttentionProblem:
    """``check_values=False`` leaves the prior's values to the caller (``Prior.check_values``), e.g. for a
    backend whose kernel checks them."""
    # Runs on every call: each tensor attribute is read once, and messages are built only on failure.
    q, k, v = _tensor("q", q), _tensor("k", k), _tensor("v", v)
    qs, ks, vs = q.shape, k.shape, v.shape
    for name, shape in (("q", qs), ("k", ks), ("v", vs)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D (B, H, L, D), got shape {tuple(shape)}")
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device:
        _same("k", k, q, "q")
        _same("v", v, q, "q")
    b, hq, lq, d = qs
    _, hkv, lk, dv = vs
    if ks[0] != b or vs[0] != b:
        raise ValueError(f"q, k, v must share the batch size: got {b}, {ks[0]}, {vs[0]}")
    if ks[1] != hkv:
        raise ValueError(f"v must have the same number of heads as k ({ks[1]}), got {hkv}")
    if ks[2] != lk:
        raise ValueError(f"v must have the same length as k (Lk = {ks[2]}), got {lk}")
    lk = ks[2]
    if ks[3] != d:
        raise ValueError(f"k must have the same head dim as q (D = {d}), got {ks[3]}")
    if d == 0 or dv == 0:
        raise ValueError(f"head dims must be >= 1, got q/k D = {d} and v Dv = {dv}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"the number of query heads Hq = {hq} must be a multiple of the key/value heads Hkv = {hkv}"
        )

    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    scale = float(scale)

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"key_padding_mask must have shape (B, Lk) = ({b}, {lk}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != device:
            raise ValueError(
                f"key_padding_mask must be on the same device as q ({device}), got {key_padding_mask.device}"
            )

    alpha = float(alpha) if type(alpha) is float and math.isfinite(alpha) else _check_alpha(alpha, hq, device)

    if prior is not None:
        if not isinstance(prior, Prior):
            raise TypeError(
                "prior must be None or a rapkern prior (RelativeLagPrior, BandedPrior, LowRankPrior, "
                f"DensePrior), got {type(prior).__name__}"
            )
        prior.check(b, hq, lq, lk, device, values=check_values)

    return AttentionProblem(q, k, v, prior, alpha, causal, key_padding_mask, scale, float(dropout_p))


def _check_alpha(alpha, heads: int, device: torch.device) -> float | Tensor:
    if isinstance(alpha, bool):
        raise TypeError("alpha must be a float or a floating tensor of shape () or (Hq,), got bool")
    if isinstance(alpha, (int, float)):
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        return float(alpha)
    if not isinstance(alpha, Tensor):
        raise TypeError(
            f"alpha must be a float or a floating tensor of shape () or (Hq,), got {type(alpha).__name__}"
        )
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must be a floating tensor, got dtype {alpha.dtype}")
    if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.shape[0] != heads):
        raise ValueError(f"alpha must have shape () or (Hq,) = ({heads},), got {tuple(alpha.shape)}")
    if alpha.device != device:
        raise ValueError(f"alpha must be on the same device as q ({device}), got {alpha.device}")
    return alpha


def _check_tau(tau) -> tuple[float | Tensor, float]:
    """(tau as a float, or the 0-d tensor when a gradient must reach it; its value as a float)."""
    t = None
    if isinstance(tau, Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau must be a scalar, got a tensor of shape {tuple(tau.shape)}")
        if not tau.is_floating_point():
            raise TypeError(f"tau must be a float or a floating tensor, got dtype {tau.dtype}")
        t, tau = tau, tau.detach().reshape(()).item()  # one host sync: the value is checked up front
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    keep = t is not None and t.requires_grad and torch.is_grad_enabled()
    return (t.reshape(()) if keep else float(tau)), float(tau)


def check_route(q, centroids, answers, *, tau, top_k, normalize, cluster_mask=None) -> RouteProblem:
    q, c, a = _tensor("q", q), _tensor("centroids", centroids), _tensor("answers", answers)
    if q.dim() not in (2, 3):
        raise ValueError(f"q must be (N, d) or (G, N, d), got shape {tuple(q.shape)}")
    shared = q.dim() == 3 and c.dim() == 2  # one (n, d) table for a batch of query sets
    if shared:
        if a.dim() != 2:
            raise ValueError(f"answers must be (n, ·) like centroids (a shared table), got shape {tuple(a.shape)}")
    else:
        for name, t in (("centroids", c), ("answers", a)):
            if t.dim() != q.dim():
                want = "(n, ·)" if q.dim() == 2 else "(G, n, ·)"
                raise ValueError(f"{name} must be {want} like q (rank {q.dim()}), got shape {tuple(t.shape)}")
    _same("centroids", c, q, "q")
    _same("answers", a, q, "q")
    if q.dim() == 3 and not shared and not (c.shape[0] == a.shape[0] == q.shape[0]):
        raise ValueError(
            f"q, centroids and answers must share the group dim G: got {q.shape[0]}, {c.shape[0]}, {a.shape[0]}"
        )
    if c.shape[-1] != q.shape[-1]:
        raise ValueError(f"centroids must have the feature dim of q (d = {q.shape[-1]}), got {c.shape[-1]}")
    n = c.shape[-2]
    if a.shape[-2] != n:
        raise ValueError(f"centroids and answers must have the same number of clusters n: got {n} and {a.shape[-2]}")
    if n == 0:
        raise ValueError("centroids must hold at least one cluster, got n = 0")

    tau, tau_value = _check_tau(tau)

    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k must be None or an int, got {type(top_k).__name__}")
        if not (1 <= top_k <= n):
            raise ValueError(f"top_k must be in [1, n] = [1, {n}], got {top_k}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")

    g = q.shape[0] if q.dim() == 3 else None
    if cluster_mask is not None:
        if not isinstance(cluster_mask, Tensor):
            raise TypeError(f"cluster_mask must be None or a bool tensor, got {type(cluster_mask).__name__}")
        if cluster_mask.dtype != torch.bool:
            raise TypeError(
                f"cluster_mask must be a bool tensor (True = absent cluster), got dtype {cluster_mask.dtype}"
            )
        allowed = [(n,)] if g is None else [(n,), (g, n)]
        if tuple(cluster_mask.shape) not in allowed:
            want = " or ".join(str(s) for s in allowed)
            raise ValueError(f"cluster_mask must have shape {want}, got {tuple(cluster_mask.shape)}")
        if cluster_mask.device != q.device:
            raise ValueError(f"cluster_mask must be on the same device as q ({q.device}), got {cluster_mask.device}")

    lead = () if g is None else (g,)
    if q.dim() == 2:
        q, c, a = q.unsqueeze(0), c.unsqueeze(0), a.unsqueeze(0)
    elif shared and (cluster_mask is None or cluster_mask.dim() == 1):
        q, c, a = q.reshape(1, -1, q.shape[-1]), c.unsqueeze(0), a.unsqueeze(0)  # one group: G·N queries
    elif shared:  # a per-group mask over one table: the table is broadcast (a view, no copy)
        c, a = c.expand(g, *c.shape), a.expand(g, *a.shape)
    if cluster_mask is not None:
        cluster_mask = cluster_mask.reshape(-1, n).expand(q.shape[0], n)
    return RouteProblem(q, c, a, tau, top_k, normalize, lead == (), cluster_mask, lead, tau_value)
