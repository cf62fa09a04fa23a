"""Prior modules: hold a prior's tensors as parameters or buffers and hand out the prior for given lengths.

``module(lq, lk)`` returns a ``rapkern`` prior object (``RelativeLagPrior``, ``BandedPrior``, ``LowRankPrior``,
``DensePrior``) whose tensors have leading dims ``(num_heads,)`` (or ``()`` / ``(1,)`` when head-shared), on
the module's device and dtype, differentiable where the module is learnable. Lengths the module cannot
serve (longer than it was built for) raise ``ValueError`` before any computation; shorter ones slice.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..priors import BandedPrior, DensePrior, LowRankPrior, Prior, RelativeLagPrior

__all__ = ["PriorModule", "LagPrior", "BandPrior", "FactorPrior", "FixedPrior", "alibi_slopes", "t5_bucket"]


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _finite(name: str, t: Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (compact priors cannot mask), got non-finite entries")


class PriorModule(nn.Module):
    """Base class: ``forward(lq, lk)`` returns the prior object for a query length lq and key length lk."""

    num_heads: int

    def _lengths(self, lq, lk) -> tuple[int, int]:
        return _int("lq", lq, 0), _int("lk", lk, 0)

    def _at_most(self, name: str, value: int, built: str, limit: int) -> None:
        if value > limit:
            raise ValueError(
                f"{name} = {value} exceeds the {built} = {limit} this {type(self).__name__} was built for; "
                f"shorter sequences work, longer ones need a larger module"
            )

    def forward(self, lq: int, lk: int) -> Prior:
        raise NotImplementedError


# --------------------------------------------------------------------------- lag tables


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's per-head slopes (Press et al.): 2^(-8h/H) for h = 1..H when H is a power of two; otherwise
    the slopes of the next lower power of two, then every other slope of twice that (the reference code)."""

    def pow2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if num_heads & (num_heads - 1) == 0:
        return torch.tensor(pow2(num_heads), dtype=torch.float64)
    low = 2 ** math.floor(math.log2(num_heads))
    return torch.tensor(pow2(low) + pow2(2 * low)[0::2][: num_heads - low], dtype=torch.float64)


def t5_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's ``_relative_position_bucket`` (relative_position = key index − query index), in its float32 math."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        n = relative_position.abs()
    else:
        n = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    large = (
        max_exact
        + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    )
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, n, large)


