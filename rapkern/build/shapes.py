"""Step 5 of the seed: map a dense token×token prior matrix to the compact priors the kernels take.

Each mapping is the least-squares projection onto its family, so its error is known:

* ``to_lag_prior``: ``table[W + d]`` = mean of the entries with ``clamp(i − j, −W, W) = d``: exact for a
  Toeplitz matrix (with W = L − 1); otherwise the closest lag prior in Frobenius norm.
* ``to_band_prior(width)``: exact inside ``|j − i| ≤ width``; the error is the matrix outside the band.
* ``to_lowrank_prior(rank | energy)``: truncated SVD, ``u = U_r √Σ_r``, ``v = V_r √Σ_r``; the relative squared
  Frobenius error is exactly ``1 − energy kept`` (Eckart–Young).
* ``to_dense_prior``: the matrix itself.

``M`` is ``(L, L)`` or ``(H, L, L)`` (one matrix per head); ``heads=n`` repeats a single matrix over n heads.
``stack_priors`` puts priors from different sources side by side as one per-head prior (a head family).
"""

from __future__ import annotations

import numpy as np
import torch

from ..priors import BandedPrior, DensePrior, LowRankPrior, Prior, RelativeLagPrior


def _as_stack(M, name: str = "M") -> tuple[np.ndarray, bool]:
    if isinstance(M, torch.Tensor):
        M = M.detach().cpu().numpy()
    if not isinstance(M, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(M).__name__}")
    if M.ndim not in (2, 3) or M.shape[-1] != M.shape[-2] or M.shape[-1] == 0:
        raise ValueError(f"{name} must be a square matrix (L, L) or a stack (H, L, L), got shape {M.shape}")
    M = np.asarray(M, dtype=np.float64)
    if not np.isfinite(M).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(M)).sum())} NaN/inf entries")
    return (M if M.ndim == 3 else M[None]), M.ndim == 3


def _out(x: np.ndarray, stacked: bool, heads, dtype) -> torch.Tensor:
    """(H, ...) array → tensor with leading (H,), () or (heads,)."""
    t = torch.as_tensor(x, dtype=dtype)
    if stacked:
        if heads is not None:
            raise ValueError("heads= repeats a single (L, L) matrix; got a per-head stack (H, L, L)")
        return t
    t = t[0]
    if heads is None:
        return t
    if not (isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1):
        raise ValueError(f"heads must be a positive int or None, got {heads!r}")
    return t.expand(heads, *t.shape).clone()


def to_lag_prior(M, max_lag: int | None = None, *, heads=None, dtype=torch.float32) -> RelativeLagPrior:
    S, stacked = _as_stack(M)
    L = S.shape[-1]
    W = L - 1 if max_lag is None else max_lag
    if not (isinstance(W, int) and 0 <= W):
        raise ValueError(f"max_lag must be a non-negative int or None, got {max_lag!r}")
    i = np.arange(L)
    d = np.clip(i[:, None] - i[None, :], -W, W) + W  # table index of each entry
    counts = np.bincount(d.ravel(), minlength=2 * W + 1).astype(np.float64)
    tables = np.stack([np.bincount(d.ravel(), weights=s.ravel(), minlength=2 * W + 1) for s in S])
    tables = np.divide(tables, counts, out=np.zeros_like(tables), where=counts > 0)
    return RelativeLagPrior(_out(tables, stacked, heads, dtype))


def to_band_prior(M, width: int, *, heads=None, mask_outside: bool = False, dtype=torch.float32) -> BandedPrior:
    S, stacked = _as_stack(M)
    L = S.shape[-1]
    if not (isinstance(width, int) and not isinstance(width, bool) and width >= 0):
        raise ValueError(f"width must be a non-negative int, got {width!r}")
    i = np.arange(L)[:, None]
    j = i + np.arange(-width, width + 1)[None, :]
    ok = (j >= 0) & (j < L)
    vals = np.where(ok[None], S[:, i, np.clip(j, 0, L - 1)], 0.0)
    return BandedPrior(_out(vals, stacked, heads, dtype), mask_outside=mask_outside)


