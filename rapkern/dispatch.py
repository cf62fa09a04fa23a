"""Backend registry and capability-based choice (after xformers' fmha dispatch).

``backend="auto"`` takes the first backend in priority order that has no reasons against the input and, for
attention, no measured speed rule (``Backend.auto_reasons``) that sends it on; ``RAPKERN_BACKEND`` overrides
"auto". An explicit backend that cannot serve raises with its reasons, and
when nothing fits, ``NotImplementedError`` lists every backend's reasons.
"""

from __future__ import annotations

import os
from typing import Callable

from .backends.base import Backend

_REGISTRY: dict[str, Backend] = {}
_PRIORITY: list[str] = []  # fastest first
# op name -> the Backend method that lists reasons against serving it
_REASONS = {
    "attention": "attention_reasons",
    "lda_route": "route_reasons",
    "attention_stats": "stats_reasons",
    "attention_kl": "kl_reasons",
}


_AUTO: dict[tuple, list[Backend]] = {}  # (device type, registry state) -> candidates for "auto"


def register(backend: Backend, *, priority: int) -> None:
    _REGISTRY[backend.name] = backend
    _PRIORITY.insert(min(priority, len(_PRIORITY)), backend.name)
    _AUTO.clear()


def backends() -> list[Backend]:
    return [_REGISTRY[n] for n in _PRIORITY]


def get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def _reasons(b: Backend, check: Callable) -> list[str]:
    why = b.availability()
    return [why] if why else check(b)


def choose(op: str, problem, backend: str) -> Backend:
    # A per-call cost: the happy path builds no strings and asks each candidate once.
    method = _REASONS.get(op)
    if method is None:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REASONS)}")
    if backend == "auto":
        backend = os.environ.get("RAPKERN_BACKEND") or "auto"
    elif not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        chosen = get(backend)
        reasons = _reasons(chosen, lambda b: getattr(b, method)(problem))
        if reasons:
            raise NotImplementedError(
                f"backend {backend!r} cannot run {op} for {problem.describe()}: " + "; ".join(reasons)
            )
        return chosen
    device_type = problem.device.type
    rules = op == "attention"
    for b in _auto_candidates(device_type):
        if b.availability() is None and not getattr(b, method)(problem) and not (rules and b.auto_reasons(problem)):
            return b
    raise NotImplementedError(_nothing_fits(op, problem, method, device_type))


def _auto_candidates(device_type: str) -> list[Backend]:
    """Backends "auto" may pick on this device type, in priority order (never the float64 reference)."""
    key = (device_type, id(_REGISTRY), tuple(_PRIORITY))
    out = _AUTO.get(key)
    if out is None:
        out = []
        for b in backends():
            auto_devices = b.devices if b.auto_devices is None else b.auto_devices
            if b.name != "reference" and device_type in auto_devices:
                out.append(b)
        _AUTO[key] = out
    return out


def _nothing_fits(op: str, problem, method: str, device_type: str) -> str:
    report = []
    for b in backends():
        if b.name == "reference":  # the float64 oracle is never picked automatically
            continue
        auto_devices = b.devices if b.auto_devices is None else b.auto_devices
        if device_type not in auto_devices:
            report.append(f"{b.name}: not chosen automatically for {device_type} tensors")
            continue
        why = _reasons(b, lambda b: getattr(b, method)(problem))
        if not why and op == "attention":
            why = b.auto_reasons(problem)
        report.append(f"{b.name}: " + "; ".join(why))
    return f"no backend can run {op} for {problem.describe()}:\n  " + "\n  ".join(report)