class LagPrior(PriorModule):
    """A per-head relative-lag table ``(num_heads, 2·max_lag+1)`` → ``RelativeLagPrior`` (lag = i − j).

    ``init``:

    * ``"zeros"``: no bias until trained.
    * ``"alibi"``: ``slope_h · (−|lag|)`` with ALiBi's slopes (:func:`alibi_slopes`), symmetric in the lag.
      Lags beyond ±max_lag take the end entries (constant), so exact ALiBi at length L needs
      ``max_lag >= L − 1``.
    * ``"t5"``: T5's log-spaced buckets. The parameters are per-bucket values ``bucket_values``
      ``(num_heads, num_buckets)`` shared by every lag in a bucket, as in T5 (so lags in one bucket stay tied
      while training); the table is gathered from them on each call, ``table[lag] = bucket_values[bucket(lag)]``
      with T5's ``relative_position = j − i = −lag``. Keywords ``num_buckets=32``, ``max_distance=128``,
      ``bidirectional=True`` (T5's defaults). Values start as N(0, 0.02²) (small, like T5's embedding init)
      so the buckets are distinguishable; exact T5 at length L needs ``max_lag >= min(L − 1, max_distance)``.
    * a tensor ``(num_heads, 2·max_lag+1)`` (per head) or ``(2·max_lag+1,)`` (shared by all heads), used as
      given (copied).

    ``learnable=False`` stores the table (or bucket values) as a buffer. Any lq, lk are served.
    """

    def __init__(
        self,
        num_heads: int,
        max_lag: int,
        init: str | Tensor = "zeros",
        learnable: bool = True,
        *,
        num_buckets: int | None = None,
        max_distance: int | None = None,
        bidirectional: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_heads = _int("num_heads", num_heads, 1)
        self.max_lag = _int("max_lag", max_lag, 0)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        self.learnable = learnable
        t5_kw = {"num_buckets": num_buckets, "max_distance": max_distance, "bidirectional": bidirectional}
        is_t5 = isinstance(init, str) and init == "t5"
        if not is_t5 and any(v is not None for v in t5_kw.values()):
            given = ", ".join(k for k, v in t5_kw.items() if v is not None)
            raise ValueError(f"{given} only apply to init='t5', got init={init!r}")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        n = 2 * self.max_lag + 1
        lags = torch.arange(-self.max_lag, self.max_lag + 1)
        self.init_kind = init if isinstance(init, str) else "tensor"

        if isinstance(init, Tensor):
            if not init.is_floating_point():
                raise TypeError(f"init tensor must be floating point, got dtype {init.dtype}")
            if tuple(init.shape) not in ((self.num_heads, n), (n,)):
                raise ValueError(
                    f"init tensor must have shape (num_heads, 2*max_lag+1) = ({self.num_heads}, {n}) or "
                    f"(2*max_lag+1,) = ({n},), got {tuple(init.shape)}"
                )
            _finite("init tensor", init)
            table = init.detach().clone().to(device=device, dtype=dtype if dtype is not None else init.dtype)
        elif not isinstance(init, str):
            raise TypeError(f"init must be 'zeros', 'alibi', 't5' or a tensor, got {type(init).__name__}")
        elif init == "zeros":
            table = torch.zeros(self.num_heads, n, **factory)
        elif init == "alibi":
            table = (-alibi_slopes(self.num_heads)[:, None] * lags.abs()[None, :]).to(**factory)
        elif init == "t5":
            self.bidirectional = True if bidirectional is None else bidirectional
            if not isinstance(self.bidirectional, bool):
                raise TypeError(f"bidirectional must be a bool, got {type(self.bidirectional).__name__}")
            self.num_buckets = _int("num_buckets", 32 if num_buckets is None else num_buckets, 1)
            max_exact = (self.num_buckets // 2 if self.bidirectional else self.num_buckets) // 2
            if max_exact < 1:
                raise ValueError(
                    f"num_buckets must be >= {4 if self.bidirectional else 2} "
                    f"(bidirectional={self.bidirectional}), got {self.num_buckets}"
                )
            self.max_distance = _int("max_distance", 128 if max_distance is None else max_distance, 1)
            if self.max_distance <= max_exact:
                raise ValueError(
                    f"max_distance must exceed the exact range num_buckets/{4 if self.bidirectional else 2} = "
                    f"{max_exact}, got {self.max_distance}"
                )
            index = t5_bucket(-lags, self.bidirectional, self.num_buckets, self.max_distance)
            self.register_buffer("bucket_index", index.to(device), persistent=False)
            values = torch.randn(self.num_heads, self.num_buckets, **factory) * 0.02
            self._store("bucket_values", values)
            return
        else:
            raise ValueError(f"init must be 'zeros', 'alibi', 't5' or a tensor, got {init!r}")
        self._store("table", table)

    def _store(self, name: str, t: Tensor) -> None:
        if self.learnable:
            self.register_parameter(name, nn.Parameter(t))
        else:
            self.register_buffer(name, t)

    def forward(self, lq: int, lk: int) -> RelativeLagPrior:
        self._lengths(lq, lk)
        if self.init_kind == "t5":
            return RelativeLagPrior(self.bucket_values[:, self.bucket_index])
        return RelativeLagPrior(self.table)

    def extra_repr(self) -> str:
        s = f"num_heads={self.num_heads}, max_lag={self.max_lag}, init={self.init_kind!r}, learnable={self.learnable}"
        if self.init_kind == "t5":
            s += f", num_buckets={self.num_buckets}, max_distance={self.max_distance}"
            s += f", bidirectional={self.bidirectional}"
        return s


# --------------------------------------------------------------------------- band and low rank


class BandPrior(PriorModule):
    """Learnable band values ``(num_heads, seq_len, 2·width+1)`` → ``BandedPrior`` (starting at 0).

    ``mask_outside=True`` makes it sliding-window attention (keys farther than ``width`` are not attended).
    lq < seq_len uses the first lq rows; lq > seq_len raises; lk is free.
    """

    def __init__(
        self, num_heads: int, seq_len: int, width: int, mask_outside: bool = False, *, device=None, dtype=None
    ):
        super().__init__()
        self.num_heads = _int("num_heads", num_heads, 1)
        self.seq_len = _int("seq_len", seq_len, 1)
        self.width = _int("width", width, 0)
        if not isinstance(mask_outside, bool):
            raise TypeError(f"mask_outside must be a bool, got {type(mask_outside).__name__}")
        self.mask_outside = mask_outside
        self.values = nn.Parameter(
            torch.zeros(self.num_heads, self.seq_len, 2 * self.width + 1, device=device, dtype=dtype)
        )

    def forward(self, lq: int, lk: int) -> BandedPrior:
        lq, _ = self._lengths(lq, lk)
        self._at_most("lq", lq, "seq_len", self.seq_len)
        return BandedPrior(self.values[:, :lq], mask_outside=self.mask_outside)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, seq_len={self.seq_len}, width={self.width}, mask_outside={self.mask_outside}"
        )


class FactorPrior(PriorModule):
    """Learnable low-rank factors u ``(num_heads, len_q, rank)``, v ``(num_heads, len_k, rank)`` → ``LowRankPrior``.

    Both factors start as N(0, σ²) with σ = (init_std² / rank)^(1/4), so the entries of u vᵀ have standard
    deviation ``init_std`` (default 0.01): small, but neither factor is 0 (u = v = 0 would get no gradient).
    Shorter lengths use the first rows of u and v; longer ones raise.
    """

    def __init__(
        self, num_heads: int, len_q: int, len_k: int, rank: int, *, init_std: float = 0.01, device=None, dtype=None
    ):
        super().__init__()
        self.num_heads = _int("num_heads", num_heads, 1)
        self.len_q = _int("len_q", len_q, 1)
        self.len_k = _int("len_k", len_k, 1)
        self.rank = _int("rank", rank, 1)
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)):
            raise TypeError(f"init_std must be a float, got {type(init_std).__name__}")
        if not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be finite and > 0, got {init_std}")
        sigma = (init_std**2 / self.rank) ** 0.25
        kw = {"device": device, "dtype": dtype}
        self.u = nn.Parameter(torch.randn(self.num_heads, self.len_q, self.rank, **kw) * sigma)
        self.v = nn.Parameter(torch.randn(self.num_heads, self.len_k, self.rank, **kw) * sigma)

    def forward(self, lq: int, lk: int) -> LowRankPrior:
        lq, lk = self._lengths(lq, lk)
        self._at_most("lq", lq, "len_q", self.len_q)
        self._at_most("lk", lk, "len_k", self.len_k)
        return LowRankPrior(self.u[:, :lq], self.v[:, :lk])

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, len_q={self.len_q}, len_k={self.len_k}, rank={self.rank}"


