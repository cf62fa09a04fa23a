"""The Triton backend's attention statistics and attention KL: launchers, autograd Functions, reasons.

Kernels in _stats_kernels.py (algorithm there). Forward: stats = two kernels (row pass: lse, entropy; key-major
pass: key mass); KL = one row pass (both LSEs and the KL). Backward: the same two kernels serve both ops (a
row-major dq kernel, a key-major dk kernel), with the prior and α gradients reduced on the host in a fixed
order as attention_bwd does: bitwise reproducible.

Limits (each a reason, so "auto" falls back to the torch backend): fp16/bf16/fp32 on both KL sides (bf16 not
under the interpreter); head dims <= 256; low-rank rank <= 128; a lag table that needs a gradient has at
most 16385 entries; CPU tensors only under ``TRITON_INTERPRET=1``; on CUDA, only launches with a config in
``CONFIGS`` (verified spill-free for sm_80/sm_90 by tests/test_triton_stats_compile.py). Inputs whose last
stride is not 1 are copied once (O(L·D), as function.py does for attention).

Blocks are fixed per (kernel, dtype class, head-dim bucket, prior kind), not autotuned: the choice comes
from ahead-of-time compiles only. Not yet run or timed on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton

from ..base import alpha_grad, guard_double_backward
from . import _config_tables as _tables
from . import configs as C
from ._stats_kernels import (
    _kl_fwd_kernel,
    _score_bwd_dk_kernel,
    _score_bwd_dq_kernel,
    _stats_fwd_kernel,
    _stats_mass_kernel,
)
from .launch import LOG2E, PriorPack, _alpha_vec, _kpm, _reduce_lag, interpreting, reduce_prior_grads

MAX_HEAD_DIM = 256
MAX_RANK = 128
MAX_LAG_GRAD_ENTRIES = 16385
KERNELS = ("fwd", "mass", "klfwd", "dq", "dk")
INTERPRET = (32, 32, 4, 1, 0)  # square: the dk kernel's lag-table partials need BLOCK_M == BLOCK_N

# (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) per "kernel|dtype class|head-dim bucket|prior code" (the
# student's prior for the KL), the same on sm_80 and sm_90 (sm_100+ as sm_90). Dtype class "16" (fp16/bf16) or
# "32" (fp32 on either KL side: 3xTF32 dots). Each entry is the first candidate, large to small, that compiles
# without spills on both architectures with causal, padding and every gradient on (the most live state), for
# the statistics and for the KL against the same teacher prior kind and a low-rank one (the heaviest teacher
# tile): found and checked by tests/test_triton_stats_compile.py. A missing key is declined on CUDA. dk tiles
# for the lag prior are square (the lag-table partials' layout). maxnreg 255 on the backward kernels: left to
# itself, ptxas aims at a register count for occupancy (80 or 128) and spills values that live across the
# loops where a few more registers suffice.
CONFIGS: dict[str, tuple[int, int, int, int, int]] = {
    "fwd|16|64|0": (128, 64, 8, 2, 0),
    "fwd|16|64|1": (128, 64, 8, 2, 0),
    "fwd|16|64|2": (128, 64, 8, 2, 0),
    "fwd|16|64|3": (128, 64, 8, 2, 0),
    "fwd|16|64|4": (128, 64, 8, 2, 0),
    "fwd|16|128|0": (128, 64, 8, 2, 0),
    "fwd|16|128|1": (128, 64, 8, 2, 0),
    "fwd|16|128|2": (64, 32, 4, 2, 0),
    "fwd|16|128|3": (128, 64, 8, 2, 0),
    "fwd|16|128|4": (128, 64, 8, 2, 0),
    "fwd|16|256|0": (128, 64, 8, 2, 0),
    "fwd|16|256|1": (64, 32, 4, 2, 0),
    "fwd|16|256|2": (64, 32, 4, 2, 0),
    "fwd|16|256|3": (128, 64, 8, 2, 0),
    "fwd|16|256|4": (128, 64, 8, 2, 0),
    "fwd|32|64|0": (128, 64, 8, 2, 0),
    "fwd|32|64|1": (64, 32, 4, 2, 0),
    "fwd|32|64|2": (32, 64, 8, 2, 0),
    "fwd|32|64|3": (64, 32, 4, 2, 0),
    "fwd|32|64|4": (64, 32, 4, 2, 0),
    "mass|16|64|0": (32, 128, 8, 2, 0),
    "mass|16|64|1": (32, 128, 8, 2, 0),
    "mass|16|64|2": (32, 128, 8, 2, 0),
    "mass|16|64|3": (32, 128, 8, 2, 0),
    "mass|16|64|4": (32, 128, 8, 2, 0),
    "mass|16|128|0": (32, 128, 8, 2, 0),
    "mass|16|128|1": (32, 128, 8, 2, 0),
    "mass|16|128|2": (32, 128, 8, 2, 0),
    "mass|16|128|3": (32, 128, 8, 2, 0),
    "mass|16|128|4": (32, 128, 8, 2, 0),
    "mass|16|256|0": (32, 128, 8, 2, 0),
    "mass|16|256|1": (32, 128, 8, 2, 0),
    "mass|16|256|2": (32, 128, 8, 2, 0),
    "mass|16|256|3": (32, 128, 8, 2, 0),
    "mass|16|256|4": (32, 128, 8, 2, 0),
    "mass|32|64|0": (32, 128, 8, 2, 0),
    "mass|32|64|1": (32, 128, 8, 2, 0),
    "mass|32|64|2": (32, 128, 8, 2, 0),
    "mass|32|64|3": (32, 128, 8, 2, 0),
    "mass|32|64|4": (32, 128, 8, 2, 0),
    "klfwd|16|64|0": (128, 64, 8, 2, 0),
    "klfwd|16|64|1": (128, 64, 8, 2, 0),
    "klfwd|16|64|2": (128, 64, 8, 2, 0),
    "klfwd|16|64|3": (128, 64, 8, 2, 0),
    "klfwd|16|64|4": (64, 32, 4, 2, 0),
    "klfwd|16|128|0": (128, 64, 8, 2, 0),
    "klfwd|16|128|1": (64, 32, 4, 2, 0),
    "klfwd|16|128|2": (32, 64, 8, 2, 0),
    "klfwd|16|128|3": (128, 64, 8, 2, 0),
    "klfwd|16|128|4": (64, 32, 4, 2, 0),
    "klfwd|16|256|0": (64, 32, 4, 2, 0),
    "klfwd|16|256|1": (64, 32, 4, 2, 0),
    "klfwd|16|256|2": (32, 64, 8, 2, 0),
    "klfwd|16|256|3": (64, 64, 4, 2, 0),
    "klfwd|16|256|4": (64, 32, 4, 2, 0),
    "klfwd|32|64|0": (32, 64, 8, 2, 0),
    "klfwd|32|64|1": (32, 64, 8, 2, 0),
    "klfwd|32|64|2": (32, 64, 8, 2, 0),
    "klfwd|32|64|3": (64, 32, 4, 2, 0),
    "klfwd|32|64|4": (64, 32, 4, 2, 0),
    "dq|16|64|0": (32, 32, 4, 1, 255),
    "dq|16|64|1": (16, 32, 4, 1, 255),
    "dq|16|64|2": (16, 32, 4, 1, 255),
    "dq|16|64|3": (16, 16, 4, 1, 255),
    "dq|16|64|4": (16, 32, 4, 1, 255),
    "dq|16|128|0": (16, 32, 4, 1, 255),
    "dq|16|128|1": (16, 32, 4, 1, 255),
    "dq|16|128|2": (16, 32, 4, 1, 255),
    # dq|16|128|3: none
    "dq|16|128|4": (16, 32, 4, 1, 255),
    "dq|16|256|0": (16, 32, 4, 1, 255),
    "dq|16|256|1": (16, 16, 4, 1, 255),
    # dq|16|256|2: none
    # dq|16|256|3: none
    "dq|16|256|4": (16, 32, 4, 1, 255),
    "dq|32|64|0": (32, 64, 8, 2, 255),
    "dq|32|64|1": (16, 32, 4, 1, 255),
    "dq|32|64|2": (16, 32, 4, 1, 255),
    # dq|32|64|3: none
    "dq|32|64|4": (16, 32, 4, 1, 255),
    "dk|16|64|0": (32, 128, 8, 2, 255),
    "dk|16|64|1": (32, 32, 8, 1, 255),
    "dk|16|64|2": (32, 32, 4, 1, 255),
    "dk|16|64|3": (16, 32, 4, 1, 255),
    "dk|16|64|4": (32, 32, 4, 1, 255),
    "dk|16|128|0": (16, 32, 4, 1, 255),
    "dk|16|128|1": (16, 16, 4, 1, 255),
    "dk|16|128|2": (16, 32, 4, 1, 255),
    # dk|16|128|3: none
    "dk|16|128|4": (16, 32, 4, 1, 255),
    "dk|16|256|0": (16, 16, 4, 1, 255),
    # dk|16|256|1: none
    "dk|16|256|2": (16, 16, 4, 1, 255),
    # dk|16|256|3: none
    "dk|16|256|4": (16, 16, 4, 1, 255),
    "dk|32|64|0": (16, 16, 4, 1, 255),
    # dk|32|64|1: none
    "dk|32|64|2": (16, 32, 4, 1, 255),
    # dk|32|64|3: none
    "dk|32|64|4": (16, 16, 4, 1, 255),
}
# Entries replaced under one Triton version, where the shared entry spills there (searched with
# ``python tests/test_triton_stats_compile.py`` under that version; its gate compiles the merged table):
# triton 3.6 spilled 248 B (fwd fp32, sm_80), 24 B (dk, KL against a low-rank teacher, sm_80) and 8 B (dq, KL
# with a dense prior at head dim 256, sm_90) with the shared entries.
CONFIGS_BY_TRITON: dict[tuple[int, int], dict[str, tuple[int, int, int, int, int]]] = {
    (3, 6): {
        "fwd|32|64|0": (64, 32, 4, 2, 0),
        "dk|16|64|0": (32, 32, 4, 1, 255),
        "dq|16|256|4": (16, 16, 4, 1, 255),
    },
}
_INSTALLED = _tables.parse_version(C.SELECTION.installed) if C.SELECTION.installed else None
CONFIGS = {**CONFIGS, **CONFIGS_BY_TRITON.get(_INSTALLED, {})}


def _bucket(d_pad: int) -> int:
    return 64 if d_pad <= 64 else (128 if d_pad <= 128 else 256)


def config(kernel: str, d_pad: int, fp32: bool, prior: int):
    """The launch config of ``kernel``, or None where none is verified spill-free."""
    return CONFIGS.get(f"{kernel}|{'32' if fp32 else '16'}|{_bucket(d_pad)}|{prior}")


def _cfg(kernel: str, dev: torch.device, d_pad: int, fp32: bool, prior: int) -> tuple[int, int, int, int, int]:
    if interpreting() or dev.type != "cuda":
        return INTERPRET
    return config(kernel, d_pad, fp32, prior)  # never None: the reasons decline such launches


# ---------------------------------------------------------------------------------------------- reasons


def _side_reasons(p, role: str = "") -> list[str]:
    why = []
    dev, dt = p.device.type, p.dtype
    if dev not in ("cuda", "cpu"):
        why.append(f"{role}device type {dev!r} not in ('cuda', 'cpu')")
    elif dev == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        why.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    elif dev == "cpu" and dt == torch.bfloat16:
        why.append(f"{role}bfloat16 is not supported by the Triton interpreter (CPU tensors)")
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        why.append(f"{role}dtype {dt} not supported (float16, bfloat16, float32)")
    if p.head_dim > MAX_HEAD_DIM:
        why.append(f"{role}head dim D = {p.head_dim} must be <= {MAX_HEAD_DIM}")
    if p.prior is not None:
        if p.prior.kind == "lowrank" and p.prior.rank > MAX_RANK:
            why.append(f"{role}LowRankPrior rank {p.prior.rank} > {MAX_RANK}")
        if p.prior.kind == "lag" and p.prior.table.requires_grad and p.prior.table.shape[-1] > MAX_LAG_GRAD_ENTRIES:
            why.append(f"{role}RelativeLagPrior table with {p.prior.table.shape[-1]} > {MAX_LAG_GRAD_ENTRIES} "
                       "entries cannot get a gradient")
    return why


def _config_reasons(dev: torch.device, kernels, d: int, fp32: bool, prior_kind: str) -> list[str]:
    if dev.type != "cuda":
        return []
    missing = [k for k in kernels if config(k, C.pad_dim(d), fp32, C.PRIOR_CODES[prior_kind]) is None]
    if missing:
        return [f"no spill-free config of the {', '.join(missing)} kernel(s) for head dim {d} with "
                f"{'fp32' if fp32 else '16-bit'} inputs and a {prior_kind!r} prior"]
    return []


# The kernels put batch·heads on grid dimension 1 (CUDA's limit 65,535; the attention kernels fold it into
# dimension 0: a 1-D grid here measured register spills in these kernels, see bench/results/).
GRID_YZ_MAX = 65535


def _grid_reasons(p) -> list[str]:
    if p.device.type == "cuda" and p.batch * p.heads_q > GRID_YZ_MAX:
        return [f"batch x heads = {p.batch} x {p.heads_q} = {p.batch * p.heads_q} exceeds the statistics kernels' "
                f"grid limit {GRID_YZ_MAX} (CUDA grid dimension 1)"]
    return []


def stats_reasons(p) -> list[str]:
    why = _side_reasons(p)
    return why or _grid_reasons(p) or _config_reasons(p.device, ("fwd", "mass", "dq", "dk"), p.head_dim,
                                                      p.dtype == torch.float32, p.prior_kind)


def kl_reasons(p) -> list[str]:
    t, s = p.teacher, p.student
    why = _side_reasons(t, "teacher: ") + _side_reasons(s, "student: ")
    fp32 = torch.float32 in (t.dtype, s.dtype)
    return why or _grid_reasons(s) or _config_reasons(p.device, ("klfwd", "dq", "dk"), max(t.head_dim, s.head_dim),
                                                      fp32, s.prior_kind)


# Triton versions under which every CONFIGS entry (with that version's replacements) compiled spill-free
# (tests/test_triton_stats_compile.py).
GATED_TRITON = ((3, 6), (3, 8))


def describe_table() -> str:
    """Whether the statistics kernels' configs were gated under the installed Triton (python -m rapkern.info)."""
    v = _tables.installed_triton()
    gated = " and ".join("%d.%d" % g for g in GATED_TRITON)
    base = f"fixed configs per kernel, compiled spill-free ahead of time under triton {gated}"
    if v is None:
        return f"{base}; triton not installed"
    if _tables.parse_version(v) in GATED_TRITON:
        return f"{base}; installed triton {v}: verified"
    return (f"{base}; installed triton {v}: UNVERIFIED (not gated under this version: an entry may spill "
            f"registers, which costs speed, not correctness)")


