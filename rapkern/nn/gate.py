"""The gate: α per head, scaling the prior on the logits (``softmax(scale·QKᵀ + α_h·B + M)``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Gate"]

_MODES = ("fixed", "learnable", "annealed")
_SCHEDULES = ("linear", "cosine", "exponential")


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


class Gate(nn.Module):
    """α per head: ``forward() -> Tensor (num_heads,)``, the ``alpha`` of ``rapkern.attention``.

    Args:
        num_heads: number of query heads H.
        init: α to start from, a float or a tensor (H,).
        mode: ``"fixed"`` (a buffer), ``"learnable"`` (a parameter) or ``"annealed"`` (follows ``schedule``).
        heads: indices of the heads that get the prior (default: all). The others have α exactly 0 and no
            gradient reaches their entries, so they stay free attention heads.
        schedule: for ``"annealed"``, with t = min(step / total_steps, 1) and a = init, f = floor:
            ``"linear"`` α = f + (a − f)(1 − t); ``"cosine"`` α = f + (a − f)(1 + cos πt)/2;
            ``"exponential"`` α = f + (a − f)(e^{−rate·t} − e^{−rate}) / (1 − e^{−rate}), an exponential
            decay rescaled to reach the floor exactly at total_steps. After total_steps α stays at the floor.
            (floor > init gives a warm-up instead.)
        total_steps: length of the schedule (required for, and only accepted with, ``"annealed"``).
        floor: value the schedule ends at.
        rate: decay rate of ``"exponential"`` (default 5: after half the steps ≈ 8% of the way is left).

    The step counter is a buffer ``step_count`` (saved in the state_dict); ``gate.step()`` advances it by one,
    ``gate.step(n)`` or ``gate.set_step(n)`` sets it. It exists in every mode (so a loop can step all gates)
    but only an annealed gate's α depends on it. ``penalty()`` is the L2 regularizer Σ α² over the selected
    heads (differentiable when learnable).
    """

    def __init__(
        self,
        num_heads: int,
        init: float | Tensor = 0.1,
        mode: str = "fixed",
        heads=None,
        schedule: str = "linear",
        total_steps: int | None = None,
        floor: float = 0.0,
        *,
        rate: float = 5.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_heads = _int("num_heads", num_heads, 1)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        self.mode, self.schedule = mode, schedule
        if mode == "annealed":
            if total_steps is None:
                raise ValueError("total_steps is required with mode='annealed'")
            self.total_steps = _int("total_steps", total_steps, 1)
        elif total_steps is not None:
            raise ValueError(f"total_steps only applies to mode='annealed', got mode={mode!r}")
        else:
            self.total_steps = None
        self.floor = _float("floor", floor)
        self.rate = _float("rate", rate)
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")

        if dtype is None:
            dtype = init.dtype if isinstance(init, Tensor) and init.is_floating_point() else torch.get_default_dtype()
        if isinstance(init, Tensor):
            if not init.is_floating_point():
                raise TypeError(f"init tensor must be floating point, got dtype {init.dtype}")
            if tuple(init.shape) != (self.num_heads,):
                raise ValueError(
                    f"init tensor must have shape (num_heads,) = ({self.num_heads},), got {tuple(init.shape)}"
                )
            if not bool(torch.isfinite(init).all()):
                raise ValueError("init tensor must be finite")
            alpha = init.detach().clone().to(device=device, dtype=dtype)
        else:
            alpha = torch.full((self.num_heads,), _float("init", init), device=device, dtype=dtype)

        mask = torch.ones(self.num_heads, dtype=torch.bool, device=device)
        if heads is not None:
            if isinstance(heads, Tensor):
                heads = heads.tolist()
            try:
                heads = list(heads)
            except TypeError:
                raise TypeError(
                    f"heads must be None or an iterable of head indices, got {type(heads).__name__}"
                ) from None
            for h in heads:
                if isinstance(h, bool) or not isinstance(h, int):
                    raise TypeError(f"heads must hold ints, got {type(h).__name__}")
                if not 0 <= h < self.num_heads:
                    raise ValueError(f"heads entries must be in [0, num_heads) = [0, {self.num_heads}), got {h}")
            if len(set(heads)) != len(heads):
                raise ValueError(f"heads must not repeat an index, got {heads}")
            mask = torch.zeros_like(mask)
            mask[heads] = True
        self.register_buffer("head_mask", mask)
        alpha = alpha.masked_fill(~mask, 0.0)  # unused entries: 0, so the stored tensor reads as α
        if mode == "learnable":
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long, device=device))

    # -- steps ----------------------------------------------------------------------------------------
    def step(self, n: int | None = None) -> int:
        """Advance the step counter by one, or set it to ``n``; returns the new step."""
        if n is not None:
            return self.set_step(n)
        self.step_count += 1
        return int(self.step_count)

    def set_step(self, n: int) -> int:
        self.step_count.fill_(_int("step", n, 0))
        return n

    @property
    def current_step(self) -> int:
        return int(self.step_count)

    # -- values ---------------------------------------------------------------------------------------
    def _annealed(self) -> Tensor:
        # Tensor math on the step buffer: no host sync, traceable. At least fp32 for the schedule itself.
        ct = torch.promote_types(self.alpha.dtype, torch.float32)
        t = (self.step_count.to(ct) / self.total_steps).clamp(max=1.0)
        if self.schedule == "linear":
            f = 1.0 - t
        elif self.schedule == "cosine":
            f = 0.5 * (1.0 + torch.cos(math.pi * t))
        else:
            e1 = math.exp(-self.rate)
            f = (torch.exp(-self.rate * t) - e1) / (1.0 - e1)
        a = self.alpha.to(ct)
        return (self.floor + (a - self.floor) * f).to(self.alpha.dtype)

    def forward(self) -> Tensor:
        alpha = self._annealed() if self.mode == "annealed" else self.alpha
        # where, not a product: unselected heads are exactly 0 and get an exactly-zero gradient.
        return torch.where(self.head_mask, alpha, torch.zeros((), dtype=alpha.dtype, device=alpha.device))

    def penalty(self) -> Tensor:
        """L2 regularizer Σ α² over the selected heads (unselected heads are 0)."""
        return self().square().sum()

    def extra_repr(self) -> str:
        heads = self.head_mask.nonzero().flatten().tolist()
        s = f"num_heads={self.num_heads}, mode={self.mode!r}"
        if len(heads) != self.num_heads:
            s += f", heads={heads}"
        if self.mode == "annealed":
            s += f", schedule={self.schedule!r}, total_steps={self.total_steps}, floor={self.floor}"
            if self.schedule == "exponential":
                s += f", rate={self.rate}"
            s += f", step={int(self.step_count)}"
        return s
