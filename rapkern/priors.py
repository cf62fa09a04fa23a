"""The prior kinds and what B[i, j] is for each: the one source of truth.

Every backend and the float64 reference take B from here, never re-deriving the index math:

* ``RelativeLagPrior(table)``, table ``(..., 2W+1)``: ``B[i, j] = table[W + clamp(i - j, -W, W)]``.
* ``BandedPrior(values, mask_outside)``, values ``(..., Lq, 2w+1)``:
  ``B[i, j] = values[i, w + (j - i)]`` for ``|j - i| <= w``; outside the band 0, or, with
  ``mask_outside=True``, key j is not attended (``-inf``, whatever the head's alpha).
* ``LowRankPrior(u, v)``, u ``(..., Lq, r)``, v ``(..., Lk, r)``: ``B = u vᵀ``.
* ``DensePrior(bias)``, bias ``(..., Lq, Lk)``.

Leading dims ``...`` are ``()``, ``(Hp,)`` or ``(Bp, Hp)`` with Bp in {1, B}, Hp in {1, Hq}. Internally every
tensor is viewed as 4-D ``(Bp, Hp, rows, cols)``.

Blocked backends ask for one tile at a time (``block``) and hand back the gradient of that tile
(``accumulate_grad``), so nothing of size Lq x Lk is ever built unless the user gave a dense bias.
Gradient reductions here use no scatter/atomics, so they are deterministic on every device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Prior", "RelativeLagPrior", "BandedPrior", "LowRankPrior", "DensePrior", "lead4", "sum_to"]


def lead4(t: Tensor, trailing: int) -> Tensor:
    """View ``t`` (leading dims (), (Hp,) or (Bp, Hp), then ``trailing`` dims) as 4-D-ish (Bp, Hp, ...)."""
    lead = t.dim() - trailing
    if lead == 2:
        return t
    if lead == 1:
        return t.unsqueeze(0)
    return t.reshape((1, 1) + tuple(t.shape))


def sum_to(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Sum ``t`` over the dims where ``shape`` broadcasts (size 1); same rank assumed."""
    dims = [d for d, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _check_leading(name: str, t: Tensor, trailing: int, batch: int, heads: int) -> None:
    shape = t.shape
    n_lead = len(shape) - trailing
    if n_lead < 0 or n_lead > 2:
        raise ValueError(
            f"{name} must have {trailing} trailing dims and leading dims (), (Hp,) or (Bp, Hp); "
            f"got shape {tuple(shape)}"
        )
    hp = shape[n_lead - 1] if n_lead else 1
    bp = shape[0] if n_lead == 2 else 1
    if (hp != 1 and hp != heads) or (bp != 1 and bp != batch):
        lead = tuple(shape[:n_lead])
        raise ValueError(
            f"{name} leading dims {lead} do not broadcast to (B, Hq) = ({batch}, {heads}): "
            f"allowed are (), (Hp,) or (Bp, Hp) with Bp in {{1, {batch}}} and Hp in {{1, {heads}}}"
        )


def _check_tensor(name: str, t, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {t.device}")


_NONFINITE_HINT = (
    "; to exclude keys use causal=, key_padding_mask=, BandedPrior(mask_outside=True) or -inf entries of a DensePrior"
)


def _check_values(name: str, t: Tensor, allow_neginf: bool = False) -> None:
    """Compact priors must be finite: ``α·(±inf)`` has no meaning for α = 0 (it would be NaN), so a lag
    table or band cannot mask. Only a dense bias may hold -inf (a mask for every head, whatever α).

    Reads the tensor once (a host sync on CUDA); under torch.compile it becomes an in-graph assert.
    """
    if t.device.type == "meta" or t.numel() == 0:  # shapes only (fake/meta dispatch): no values to check
        return
    what = "NaN or +inf" if allow_neginf else "non-finite values (NaN or ±inf)"
    msg = f"{name} must not contain {what}" + ("" if allow_neginf else _NONFINITE_HINT)
    if torch.compiler.is_compiling():
        if allow_neginf:
            hi = t.amax()
            ok = ~(torch.isnan(hi) | torch.isposinf(hi))
        else:
            lo, hi = torch.aminmax(t)
            ok = torch.isfinite(lo) & torch.isfinite(hi)
        torch._assert_async(ok, msg)
        return
    # Eager: one reduction and one host read. A finite sum proves every entry finite (NaN and ±inf
    # propagate); only when it is not finite (a bad entry, a -inf mask, or an overflow of large finite
    # values) do we look closer. This is a per-call cost of every prior, so it is one small op.
    if allow_neginf:  # a dense bias: -inf entries are masks, so look at the maximum only (NaN propagates)
        hi = t.detach().amax().item()
        if not (math.isnan(hi) or hi == math.inf):
            return
    elif math.isfinite(t.detach().sum().item()):  # detach: no autograd node for a check
        return
    bad = (torch.isnan(t) | torch.isposinf(t)) if allow_neginf else ~torch.isfinite(t)
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(msg + f"; got {n_bad} such entries")


class Prior:
    """Base class. Subclasses hold compact tensors and answer per-tile questions."""

    kind: str = "none"
    masks_outside: bool = False

    def tensors(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def with_tensors(self, *tensors: Tensor) -> "Prior":
        """The same prior over other tensors (used by autograd to pass detached copies)."""
        raise NotImplementedError

    def check(self, batch: int, heads: int, lq: int, lk: int, device: torch.device, values: bool = True) -> None:
        """Types, devices and shapes; also the values (``check_values``) unless ``values=False`` (a backend
        whose kernel checks them itself before computing, see ``Backend.checks_prior_values``)."""
        raise NotImplementedError

    def check_values(self) -> None:
        """ValueError if a tensor holds values the prior cannot have (see ``_check_values``)."""
        raise NotImplementedError

    def lead_shape(self) -> tuple[int, int]:
        """(Bp, Hp) of a tile returned by ``block``."""
        raise NotImplementedError

    def key_range(self, i0: int, i1: int, lk: int) -> tuple[int, int]:
        """Keys that can be visible to queries [i0, i1) as far as the prior is concerned."""
        return 0, lk

    def block(self, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype) -> Tensor:
        """Tile ``B[:, :, i0:i1, j0:j1]`` as (Bp, Hp, i1-i0, j1-j0) in ``dtype``; finite (0 off-band)."""
        raise NotImplementedError

    def visible(self, i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
        """Bool (i1-i0, j1-j0) tile of keys the prior lets each query see, or None for all."""
        return None

    def accumulate_grad(self, grads: list, ds: Tensor, i0: int, i1: int, j0: int, j1: int) -> None:
        """Add ``dL/dB`` of one tile (``ds``, already summed to (Bp, Hp, bq, nk)) into ``grads``.

        ``grads[k]`` is a float buffer shaped like ``lead4(tensors()[k])`` or None when that tensor
        needs no gradient.
        """
        raise NotImplementedError

    def materialize(self, batch: int, heads: int, lq: int, lk: int) -> Tensor:
        """The dense bias ``(Bp, Hp, lq, lk)``, -inf where ``mask_outside`` excludes a key."""
        tile = self.block(0, lq, 0, lk, self.tensors()[0].dtype)
        vis = self.visible(0, lq, 0, lk)
        return tile if vis is None else tile.masked_fill(~vis, float("-inf"))

    def __repr__(self) -> str:
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors())
        return f"{type(self).__name__}({shapes})"


class RelativeLagPrior(Prior):
    """``B[i, j] = table[W + clamp(i - j, -W, W)]``; table ``(..., 2W+1)``."""

    kind = "lag"

    def __init__(self, table: Tensor):
        self.table = table

    def tensors(self):
        return (self.table,)

    def with_tensors(self, table):
        return RelativeLagPrior(table)

    @property
    def window(self) -> int:
        return (self.table.shape[-1] - 1) // 2

    def check(self, batch, heads, lq, lk, device, values=True):
        _check_tensor("RelativeLagPrior.table", self.table, device)
        if values:
            self.check_values()
        _check_leading("RelativeLagPrior.table", self.table, 1, batch, heads)
        n = self.table.shape[-1]
        if n % 2 == 0:
            raise ValueError(f"RelativeLagPrior.table must have odd length 2W+1 in its last dim, got {n}")

    def check_values(self):
        _check_values("RelativeLagPrior.table", self.table)

    def lead_shape(self):
        return tuple(lead4(self.table, 1).shape[:2])

    def _lags(self, i0, i1, j0, j1) -> Tensor:
        # g[m] covers lag (i0 - j0 - (nk - 1)) + m for m in [0, bq + nk - 1)
        nk = j1 - j0
        lag0 = i0 - j0 - (nk - 1)
        return torch.arange(lag0, lag0 + (i1 - i0) + nk - 1, device=self.table.device)

    def block(self, i0, i1, j0, j1, dtype):
        w = self.window
        idx = self._lags(i0, i1, j0, j1).clamp(-w, w) + w
        g = lead4(self.table, 1).to(dtype)[..., idx]
        # T[r, c] = g[r - c + nk - 1]: a Toeplitz tile, built as Hankel windows flipped left-right.
        return g.unfold(-1, j1 - j0, 1).flip(-1)

    def accumulate_grad(self, grads, ds, i0, i1, j0, j1):
        if grads[0] is None:
            return
        bq, nk = i1 - i0, j1 - j0
        # Sum over anti-diagonals of the column-flipped tile (= the diagonals of ds) by skewing rows:
        # padding each row by bq and re-reading with row length nk+bq-1 shifts row r right by r.
        y = torch.nn.functional.pad(ds.flip(-1), (0, bq))
        lead = y.shape[:-2]
        y = y.reshape(*lead, bq * (nk + bq))[..., : bq * (nk + bq - 1)].reshape(*lead, bq, nk + bq - 1)
        per_lag = y.sum(-2)  # per_lag[m] is the gradient of g[m]
        _add_clamped(grads[0], per_lag, i0 - j0 - (nk - 1), self.window)


def _add_clamped(dst: Tensor, per_lag: Tensor, lag0: int, w: int) -> None:
    """dst[..., w + clamp(lag0 + m, -w, w)] += per_lag[..., m], reduced in a fixed order (no scatter)."""
    n = per_lag.shape[-1]
    m_lo = min(max(-w + 1 - lag0, 0), n)  # m < m_lo: lag <= -w, clamped onto entry 0
    m_hi = max(min(max(w - lag0, 0), n), m_lo)  # m >= m_hi: lag >= w, clamped onto entry 2w
    if m_lo > 0:
        dst[..., 0] += per_lag[..., :m_lo].sum(-1)
    if m_hi < n:
        dst[..., 2 * w] += per_lag[..., m_hi:].sum(-1)
    if m_hi > m_lo:
        start = lag0 + m_lo + w
        dst[..., start : start + (m_hi - m_lo)] += per_lag[..., m_lo:m_hi]


class BandedPrior(Prior):
    """``B[i, j] = values[i, w + (j - i)]`` for ``|j - i| <= w``; values ``(..., Lq, 2w+1)``."""

    kind = "banded"

    def __init__(self, values: Tensor, mask_outside: bool = False):
        self.values = values
        self.mask_outside = bool(mask_outside)
        self.masks_outside = self.mask_outside

    def tensors(self):
        return (self.values,)

    def with_tensors(self, values):
        return BandedPrior(values, self.mask_outside)

    @property
    def half_width(self) -> int:
        return (self.values.shape[-1] - 1) // 2

    def check(self, batch, heads, lq, lk, device, values=True):
        _check_tensor("BandedPrior.values", self.values, device)
        if values:
            self.check_values()
        _check_leading("BandedPrior.values", self.values, 2, batch, heads)
        n = self.values.shape[-1]
        if n % 2 == 0:
            raise ValueError(f"BandedPrior.values must have odd width 2w+1 in its last dim, got {n}")
        if self.values.shape[-2] != lq:
            raise ValueError(
                f"BandedPrior.values must have Lq = {lq} rows (dim -2), got {self.values.shape[-2]}"
            )

    def check_values(self):
        _check_values("BandedPrior.values", self.values)

    def lead_shape(self):
        return tuple(lead4(self.values, 2).shape[:2])

    def key_range(self, i0, i1, lk):
        if not self.mask_outside:
            return 0, lk
        w = self.half_width
        return min(max(i0 - w, 0), lk), min(max(i1 + w, 0), lk)

    def _offsets(self, i0, i1, j0, j1) -> Tensor:
        dev = self.values.device
        i = torch.arange(i0, i1, device=dev)[:, None]
        j = torch.arange(j0, j1, device=dev)[None, :]
        return j - i + self.half_width  # inside the band iff 0 <= off <= 2w

    def block(self, i0, i1, j0, j1, dtype):
        w = self.half_width
        off = self._offsets(i0, i1, j0, j1)
        inside = (off >= 0) & (off <= 2 * w)
        vals = lead4(self.values, 2)[..., i0:i1, :].to(dtype)
        tile = torch.take_along_dim(vals, off.clamp(0, 2 * w)[None, None], dim=-1)
        return tile.masked_fill(~inside, 0.0)

    def visible(self, i0, i1, j0, j1):
        if not self.mask_outside:
            return None
        off = self._offsets(i0, i1, j0, j1)
        return (off >= 0) & (off <= 2 * self.half_width)

    def accumulate_grad(self, grads, ds, i0, i1, j0, j1):
        if grads[0] is None:
            return
        w = self.half_width
        dev = ds.device
        # column of key j = i + (k - w) inside this tile
        r = torch.arange(i0, i1, device=dev)[:, None]
        col = r + torch.arange(-w, w + 1, device=dev)[None, :] - j0
        valid = (col >= 0) & (col < j1 - j0)
        picked = torch.take_along_dim(ds, col.clamp(0, max(j1 - j0 - 1, 0))[None, None], dim=-1)
        picked = picked.masked_fill(~valid, 0.0)
        grads[0][..., i0:i1, :] += sum_to(picked, grads[0].shape[:2] + picked.shape[2:])


class LowRankPrior(Prior):
    """``B = u vᵀ`` with u ``(..., Lq, r)`` and v ``(..., Lk, r)``."""

    kind = "lowrank"

    def __init__(self, u: Tensor, v: Tensor):
        self.u = u
        self.v = v

    def tensors(self):
        return (self.u, self.v)

    def with_tensors(self, u, v):
        return LowRankPrior(u, v)

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    def check(self, batch, heads, lq, lk, device, values=True):
        _check_tensor("LowRankPrior.u", self.u, device)
        _check_tensor("LowRankPrior.v", self.v, device)
        if values:
            self.check_values()
        _check_leading("LowRankPrior.u", self.u, 2, batch, heads)
        _check_leading("LowRankPrior.v", self.v, 2, batch, heads)
        if self.u.shape[-2] != lq:
            raise ValueError(f"LowRankPrior.u must have Lq = {lq} rows (dim -2), got {self.u.shape[-2]}")
        if self.v.shape[-2] != lk:
            raise ValueError(f"LowRankPrior.v must have Lk = {lk} rows (dim -2), got {self.v.shape[-2]}")
        if self.u.shape[-1] != self.v.shape[-1]:
            raise ValueError(
                f"LowRankPrior.u and LowRankPrior.v must have the same rank (last dim), "
                f"got {self.u.shape[-1]} and {self.v.shape[-1]}"
            )

    def check_values(self):
        _check_values("LowRankPrior.u", self.u)
        _check_values("LowRankPrior.v", self.v)

    def lead_shape(self):
        a, b = lead4(self.u, 2).shape[:2], lead4(self.v, 2).shape[:2]
        return (max(a[0], b[0]), max(a[1], b[1]))

    def block(self, i0, i1, j0, j1, dtype):
        u = lead4(self.u, 2)[..., i0:i1, :].to(dtype)
        v = lead4(self.v, 2)[..., j0:j1, :].to(dtype)
        return torch.matmul(u, v.transpose(-1, -2))

    def accumulate_grad(self, grads, ds, i0, i1, j0, j1):
        gu, gv = grads
        if gu is not None:
            v = lead4(self.v, 2)[..., j0:j1, :].to(ds.dtype)
            part = torch.matmul(ds, v)
            gu[..., i0:i1, :] += sum_to(part, gu.shape[:2] + part.shape[2:])
        if gv is not None:
            u = lead4(self.u, 2)[..., i0:i1, :].to(ds.dtype)
            part = torch.matmul(ds.transpose(-1, -2), u)
            gv[..., j0:j1, :] += sum_to(part, gv.shape[:2] + part.shape[2:])


class DensePrior(Prior):
    """A dense bias ``(..., Lq, Lk)``, read tile by tile through its strides."""

    kind = "dense"

    def __init__(self, bias: Tensor):
        self.bias = bias

    def tensors(self):
        return (self.bias,)

    def with_tensors(self, bias):
        return DensePrior(bias)

    def check(self, batch, heads, lq, lk, device, values=True):
        _check_tensor("DensePrior.bias", self.bias, device)
        if values:
            self.check_values()
        _check_leading("DensePrior.bias", self.bias, 2, batch, heads)
        if tuple(self.bias.shape[-2:]) != (lq, lk):
            raise ValueError(
                f"DensePrior.bias must end in (Lq, Lk) = ({lq}, {lk}), got {tuple(self.bias.shape[-2:])}"
            )

    def check_values(self):
        _check_values("DensePrior.bias", self.bias, allow_neginf=True)

    def lead_shape(self):
        return tuple(lead4(self.bias, 2).shape[:2])

    def block(self, i0, i1, j0, j1, dtype):
        return lead4(self.bias, 2)[..., i0:i1, j0:j1].to(dtype)

    def accumulate_grad(self, grads, ds, i0, i1, j0, j1):
        if grads[0] is not None:
            grads[0][..., i0:i1, j0:j1] += sum_to(ds, grads[0].shape[:2] + ds.shape[2:])