# --------------------------------------------------------------------------- any prior, fixed

_FIELDS = {  # prior class -> (tensor attribute names, trailing dims of each)
    RelativeLagPrior: (("table",), 1),
    BandedPrior: (("values",), 2),
    LowRankPrior: (("u", "v"), 2),
    DensePrior: (("bias",), 2),
}


class FixedPrior(PriorModule):
    """Any rapkern prior object held as buffers (detached, sharing storage with the given tensors), so
    ``.to()``, ``state_dict`` and ``deepcopy`` carry it; e.g. a prior built from data.

    Shorter lengths: a lag table serves any length; a band uses its first lq rows (lk free); low-rank
    factors use their first lq / lk rows; a dense bias is sliced ``[:lq, :lk]``. Longer ones raise.
    ``num_heads`` is the prior's head dim (1 when head-shared).
    """

    def __init__(self, prior: Prior):
        super().__init__()
        if type(prior) not in _FIELDS:
            raise TypeError(
                f"prior must be a RelativeLagPrior, BandedPrior, LowRankPrior or DensePrior, got {type(prior).__name__}"
            )
        names, trailing = _FIELDS[type(prior)]
        tensors = prior.tensors()
        for name, t in zip(names, tensors):
            label = f"{type(prior).__name__}.{name}"
            if not isinstance(t, Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(t).__name__}")
            if not (trailing <= t.dim() <= trailing + 2):
                raise ValueError(
                    f"{label} must have {trailing} trailing dims and leading dims (), (Hp,) or (Bp, Hp); "
                    f"got shape {tuple(t.shape)}"
                )
        self.kind = prior.kind
        self.mask_outside = bool(getattr(prior, "mask_outside", False))
        bp, hp = prior.lead_shape()
        if self.kind == "lag":
            rows = (0, 0)
        elif self.kind == "banded":
            rows = (tensors[0].shape[-2], 0)
        elif self.kind == "lowrank":
            rows = (tensors[0].shape[-2], tensors[1].shape[-2])
        else:
            rows = tuple(tensors[0].shape[-2:])
        # The prior's own checks (dtype, finiteness, leading dims, matching ranks) at its full size.
        prior.check(bp, hp, rows[0], rows[1], tensors[0].device)
        self.num_heads = hp
        self.max_lq, self.max_lk = rows  # 0 = unbounded
        self._names = names
        for name, t in zip(names, tensors):
            self.register_buffer(name, t.detach())

    def forward(self, lq: int, lk: int) -> Prior:
        lq, lk = self._lengths(lq, lk)
        if self.kind == "lag":
            return RelativeLagPrior(self.table)
        self._at_most("lq", lq, "Lq", self.max_lq)
        if self.kind == "banded":
            return BandedPrior(self.values[..., :lq, :], mask_outside=self.mask_outside)
        self._at_most("lk", lk, "Lk", self.max_lk)
        if self.kind == "lowrank":
            return LowRankPrior(self.u[..., :lq, :], self.v[..., :lk, :])
        return DensePrior(self.bias[..., :lq, :lk])

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self._names)
        extra = f", mask_outside={self.mask_outside}" if self.kind == "banded" else ""
        return f"kind={self.kind!r}, num_heads={self.num_heads}, {shapes}{extra}"