# ---------------------------------------------------------------------------------------------- launchers


class Side:
    """One logit set scale·q kᵀ + α·B: tensors, packed prior, α per head (float32), strides."""

    def __init__(self, q, k, prior, alpha, scale):
        self.q, self.k, self.scale = q, k, scale
        self.pack = PriorPack(prior, q)
        self.alpha = _alpha_vec(alpha, q.shape[1], q.device)
        self.d, self.d_pad = q.shape[3], C.pad_dim(q.shape[3])
        self.group = q.shape[1] // k.shape[1]
        self.fp32 = q.dtype == torch.float32

    def strides(self):
        q, k = self.q, self.k
        return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

    def consts(self, sfx=""):
        return {f"PRIOR{sfx}": self.pack.code, f"MASK_OUT{sfx}": self.pack.mask_out, f"R_PAD{sfx}": self.pack.r_pad}


def _launch(kernel, grid, args, consts, cfg, **extra):
    bm, bn, w, s, maxnreg = cfg
    if maxnreg:
        extra["maxnreg"] = maxnreg
    kernel[grid](*args, **consts, **extra, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


def stats_fwd(sd: Side, kpm, causal: bool):
    """(entropy, key_mass, lse) float32; entropy 0 and lse -inf on rows with no visible key."""
    q, k = sd.q, sd.k
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    ent = torch.zeros(b, hq, lq, **f32)
    lse = torch.full((b, hq, lq), float("-inf"), **f32)
    mass = torch.zeros(b, hq, lk, **f32)
    if b * hq == 0 or lq == 0 or lk == 0:
        return ent, mass, lse
    kpm_t, skpm, has_kpm = _kpm(kpm, q)
    tail = (*sd.pack.args(), *sd.strides(), skpm, hq, lq, lk, sd.d, sd.group, sd.scale * LOG2E)
    consts = dict(**sd.consts(), CAUSAL=bool(causal), HAS_KPM=has_kpm, D_PAD=sd.d_pad, IEEE=sd.fp32)
    cfg = _cfg("fwd", q.device, sd.d_pad, sd.fp32, sd.pack.code)
    _launch(_stats_fwd_kernel, (triton.cdiv(lq, cfg[0]), b * hq), (q, k, lse, ent, sd.alpha, kpm_t, *tail), consts, cfg)
    cfg = _cfg("mass", q.device, sd.d_pad, sd.fp32, sd.pack.code)
    _launch(_stats_mass_kernel, (triton.cdiv(lk, cfg[1]), b * hq), (q, k, lse, mass, sd.alpha, kpm_t, *tail),
            consts, cfg)
    return ent, mass, lse


def _kl_dims(t: Side, s: Side):
    return max(t.d_pad, s.d_pad), t.fp32 or s.fp32


def kl_fwd(t: Side, s: Side, kpm, causal: bool, temperature: float):
    """(KL per row, lse_t', lse_s') float32, with both logit sets divided by ``temperature``."""
    q = s.q
    b, hq, lq, _ = q.shape
    lk = s.k.shape[2]
    f32 = dict(dtype=torch.float32, device=q.device)
    kl = torch.zeros(b, hq, lq, **f32)
    lse_t = torch.full((b, hq, lq), float("-inf"), **f32)
    lse_s = torch.full((b, hq, lq), float("-inf"), **f32)
    if b * hq == 0 or lq == 0 or lk == 0:
        return kl, lse_t, lse_s
    kpm_t, skpm, has_kpm = _kpm(kpm, q)
    inv_t = 1.0 / temperature
    args = (q, s.k, lse_s, s.alpha, kpm_t, kl, *s.pack.args(), t.q, t.k, lse_t, t.alpha, *t.pack.args(),
            *s.strides(), *t.strides(), skpm, hq, lq, lk, s.d, t.d, s.group, t.group,
            s.scale * LOG2E * inv_t, t.scale * LOG2E * inv_t, inv_t)
    consts = dict(**s.consts(), **t.consts("_T"), CAUSAL=bool(causal), HAS_KPM=has_kpm, D_PAD=s.d_pad,
                  DT_PAD=t.d_pad, IEEE=s.fp32, IEEE_T=t.fp32)
    cfg = _cfg("klfwd", q.device, *_kl_dims(t, s), s.pack.code)
    _launch(_kl_fwd_kernel, (triton.cdiv(lq, cfg[0]), b * hq), args, consts, cfg)
    return kl, lse_t, lse_s


def score_bwd(s: Side, kpm, causal: bool, lse, gr, *, mu=None, gm=None, teacher: Side | None = None, lse_t=None,
              temperature: float = 1.0, need_dprior: bool, need_dalpha: bool):
    """Gradients of a loss of the student's logits: (dq, dk, dalpha per head or None, [per-head prior grads]).

    Stats (``teacher`` None): ``gr`` = dL/dentropy or None, ``gm`` = dL/dkey_mass or None, ``mu`` = lse − H.
    KL: ``gr`` = dL/dKL per row (0 where the teacher sees nothing), ``lse_t``/``lse`` the tempered LSEs.
    """
    q, k = s.q, s.k
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    kl = teacher is not None
    dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
    scratch = torch.zeros(1, **f32)
    has_gh, has_gm = gr is not None, gm is not None
    if b * hq == 0 or lq == 0 or lk == 0 or not (has_gh or has_gm):
        dalpha = torch.zeros(hq, **f32) if need_dalpha else None
        grads = [torch.zeros((b, hq) + tuple(t.shape[-1:] if s.pack.kind == "lag" else t.shape[-2:]), **f32)
                 for t in _prior_tensors(s)] if need_dprior else []
        return dq, dk, dalpha, grads
    t = teacher if kl else Side(q, k, None, 0.0, 1.0)
    if not kl:
        t.d_pad, t.fp32 = 16, False  # teacher arguments are unused stand-ins
    d_pad, fp32 = _kl_dims(t, s) if kl else (s.d_pad, s.fp32)
    cfg_dq, cfg_dk = _cfg("dq", dev, d_pad, fp32, s.pack.code), _cfg("dk", dev, d_pad, fp32, s.pack.code)
    kpm_t, skpm, has_kpm = _kpm(kpm, q)
    vec = lambda x: scratch if x is None else x.float().contiguous()  # noqa: E731
    gr, mu, gm = vec(gr), vec(mu), vec(gm)
    c = torch.zeros(b, hq, lq, **f32) if has_gm and not kl else scratch
    lse_t = lse if lse_t is None else lse_t

    pack = s.pack
    dpr_q, dpr_q_r, dpr_k, dpr_k_r = scratch, 0, scratch, 0
    dl, dl_bh, lag_k = scratch, 0, 1
    if need_dprior:
        if pack.kind == "banded":
            dpr_q_r = 2 * pack.pw + 1
            dpr_q = torch.zeros(b, hq, lq, dpr_q_r, **f32)
        elif pack.kind == "dense":
            dpr_q_r = lk
            dpr_q = torch.zeros(b, hq, lq, lk, **f32)
        elif pack.kind == "lowrank":
            dpr_q_r = dpr_k_r = pack.pw
            dpr_q = torch.zeros(b, hq, lq, pack.pw, **f32)
            dpr_k = torch.zeros(b, hq, lk, pack.pw, **f32)
        elif pack.kind == "lag":  # slot layout of launch._reduce_lag, for the dk kernel's square tile
            blk = cfg_dk[0]
            lag_k = -(-pack.pw // blk) + 1
            dl_bh = triton.cdiv(lk, blk) * ((2 * lag_k - 1) * 2 * blk + 2)
            dl = torch.zeros(b * hq, dl_bh, **f32)
    nmb = triton.cdiv(lq, cfg_dq[0])
    da = torch.zeros(b * hq, nmb, **f32) if need_dalpha else scratch

    inv_t = 1.0 / temperature
    head = (q, k, lse, s.alpha, kpm_t)
    mid = (*pack.args(), gr, mu, gm, c, t.q, t.k, lse_t, t.alpha, *t.pack.args())
    tail = (*s.strides(), *t.strides())
    sizes = (lq, lk, s.d, t.d, s.group, t.group, s.scale * LOG2E * inv_t, t.scale * LOG2E * inv_t, inv_t, s.scale)
    consts = dict(KL=kl, **s.consts(), **t.consts("_T"), CAUSAL=bool(causal), HAS_KPM=has_kpm,
                  HAS_GH=has_gh and not kl, HAS_GM=has_gm, D_PAD=s.d_pad, DT_PAD=t.d_pad, IEEE=s.fp32, IEEE_T=t.fp32,
                  NEED_DPRIOR=bool(need_dprior))
    _launch(_score_bwd_dq_kernel, (triton.cdiv(lq, cfg_dq[0]), b * hq),
            (*head, dq, *mid, dpr_q, dpr_q_r, da, nmb, *tail, dq.stride(0), dq.stride(1), dq.stride(2), skpm,
             hq, *sizes), consts, cfg_dq, NEED_DALPHA=bool(need_dalpha))
    _launch(_score_bwd_dk_kernel, (triton.cdiv(lk, cfg_dk[1]), b * hkv),
            (*head, dk, *mid, dpr_k, dpr_k_r, dl, dl_bh, lag_k, *tail, dk.stride(0), dk.stride(1), dk.stride(2),
             skpm, hq, hkv, *sizes), consts, cfg_dk, LAG_T=2 * max(cfg_dk[0], cfg_dk[1]))

    dalpha = da.view(b, hq, nmb).sum(dim=(0, 2)) if need_dalpha else None
    grads = []
    if need_dprior:
        if pack.kind == "lag":
            grads = [_reduce_lag(dl, triton.cdiv(lk, cfg_dk[0]), lag_k, cfg_dk[0], pack.pw).view(b, hq, -1)]
        elif pack.kind == "lowrank":
            grads = [dpr_q, dpr_k]
        else:
            grads = [dpr_q]
    return dq, dk, dalpha, grads


def _prior_tensors(s: Side):
    return () if s.pack.kind == "none" else ((s.pack.p,) if s.pack.kind != "lowrank" else (s.pack.p, s.pack.p2))


# ---------------------------------------------------------------------------------------------- autograd


def _unit_last(t):
    """The kernels' precondition: unit stride in the last dim (a copy only when it is not)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _prior(cfg, tensors):
    return None if cfg["prior"] is None else cfg["prior"].with_tensors(*tensors)


def _alpha(cfg, alpha_t):
    return alpha_t if alpha_t is not None else cfg["alpha"]


def _finish(alpha_t, dalpha, dprior_heads, prior, prior_tensors, needs_prior, needs_alpha, hq):
    """Reduce per-head prior grads to each prior tensor's shape and α's per-head grad to α's shape."""
    grads = [None] * len(prior_tensors)
    if any(needs_prior):
        reduced = reduce_prior_grads(prior_tensors, dprior_heads, prior.kind)
        grads = [g if need else None for g, need in zip(reduced, needs_prior)]
    return alpha_grad(alpha_t, dalpha, hq, needs_alpha), grads


class TritonStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, alpha_t, kpm, *prior_tensors):
        q, k = _unit_last(q), _unit_last(k)
        sd = Side(q, k, _prior(cfg, prior_tensors), _alpha(cfg, alpha_t), cfg["scale"])
        ent, mass, lse = stats_fwd(sd, kpm, cfg["causal"])
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, alpha_t, kpm, ent, lse, *prior_tensors)
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient
        return ent, mass

    @staticmethod
    def backward(ctx, g_ent, g_mass):
        with torch.no_grad():  # the backward is not differentiable: see guard_double_backward
            q, k, alpha_t, kpm, ent, lse, *prior_tensors = ctx.saved_tensors
            cfg, nig = ctx.cfg, ctx.needs_input_grad
            prior = _prior(cfg, prior_tensors)
            need_dprior = prior is not None and any(nig[5:])
            need_dalpha = alpha_t is not None and nig[3] and prior is not None
            sd = Side(q, k, prior, _alpha(cfg, alpha_t), cfg["scale"])
            mu = (lse - ent).masked_fill(lse == float("-inf"), 0.0)
            dq, dk, dalpha, heads = score_bwd(sd, kpm, cfg["causal"], lse, g_ent, mu=mu, gm=g_mass,
                                              need_dprior=need_dprior, need_dalpha=need_dalpha)
            da, dprior = _finish(alpha_t, dalpha, heads, prior, prior_tensors, nig[5:], nig[3], q.shape[1])
            grads = (None, dq if nig[1] else None, dk if nig[2] else None, da, None, *dprior)
        return guard_double_backward(grads, ctx.saved_tensors)


