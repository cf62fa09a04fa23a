"""Backend registry and capability-based choice (after xformers' fmha dispatch).

``backend="auto"`` takes the first backend in priority order that has no reasons against the input;
``RAPKERN_BACKEND`` overrides "auto". An explicit backend that cannot serve raises with its reasons, and
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


def register(backend: Backend, *, priority: int) -> None:
    _REGISTRY[backend.name] = backend
    _PRIORITY.insert(min(priority, len(_PRIORITY)), backend.name)


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
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if op not in _REASONS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REASONS)}")
    check = lambda b: getattr(b, _REASONS[op])(problem)
    if backend == "auto":
        backend = os.environ.get("RAPKERN_BACKEND", "auto") or "auto"
    if backend != "auto":
        chosen = get(backend)
        reasons = _reasons(chosen, check)
        if reasons:
            raise NotImplementedError(
                f"backend {backend!r} cannot run {op} for {problem.describe()}: " + "; ".join(reasons)
            )
        return chosen
    report = []
    for b in backends():
        if b.name == "reference":  # the float64 oracle is never picked automatically
            continue
        auto_devices = b.devices if b.auto_devices is None else b.auto_devices
        if problem.device.type not in auto_devices:
            report.append(f"{b.name}: not chosen automatically for {problem.device.type} tensors")
            continue
        reasons = _reasons(b, check)
        if not reasons:
            return b
        report.append(f"{b.name}: " + "; ".join(reasons))
    raise NotImplementedError(f"no backend can run {op} for {problem.describe()}:\n  " + "\n  ".join(report))
