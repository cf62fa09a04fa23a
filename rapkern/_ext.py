"""The compiled modules, loaded once on first use, and the Python side of their ops.

``rapkern._C`` holds the op schemas (csrc/ops.cpp), the C++ autograd kernel (csrc/autograd.cpp) and the CPU
kernels (csrc/cpu/). Importing rapkern never imports it: ``load()`` does, on first need, and remembers either
success or why not ("rapkern._C not built: <reason>", the reason from the build's note next to the module, see
setup.py, or the ImportError). A missing module is a reason the ``cpp`` backend gives, never a crash.

Fake (meta) implementations of both ops are registered here, after the schemas exist: shapes and dtypes only,
device-agnostic, so torch.compile and FakeTensorMode work for CPU and CUDA tensors alike. Autograd is
registered in C++ (csrc/autograd.cpp): a few microseconds per call instead of the tens that a Python
``torch.library.register_autograd`` costs.

``RAPKERN_DISABLE_EXT=1`` makes ``load()`` report the module as not built (to check the fallback).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_STATE: dict[str, str | None] = {}  # module name -> None (loaded) or why not, one line
_DETAILS: dict[str, str | None] = {}  # module name -> the full reason


def _build_note(name: str) -> str | None:
    note = _HERE / f"{name}_build.txt"
    try:
        return note.read_text().strip() or None
    except OSError:
        return None


_NOT_INSTALLED = ("the module is not in the installed package (install with `pip install --no-build-isolation "
                  "-e .` or `make build`; no build note was found)")


def _import(name: str, not_installed: str = _NOT_INSTALLED) -> str | None:
    """Import ``rapkern.<name>``; None on success, else the reason: the build note setup.py left next to it
    (``<name>_build.txt``, the compiler's output, several lines) or why the import failed."""
    if os.environ.get("RAPKERN_DISABLE_EXT", "0") == "1":
        return "disabled by RAPKERN_DISABLE_EXT=1"
    try:
        importlib.import_module(f"rapkern.{name}")
    except ImportError as exc:
        note = _build_note(name)
        if note is not None:
            return note
        if isinstance(exc, ModuleNotFoundError) and exc.name == f"rapkern.{name}":
            return not_installed
        return f"import failed ({type(exc).__name__}: {exc})"
    except Exception as exc:  # noqa: BLE001 - e.g. a registration error in a static initializer
        return f"import failed ({type(exc).__name__}: {exc})"
    return None


def load() -> str | None:
    """Load ``rapkern._C`` once; None when its ops are ready, else "rapkern._C not built: <reason>" on one line
    (``details()`` has the rest, e.g. the compiler's output)."""
    if "_C" not in _STATE:
        why = _import("_C")
        if why is None:
            _register_fakes()
            _STATE["_C"] = _DETAILS["_C"] = None
        else:
            lines = why.splitlines()
            more = "; `python -m rapkern.info` shows the rest" if len(lines) > 1 else ""
            _STATE["_C"] = f"rapkern._C not built: {lines[0]}{more}"
            _DETAILS["_C"] = f"rapkern._C not built: {why}"
    return _STATE["_C"]


def details() -> str | None:
    """The full reason ``rapkern._C`` is not loaded (with the build's compiler output), or None when it is."""
    load()
    return _DETAILS["_C"]


def available() -> bool:
    return load() is None


def _reset_for_tests() -> None:
    """Forget the load result (tests that simulate a missing build). Registered ops stay registered."""
    _STATE.pop("_C", None)


# ------------------------------------------------------------------------------------------------------------
# Fake implementations: the shapes and dtypes csrc/ops.cpp documents.


def _empty_grad(ref: torch.Tensor, dtype=None) -> torch.Tensor:
    return ref.new_empty((0,), dtype=dtype or ref.dtype)


def _same_device(op: str, q: torch.Tensor, **tensors) -> None:
    """The kernels take every tensor on q's device: a fake must refuse a mix as they do. (A mix that includes
    a meta tensor dispatches here, not to the device kernel.)"""
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"rapkern::{op}: {name} must be on q's device ({q.device}), got {t.device}")


def _fake_fwd(q, k, v, key_padding_mask, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside, causal,
              scale, dropout_p, seed):
    _same_device("attention_fwd", q, k=k, v=v, key_padding_mask=key_padding_mask, alpha=alpha, prior0=prior0,
                 prior1=prior1)
    b, hq, lq, _ = q.shape
    out = q.new_empty((b, hq, lq, v.shape[3]))
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    return out, lse


def _fake_bwd(dout, dlse, q, k, v, out, lse, key_padding_mask, alpha, alpha_value, prior_kind, prior0, prior1,
              mask_outside, causal, scale, dropout_p, seed, need_qkv_grad, need_prior_grad, need_alpha_grad):
    _same_device("attention_bwd", q, dout=dout, dlse=dlse, k=k, v=v, out=out, lse=lse,
                 key_padding_mask=key_padding_mask, alpha=alpha, prior0=prior0, prior1=prior1)
    f32 = torch.float32
    if need_qkv_grad:
        dq, dk, dv = (t.new_empty(t.shape) for t in (q, k, v))
    else:
        dq, dk, dv = _empty_grad(q), _empty_grad(k), _empty_grad(v)
    want_prior = need_prior_grad and prior_kind != 0
    dp0 = prior0.new_empty(prior0.shape, dtype=f32) if want_prior and prior0 is not None else _empty_grad(q, f32)
    dp1 = prior1.new_empty(prior1.shape, dtype=f32) if want_prior and prior1 is not None else _empty_grad(q, f32)
    alpha_shape = (q.shape[1],) if alpha is None else alpha.shape
    da = q.new_empty(alpha_shape, dtype=f32) if need_alpha_grad else _empty_grad(q, f32)
    return dq, dk, dv, dp0, dp1, da


def _fake_route_fwd(q, centroids, answers, cluster_mask, tau, normalize, top_k):
    _same_device("route_fwd", q, centroids=centroids, answers=answers, cluster_mask=cluster_mask)
    g, n_q, _ = q.shape
    dense = top_k == 0
    out = q.new_empty((g, n_q, answers.shape[2]))
    lse = q.new_empty((g, n_q) if dense else (0, 0), dtype=torch.float32)
    w = q.new_empty((g, n_q, top_k), dtype=torch.float32)
    idx = q.new_empty((g, n_q, top_k), dtype=torch.int64)
    return out, lse, w, idx


def _fake_route_bwd(dout, q, centroids, answers, cluster_mask, tau, normalize, top_k, out, lse, weights, indices):
    _same_device("route_bwd", q, dout=dout, centroids=centroids, answers=answers, cluster_mask=cluster_mask,
                 out=out, lse=lse, weights=weights, indices=indices)
    f32 = torch.float32
    return (q.new_empty(q.shape, dtype=f32), centroids.new_empty(centroids.shape, dtype=f32),
            answers.new_empty(answers.shape, dtype=f32), q.new_empty(q.shape[:2], dtype=f32))


def _register_fakes() -> None:
    torch.library.register_fake("rapkern::attention_fwd", _fake_fwd)
    torch.library.register_fake("rapkern::attention_bwd", _fake_bwd)
    torch.library.register_fake("rapkern::route_fwd", _fake_route_fwd)
    torch.library.register_fake("rapkern::route_bwd", _fake_route_bwd)
