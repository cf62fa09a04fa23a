"""Loads ``rapkern._C_cuda`` (csrc/cuda/, issue 15) once and remembers either success or why not.

The CUDA kernels register implementations of the op schemas that ``rapkern._C`` defines (csrc/ops.cpp), and
the ops' fake implementations live with ``rapkern._ext``, so ``rapkern._C`` loads first. A failed build leaves
its reason in ``rapkern/_C_cuda_build.txt`` (setup.py), reported here as "rapkern._C_cuda not built: <reason>".
Loading needs no GPU (the module only registers kernels). ``RAPKERN_DISABLE_EXT=1`` disables it too.
"""

from __future__ import annotations

import os

import torch

from ... import _ext

_STATE: dict[str, str | None] = {}
_NOT_INSTALLED = ("the module is not in the installed package (it builds when nvcc, a CUDA toolkit and a CUDA "
                  "build of torch are present, or with RAPKERN_BUILD_CUDA=1; no build note was found)")


def _why_not() -> str | None:
    if os.environ.get("RAPKERN_DISABLE_EXT", "0") == "1":
        return "disabled by RAPKERN_DISABLE_EXT=1"
    if torch.version.cuda is None:
        return "torch is not a CUDA build"
    base = _ext.load()
    if base is not None:
        return f"it needs rapkern._C (the op schemas), which is unavailable ({base})"
    why = _ext._import("_C_cuda", _NOT_INSTALLED)  # the same import and build-note rules as rapkern._C
    if why is None or "\n" not in why:
        return why
    return why.splitlines()[0] + "; rapkern/_C_cuda_build.txt has the rest"


def load() -> str | None:
    """None when the CUDA kernels are registered, else "rapkern._C_cuda not built: <reason>" (one line)."""
    if "_C_cuda" not in _STATE:
        why = _why_not()
        _STATE["_C_cuda"] = None if why is None else f"rapkern._C_cuda not built: {why}"
    return _STATE["_C_cuda"]


def _reset_for_tests() -> None:
    _STATE.pop("_C_cuda", None)
