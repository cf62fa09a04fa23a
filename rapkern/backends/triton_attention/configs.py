"""Autotune configurations for the Triton attention kernels, per kernel, architecture and head dim.

Each entry is ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``, listed large to small. The autotuner is
given the union (``all_configs``) and prunes at launch to ``configs_for(kernel, arch, d_pad, cls)``:
the list for the GPU's architecture, the padded head dim and the launch's feature class.
Choices come from ahead-of-time compiles (registers / spills / shared memory, see
tests/test_triton_compile.py), not from timings: no GPU was available when they were written.

The autotune key is a power-of-two bucket of Lq and Lk (``length_bucket``), so a new length retunes only
when it crosses a power of two.
"""

from __future__ import annotations

from . import _config_table

PRIOR_CODES = {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}

# Feature classes (``feature_class``) split launches by how much state they keep live:
#   plain    16-bit inputs, no dropout, no prior/alpha gradient (any prior read)
#   dropout  16-bit, in-kernel dropout, no prior/alpha gradient
#   grad     16-bit, gradient of a lag/banded/dense prior and/or alpha, no dropout (backward kernels)
#   lowrank  16-bit, low-rank factor gradients (the most live state), no dropout (backward kernels)
#   fp32     fp32 inputs (3xTF32 dots), head dim <= 64, no dropout, no prior/alpha gradient
# _config_table.TABLE maps 'kernel|class|arch|head-dim bucket|prior kind' to the configs that compile
# without register spills and within shared memory (tools/gen_triton_configs.py found them by compiling
# ahead of time; tests/test_triton_compile.py recompiles every entry and fails on any spill). A key with
# no entry has no verified config: the backend declines it on CUDA (``unsupported_reason``) and "auto"
# falls back to the torch backend. sm_100+ uses the sm_90 lists.
_SM80, _SM90 = 80, 90

# dk/dv with a lag-table gradient runs one square tile (not autotuned: the host decodes its layout)
LAG_GRAD = {_SM80: {64: (32, 32, 4, 1), 128: (32, 32, 4, 1), 256: (32, 32, 8, 1)},
            _SM90: {64: (32, 32, 4, 1), 128: (32, 32, 4, 1), 256: (32, 32, 8, 1)}}

# Block sizes used under TRITON_INTERPRET=1 (no tuning: the interpreter runs programs one at a time).
INTERPRET_FWD = (32, 32, 4, 1)
INTERPRET_BWD = (32, 32, 4, 1)
MIN_BLOCK = 16  # partial buffers are sized for this block size (the smallest in any table)


def length_bucket(n: int) -> int:
    """Next power of two (min 64): the autotune key, so new lengths rarely trigger a retune."""
    b = 64
    while b < n:
        b *= 2
    return b


def pad_dim(d: int) -> int:
    p = 16
    while p < d:
        p *= 2
    return p


def _bucket(d_pad: int) -> int:
    return 64 if d_pad <= 64 else (128 if d_pad <= 128 else 256)


def _arch_key(arch: int) -> int:
    return _SM90 if arch >= 90 else _SM80


def feature_class(kernel: str, meta: dict) -> str:
    """The TABLE class of one launch, from its constexprs (PRIOR, DROPOUT, NEED_DPRIOR, NEED_DALPHA, IEEE)."""
    if meta.get("IEEE"):
        return "fp32"
    if meta.get("DROPOUT"):
        return "dropout"
    if kernel == "dkdv" and meta.get("NEED_DPRIOR") and meta.get("PRIOR") in (3,):
        return "lowrank"
    if kernel == "dkdv":
        return "grad" if meta.get("NEED_DPRIOR") and meta.get("PRIOR") in (2, 4) else "plain"
    if kernel != "fwd" and (meta.get("NEED_DPRIOR") or meta.get("NEED_DALPHA")):
        return "lowrank" if meta.get("PRIOR") == 3 else "grad"
    return "plain"


def configs_for(kernel: str, arch: int, d_pad: int, cls: str = "plain", prior: int = 0) -> list[tuple]:
    """The configs the autotuner may pick for ``kernel`` ("fwd", "dq", "dkdv") on sm_<arch>; [] if none
    is verified spill-free."""
    key = f"{kernel}|{cls}|{_arch_key(arch)}|{_bucket(d_pad)}|{prior}"
    return [tuple(c) for c in _config_table.TABLE.get(key, [])]


def lag_grad_config(arch: int, d_pad: int) -> tuple:
    return LAG_GRAD[_arch_key(arch)][_bucket(d_pad)]


def all_configs(kernel: str) -> list[tuple]:
    """Union over keys (what triton.autotune is given); pruned at launch to ``configs_for``."""
    seen: list[tuple] = []
    for key, cfgs in sorted(_config_table.TABLE.items()):
        if key.startswith(kernel + "|"):
            for c in map(tuple, cfgs):
                if c not in seen:
                    seen.append(c)
    return seen


def unsupported_reason(arch: int, d: int, dtype_is_fp32: bool, dropout: bool, prior_kind: str,
                       need_dprior: bool, need_dalpha: bool) -> str | None:
    """Why a CUDA launch has no verified spill-free config on sm_<arch>, or None if every kernel has one."""
    grads = need_dprior or need_dalpha
    if dtype_is_fp32 and (dropout or grads or d > 64):
        return (f"fp32 inputs are served at head dim <= 64 without dropout and without prior/alpha gradients "
                f"(got D={d}, dropout={dropout}, prior/alpha grad={grads}): larger fp32 tiles spill registers")
    if dropout and grads:
        return "dropout together with a prior/alpha gradient has no spill-free kernel config yet"
    cls = "fp32" if dtype_is_fp32 else "dropout" if dropout else (
        ("lowrank" if prior_kind == "lowrank" else "grad") if grads else "plain")
    code = PRIOR_CODES[prior_kind]
    d_pad = pad_dim(d)
    for kernel in ("fwd", "dq", "dkdv"):
        k_cls = cls
        if cls in ("grad", "lowrank") and (kernel == "fwd" or (kernel == "dkdv" and need_dprior is False)):
            k_cls = "plain"  # forward, and dk/dv when only alpha needs a gradient, run the plain kernel
        if kernel == "dkdv" and k_cls == "grad" and prior_kind == "lag":
            continue  # the lag-table gradient runs the fixed LAG_GRAD tile
        if not configs_for(kernel, arch, d_pad, k_cls, code):
            return (f"no spill-free {kernel} kernel config on sm_{arch} for head dim {d} with "
                    f"{'low-rank factor gradients' if cls == 'lowrank' else cls}")
    return None


AOT_HEAD_DIMS = (64, 128, 256)