class TritonKLFunction(torch.autograd.Function):
    """Inputs: (cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, *prior_s tensors, *prior_t tensors); the
    teacher's get no gradient."""

    @staticmethod
    def forward(ctx, cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, *prior_tensors):
        q_s, k_s, q_t, k_t = map(_unit_last, (q_s, k_s, q_t, k_t))
        t, s = TritonKLFunction._sides(cfg, q_s, k_s, alpha_s, q_t, k_t, alpha_t, prior_tensors)
        kl, lse_t, lse_s = kl_fwd(t, s, kpm, cfg["causal"], cfg["temperature"])
        ctx.cfg = cfg
        ctx.save_for_backward(q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, lse_t, lse_s, *prior_tensors)
        return kl

    @staticmethod
    def _sides(cfg, q_s, k_s, alpha_s, q_t, k_t, alpha_t, prior_tensors):
        n_s = cfg["n_prior_s"]
        ts, ss = cfg["teacher"], cfg["student"]
        t = Side(q_t, k_t, _prior(ts, prior_tensors[n_s:]), _alpha(ts, alpha_t), ts["scale"])
        s = Side(q_s, k_s, _prior(ss, prior_tensors[:n_s]), _alpha(ss, alpha_s), ss["scale"])
        return t, s

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, lse_t, lse_s, *prior_tensors = ctx.saved_tensors
            cfg, nig = ctx.cfg, ctx.needs_input_grad
            n_s = cfg["n_prior_s"]
            t, s = TritonKLFunction._sides(cfg, q_s, k_s, alpha_s, q_t, k_t, alpha_t, prior_tensors)
            prior_s = _prior(cfg["student"], prior_tensors[:n_s])
            need_dprior = prior_s is not None and any(nig[8 : 8 + n_s])
            need_dalpha = alpha_s is not None and nig[3] and prior_s is not None
            g = g.float().masked_fill(lse_t == float("-inf"), 0.0)  # rows the teacher does not see: KL ≡ 0
            dq, dk, dalpha, heads = score_bwd(s, kpm, cfg["causal"], lse_s, g, teacher=t, lse_t=lse_t,
                                              temperature=cfg["temperature"], need_dprior=need_dprior,
                                              need_dalpha=need_dalpha)
            da, dprior = _finish(alpha_s, dalpha, heads, prior_s, prior_tensors[:n_s], nig[8 : 8 + n_s], nig[3],
                                 q_s.shape[1])
            grads = (None, dq if nig[1] else None, dk if nig[2] else None, da, None, None, None, None, *dprior,
                     *([None] * (len(prior_tensors) - n_s)))
        return guard_double_backward(grads, ctx.saved_tensors)


