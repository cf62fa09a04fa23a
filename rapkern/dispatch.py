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


_AUTO: dict[str, list[Backend]] = {}  # device type -> candidates for "auto" (cleared by register)
# (backend name, op, device type, dtype) -> whether a backend with ``verdict_by_device_dtype`` serves that op
# under "auto" (its reasons and speed rules depend on nothing else, so they are asked once per key)
_VERDICTS: dict[tuple, bool] = {}
# (op, device type, dtype, backend argument) -> the backend ``choose`` returns for every problem of that device
# type and dtype, or None when that depends on more than those (see ``choice_by_device_dtype``)
_STATIC: dict[tuple, Backend | None] = {}
_ENV = getattr(os.environ, "_data", None)  # CPython's dict behind os.environ: a miss without a KeyError
_ENV_KEY = os.environ.encodekey("RAPKERN_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    """``RAPKERN_BACKEND`` as set now (read on every call: tests and users change it at run time); a lookup
    in os.environ's own dict when it has one, since ``os.environ.get`` of an unset name raises and catches a
    KeyError (about a microsecond, on every call)."""
    if _ENV is None or _ENV_KEY is None:
        return os.environ.get("RAPKERN_BACKEND")
    raw = _ENV.get(_ENV_KEY)
    return None if raw is None else os.environ.decodevalue(raw)


def register(backend: Backend, *, priority: int) -> None:
    _REGISTRY[backend.name] = backend
    _PRIORITY.insert(min(priority, len(_PRIORITY)), backend.name)
    clear_caches()


def clear_caches() -> None:
    """Forget the cached "auto" candidates and verdicts (after changing the registry or a backend's reasons by
    other means than ``register``, e.g. in tests)."""
    _AUTO.clear()
    _VERDICTS.clear()
    _STATIC.clear()


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
        backend = _env_backend() or "auto"
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
    for b in _auto_candidates(device_type):
        if b.availability() is not None:
            continue
        if b.verdict_by_device_dtype:
            key = (b.name, op, device_type, problem.dtype)
            ok = _VERDICTS.get(key)
            if ok is None:
                ok = _VERDICTS[key] = _serves(b, op, method, problem)
        else:
            ok = _serves(b, op, method, problem)
        if ok:
            return b
    raise NotImplementedError(_nothing_fits(op, problem, method, device_type))


class _DeviceDtype:
    """What a ``verdict_by_device_dtype`` backend's reasons may read of a problem: its device and dtype."""

    __slots__ = ("device", "dtype")

    def __init__(self, device_type: str, dtype):
        import torch

        self.device, self.dtype = torch.device(device_type), dtype


def choice_by_device_dtype(op: str, device_type: str, dtype, backend: str = "auto") -> Backend | None:
    """The backend ``choose(op, problem, backend)`` returns for *every* problem on ``device_type`` with
    ``dtype``, when the device type and dtype alone decide it: every backend asked on the way (the named one,
    or each "auto" candidate up to the pick) answers by them alone (``verdict_by_device_dtype``). None
    otherwise, or when the answer would be an error (the full ``choose`` then says why). For per-call fast
    paths that run before a problem object exists (``rapkern.attention``'s direct path). ``RAPKERN_BACKEND``
    is read per call, not cached; availability is asked once per key (``clear_caches`` forgets)."""
    if backend == "auto":
        backend = _env_backend() or "auto"
    key = (op, device_type, dtype, backend)
    try:
        return _STATIC[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable backend argument: the full choose raises the documented error
        return None
    method = _REASONS.get(op)
    try:
        found = _static_pick(op, method, backend, device_type, _DeviceDtype(device_type, dtype))
    except AttributeError:  # a reasons function read more of the problem than its device and dtype
        found = None
    _STATIC[key] = found
    return found


def _static_pick(op: str, method: str | None, backend: str, device_type: str, stub) -> Backend | None:
    found = None
    if method is not None and isinstance(backend, str):
        if backend != "auto":
            b = _REGISTRY.get(backend)
            if b is not None and b.verdict_by_device_dtype and not _reasons(b, lambda b: getattr(b, method)(stub)):
                found = b
        else:
            for b in _auto_candidates(device_type):
                if b.availability() is not None:
                    continue
                if not b.verdict_by_device_dtype:
                    break  # this one decides per problem: so does "auto" from here on
                if _serves(b, op, method, stub):
                    found = b
                    break
    return found


def _serves(b: Backend, op: str, method: str, problem) -> bool:
    """Whether "auto" may give ``problem`` to the (available) backend ``b``: no reasons against it and, for
    attention, no speed rule that sends it on."""
    return not getattr(b, method)(problem) and not (op == "attention" and b.auto_reasons(problem))


def _auto_candidates(device_type: str) -> list[Backend]:
    """Backends "auto" may pick on this device type, in priority order (never the float64 reference)."""
    out = _AUTO.get(device_type)  # register() clears the cache
    if out is None:
        out = []
        for b in backends():
            auto_devices = b.devices if b.auto_devices is None else b.auto_devices
            if b.name != "reference" and device_type in auto_devices:
                out.append(b)
        _AUTO[device_type] = out
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