def to_lowrank_prior(M, rank: int | None = None, energy: float | None = None, *, heads=None,
                     dtype=torch.float32) -> tuple[LowRankPrior, float | list[float]]:
    """Truncated SVD; returns the prior and the energy kept (Σ_r σ² / Σ σ²; a list for a stack)."""
    S, stacked = _as_stack(M)
    L = S.shape[-1]
    if rank is not None and energy is not None:
        raise ValueError("give rank or energy, not both")
    if rank is None and energy is None:
        energy = 0.9
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= L):
        raise ValueError(f"rank must be an int in [1, {L}], got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"energy must be a fraction in (0, 1], got {energy!r}")
    U, sig, Vt = np.linalg.svd(S)
    total = (sig**2).sum(axis=-1)
    cum = np.divide(np.cumsum(sig**2, axis=-1), total[:, None], out=np.ones_like(sig), where=total[:, None] > 0)
    if rank is None:
        ranks = [int(np.searchsorted(c, energy - 1e-12) + 1) for c in cum]
        r = max(ranks)
    else:
        ranks, r = [rank] * len(S), rank
    u = np.zeros((len(S), L, r))
    v = np.zeros((len(S), L, r))
    for h, rh in enumerate(ranks):
        root = np.sqrt(sig[h, :rh])
        u[h, :, :rh] = U[h, :, :rh] * root
        v[h, :, :rh] = Vt[h, :rh].T * root
    kept = [float(cum[h, rh - 1]) for h, rh in enumerate(ranks)]
    prior = LowRankPrior(_out(u, stacked, heads, dtype), _out(v, stacked, heads, dtype))
    return prior, (kept if stacked else kept[0])


def to_dense_prior(M, *, heads=None, dtype=torch.float32) -> DensePrior:
    S, stacked = _as_stack(M)
    return DensePrior(_out(S, stacked, heads, dtype))


def _heads_of(p: Prior) -> int:
    t = p.tensors()[0]
    trailing = 1 if p.kind == "lag" else 2
    lead = t.dim() - trailing
    if lead > 1:
        raise ValueError(f"stack_priors takes priors with leading dims () or (H,), got {type(p).__name__} "
                         f"with tensor shape {tuple(t.shape)}")
    return 1 if lead == 0 else t.shape[0]


def stack_priors(priors: list) -> Prior:
    """One per-head prior from several: each entry (a prior with leading dims () or (H,), or None for a free
    head) gives the next head(s). All priors must be of one kind and shape; low-rank factors are zero-padded
    to the largest rank. A free head gets an all-zero prior, i.e. no bias whatever its α."""
    if not isinstance(priors, (list, tuple)) or not priors:
        raise TypeError("priors must be a non-empty list of priors or None")
    given = [p for p in priors if p is not None]
    if not given:
        raise ValueError("priors must contain at least one prior (None marks a free head)")
    kinds = {type(p) for p in given}
    if len(kinds) != 1 or not issubclass(next(iter(kinds)), Prior):
        raise TypeError(f"priors must all be rapkern priors of one kind, got {sorted(k.__name__ for k in kinds)}")
    ref = given[0]
    masks = {getattr(p, "mask_outside", False) for p in given}
    if len(masks) != 1:
        raise ValueError("banded priors to stack must agree on mask_outside")
    r = max(p.rank for p in given) if ref.kind == "lowrank" else None

    def per_head(p):
        h = _heads_of(p)
        out = []
        for t in p.tensors():
            t = t.detach()
            t = t.unsqueeze(0) if t.dim() == (1 if p.kind == "lag" else 2) else t
            if r is not None and t.shape[-1] < r:
                t = torch.cat([t, t.new_zeros(*t.shape[:-1], r - t.shape[-1])], dim=-1)
            out.append(t)
        return h, out

    ref_parts = per_head(ref)[1]
    parts: list[list[torch.Tensor]] = [[] for _ in ref_parts]
    for p in priors:
        if p is None:
            for k, t in enumerate(ref_parts):
                parts[k].append(torch.zeros_like(t[:1]))
            continue
        if type(p) is not type(ref):
            raise TypeError("priors must all be of one kind")
        _, ts = per_head(p)
        for k, t in enumerate(ts):
            if t.shape[1:] != ref_parts[k].shape[1:]:
                raise ValueError(f"priors to stack must have equal shapes, got {tuple(t.shape[1:])} and "
                                 f"{tuple(ref_parts[k].shape[1:])}")
            parts[k].append(t)
    tensors = [torch.cat(ts, dim=0) for ts in parts]
    if ref.kind == "banded":
        return BandedPrior(tensors[0], mask_outside=ref.mask_outside)
    return type(ref)(*tensors)


def relative_error(prior: Prior, M) -> float:
    """‖materialized prior − M‖_F / ‖M‖_F (per-head stacks compared head by head)."""
    S, _ = _as_stack(M)
    L = S.shape[-1]
    B = prior.materialize(1, S.shape[0], L, L)[0].double().numpy()
    B = np.broadcast_to(B, S.shape)
    den = np.linalg.norm(S)
    return float(np.linalg.norm(B - S) / den) if den > 0 else float(np.linalg.norm(B))