def _split(side):
    alpha_t = side.alpha if isinstance(side.alpha, torch.Tensor) else None
    cfg = {"prior": side.prior, "alpha": None if alpha_t is not None else side.alpha, "scale": side.scale}
    return cfg, alpha_t, (() if side.prior is None else side.prior.tensors())


def triton_stats(p):
    """Run a ``StatsProblem``: (entropy (B, Hq, Lq), key_mass (B, Hq, Lk)) float32, differentiable."""
    cfg, alpha_t, prior_tensors = _split(p)
    cfg["causal"] = p.causal
    q, k = p.q, p.k
    if k is q:  # torch.compile cannot trace an autograd.Function given the same tensor twice
        k = k.view_as(k)
    return TritonStatsFunction.apply(cfg, q, k, alpha_t, p.key_padding_mask, *prior_tensors)


def triton_kl(p):
    """Run a ``KLProblem``: per-row KL (B, Hq, Lq) float32 before the reduction, differentiable w.r.t. the
    student's q, k, prior tensors and α."""
    t_cfg, alpha_t, prior_t = _split(p.teacher)
    s_cfg, alpha_s, prior_s = _split(p.student)
    cfg = {"teacher": t_cfg, "student": s_cfg, "n_prior_s": len(prior_s), "causal": p.student.causal,
           "temperature": p.temperature}
    s, t = p.student, p.teacher
    k_s = s.k.view_as(s.k) if s.k is s.q else s.k
    return TritonKLFunction.apply(cfg, s.q, k_s, alpha_s, s.key_padding_mask, t.q, t.k, alpha_t, *prior_s, *prior_t)
