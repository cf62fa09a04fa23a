"""Launchers: allocate outputs, pack the prior into pointer + strides, pick blocks, launch.

No validation here (the backend's reasons and rapkern.validate do that). Under ``TRITON_INTERPRET=1``
(CPU tensors) a fixed small config runs without autotuning; on CUDA the kernels are autotuned over
configs.py, keyed on a power-of-two bucket of Lq and Lk.
"""

from __future__ import annotations

import os

import torch
import triton

from ...priors import lead4, sum_to
from . import configs as C
from ._dkdv_kernel import _attn_bwd_dkdv_kernel
from ._dq_kernel import _attn_bwd_dq_kernel
from ._fwd_kernel import _attn_fwd_kernel

_KIND = {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _arch() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        dpad = max(meta.get("D_PAD", 64), meta.get("DV_PAD", 64))
        cls = C.feature_class(kernel, meta)
        want = C.configs_for(kernel, _arch(), dpad, cls, meta.get("PRIOR", 0))
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
        if not keep:  # the backend's reasons decline these launches; reaching here is a bug
            raise RuntimeError(f"no verified spill-free {kernel} config for sm_{_arch()}, head dim {dpad}, {cls}")
        return keep

    return prune


def _cfgs(kernel):
    out = []
    for bm, bn, w, s in C.all_configs(kernel):
        kw = {"BLOCK_M": bm, "BLOCK_N": bn}
        if kernel == "dkdv":
            kw["LAG_T"] = 2 * max(bm, bn)
        out.append(triton.Config(kw, num_warps=w, num_stages=s))
    return out


_KEY = ["LQ_BUCKET", "LK_BUCKET", "PRIOR", "MASK_OUT", "CAUSAL", "HAS_KPM", "DROPOUT", "D_PAD", "DV_PAD", "IEEE"]
_fwd_tuned = triton.autotune(_cfgs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _prune("fwd")})(
    _attn_fwd_kernel
)
_dq_tuned = triton.autotune(
    _cfgs("dq"), key=_KEY + ["NEED_DPRIOR", "NEED_DALPHA"],
    prune_configs_by={"early_config_prune": _prune("dq")}, reset_to_zero=["DA"],
)(_attn_bwd_dq_kernel)
_dkdv_tuned = triton.autotune(
    _cfgs("dkdv"), key=_KEY + ["NEED_DPRIOR"],
    prune_configs_by={"early_config_prune": _prune("dkdv")}, reset_to_zero=["DL"],
)(_attn_bwd_dkdv_kernel)


# CUDA's grid limits per dimension (x, y, z). Every attention kernel folds its programs into dimension x:
# program id = (b·H + h) · n_blocks + block, so consecutive programs share one head's K/V (or Q) in L2 and
# B·H is not bounded by the 65,535 of dimensions y and z.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _folded_grid(bh: int, n_blocks: int, what: str) -> tuple[int, int, int]:
    n = bh * n_blocks
    if n > GRID_LIMITS[0]:
        raise ValueError(f"{what}: {bh} (batch x heads) x {n_blocks} blocks = {n} programs exceeds CUDA's grid "
                         f"limit of {GRID_LIMITS[0]}")
    return (n, 1, 1)


def fwd_grid(b: int, hq: int, lq: int, block_m: int) -> tuple[int, int, int]:
    """Forward kernel: one program per (b·Hq + h, query block of BLOCK_M rows)."""
    return _folded_grid(b * hq, triton.cdiv(lq, block_m), "attention forward")


def dq_grid(b: int, hq: int, lq: int, block_m: int) -> tuple[int, int, int]:
    """dq kernel: one program per (b·Hq + h, query block of BLOCK_M rows)."""
    return _folded_grid(b * hq, triton.cdiv(lq, block_m), "attention backward (dq)")


def dkdv_grid(b: int, hkv: int, lk: int, block_n: int) -> tuple[int, int, int]:
    """dk/dv kernel: one program per (b·Hkv + kv head, key block of BLOCK_N keys)."""
    return _folded_grid(b * hkv, triton.cdiv(lk, block_n), "attention backward (dk/dv)")


def _lead_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def _i32_addressable(t: torch.Tensor, row_dim: int | None) -> torch.Tensor:
    """``t`` if the kernels' 32-bit in-tile offsets reach every element they read from a row base: up to 128
    rows (one block) times the row stride plus one whole row; else a contiguous copy (only for views with
    huge strides, e.g. a transposed L x L bias beyond 2^31 elements)."""
    span = (t.shape[-1] - 1) * t.stride(-1)
    if row_dim is not None:
        span += 128 * t.stride(row_dim)
    return t if span < 2**31 else t.contiguous()


class PriorPack:
    """Pointer + strides for the kernels (stride 0 on broadcast lead dims; never an expanded copy)."""

    def __init__(self, prior, dummy: torch.Tensor):
        self.kind = "none" if prior is None else prior.kind
        self.code = _KIND[self.kind]
        self.mask_out = bool(getattr(prior, "mask_outside", False))
        self.r_pad = 16
        z = (0, 0, 0, 0)
        self.p, self.ps, self.p2, self.p2s, self.pw = dummy, z, dummy, z, 0
        if prior is None:
            return
        if self.kind == "lag":
            t = _i32_addressable(lead4(prior.table, 1), None)
            self.p, self.ps, self.pw = t, (*_lead_strides(t), 0, t.stride(2)), prior.window
        elif self.kind in ("banded", "dense"):
            t = _i32_addressable(lead4(prior.tensors()[0], 2), 2)
            self.p, self.ps = t, (*_lead_strides(t), t.stride(2), t.stride(3))
            self.pw = prior.half_width if self.kind == "banded" else 0
        else:
            u, v = _i32_addressable(lead4(prior.u, 2), 2), _i32_addressable(lead4(prior.v, 2), 2)
            self.p, self.ps = u, (*_lead_strides(u), u.stride(2), u.stride(3))
            self.p2, self.p2s = v, (*_lead_strides(v), v.stride(2), v.stride(3))
            self.pw, self.r_pad = prior.rank, C.pad_dim(prior.rank)

    def args(self):
        return (self.p, *self.ps, self.p2, *self.p2s, self.pw)


def _alpha_vec(alpha, hq: int, device) -> torch.Tensor:
    if isinstance(alpha, torch.Tensor):
        return alpha.detach().to(torch.float32).expand(hq).contiguous()
    return torch.full((hq,), float(alpha), dtype=torch.float32, device=device)


def _kpm(kpm, dummy):
    if kpm is None:
        return dummy, 0, False
    k8 = kpm.contiguous().view(torch.uint8)
    return k8, k8.stride(0), True


def attention_fwd(q, k, v, pack: PriorPack, alpha, kpm, causal, scale, dropout_p, seed):
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = torch.empty(b, hq, lq, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    if lq == 0 or b * hq == 0:
        return out, lse
    kpm_t, skpm, has_kpm = _kpm(kpm, q)
    alpha_v = _alpha_vec(alpha, hq, q.device)
    args = (
        q, k, v, out, lse, alpha_v, kpm_t, *pack.args(),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), skpm,
        hq, lq, lk, d, dv, hq // hkv, scale * LOG2E, float(dropout_p), int(seed),
        C.length_bucket(lq), C.length_bucket(lk),
    )
    const = dict(
        PRIOR=pack.code, MASK_OUT=pack.mask_out, R_PAD=pack.r_pad, CAUSAL=bool(causal), HAS_KPM=has_kpm,
        DROPOUT=dropout_p > 0, D_PAD=C.pad_dim(d), DV_PAD=C.pad_dim(dv), IEEE=q.dtype == torch.float32,
    )
    if interpreting() or q.device.type != "cuda":
        bm, bn, w, s = C.INTERPRET_FWD
        _attn_fwd_kernel[fwd_grid(b, hq, lq, bm)](*args, **const, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    else:
        _fwd_tuned[lambda meta: fwd_grid(b, hq, lq, meta["BLOCK_M"])](*args, **const)
    return out, lse


def attention_bwd(q, k, v, out, lse, dout, pack: PriorPack, alpha, kpm, causal, scale, dropout_p, seed,
                  need_dprior: bool, need_dalpha: bool, dlse=None):
    """Returns (dq, dk, dv, dalpha per head or None, [grad per prior tensor (lead4-shaped) or None]).

    ``dlse`` (B, Hq, Lq) or None: the gradient reaching the LSE; it enters the kernels through delta
    (``ds = p·(dp − (delta − dlse))``, since dlse_i/ds_ij = p_ij).
    """
    b, hq, lq, d = q.shape
    hkv, lk, dvd = k.shape[1], k.shape[2], v.shape[3]
    dev = q.device
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty(b, hq, lq, d, dtype=q.dtype, device=dev)
    dk = torch.empty(b, hkv, lk, d, dtype=k.dtype, device=dev)
    dv = torch.empty(b, hkv, lk, dvd, dtype=v.dtype, device=dev)
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    kpm_t, skpm, has_kpm = _kpm(kpm, q)
    alpha_v = _alpha_vec(alpha, hq, dev)
    f32 = dict(dtype=torch.float32, device=dev)
    min_block = C.MIN_BLOCK
    nmb = triton.cdiv(max(lq, 1), min_block)

    # prior-gradient scratch: dq kernel owns row-indexed grads, dkdv kernel key-indexed ones
    dpr_q, dpr_q_r, dpr_k, dpr_k_r = q, 0, q, 0
    scratch = torch.zeros(1, **f32)  # never aliases an input: the autotuner zeroes DA and DL
    dl, dl_bh, lag_k, lag_cfg = scratch, 0, 1, None
    kind = pack.kind
    if need_dprior:
        if kind == "banded":  # dS in 128-row groups (the dq kernel's BAND_GROUP), skewed by _band_grad
            dpr_q_r = BAND_GRAD_GROUP + 2 * pack.pw
            dpr_q = torch.zeros(b * hq, triton.cdiv(lq, BAND_GRAD_GROUP) * BAND_GRAD_GROUP, dpr_q_r, **f32)
        elif kind == "dense":
            dpr_q_r = lk
            dpr_q = torch.zeros(b, hq, lq, lk, **f32)
        elif kind == "lowrank":
            dpr_q_r = dpr_k_r = pack.pw
            dpr_q = torch.zeros(b, hq, lq, pack.pw, **f32)
            dpr_k = torch.zeros(b, hq, lk, pack.pw, **f32)
        elif kind == "lag":
            # dk/dv runs one fixed square tile (BLOCK_M == BLOCK_N == lag_b) so the host can decode the
            # per-tile diagonal sums: nnb key blocks x (2K - 1) block diagonals x 2·lag_b lags, then 2 ends
            if interpreting() or dev.type != "cuda":
                lag_b = min(C.INTERPRET_BWD[0], C.INTERPRET_BWD[1])
                lag_cfg = (lag_b, lag_b, C.INTERPRET_BWD[2], C.INTERPRET_BWD[3])
            else:
                lag_cfg = C.lag_grad_config(_arch(), C.pad_dim(max(d, dvd)))
                lag_b = lag_cfg[0]
            lag_k = -(-pack.pw // lag_b) + 1
            nnb_lag = triton.cdiv(lk, lag_b)
            dl_bh = nnb_lag * ((2 * lag_k - 1) * 2 * lag_b + 2)
            dl = torch.zeros(b * hq, dl_bh, **f32)
    da = torch.zeros(b * hq, nmb, **f32) if need_dalpha else scratch

    common = dict(
        PRIOR=pack.code, MASK_OUT=pack.mask_out, R_PAD=pack.r_pad, CAUSAL=bool(causal), HAS_KPM=has_kpm,
        DROPOUT=dropout_p > 0, D_PAD=C.pad_dim(d), DV_PAD=C.pad_dim(dvd), IEEE=q.dtype == torch.float32,
        NEED_DPRIOR=bool(need_dprior),
    )
    tail = (hq // hkv, scale * LOG2E, scale, float(dropout_p), int(seed), C.length_bucket(lq), C.length_bucket(lk))
    dq_args = (
        q, k, v, dout, lse, delta, dq, alpha_v, kpm_t, *pack.args(), dpr_q, dpr_q_r, da, nmb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), skpm, hq, lq, lk, d, dvd, *tail,
    )
    dkdv_args = (
        q, k, v, dout, lse, delta, dk, dv, alpha_v, kpm_t, *pack.args(), dpr_k, dpr_k_r, dl, dl_bh, lag_k,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), skpm,
        hq, hkv, lq, lk, d, dvd, *tail,
    )
    if lq > 0 and lk > 0 and b * hq > 0:
        if interpreting() or dev.type != "cuda":
            bm, bn, w, s = C.INTERPRET_BWD
            _attn_bwd_dq_kernel[dq_grid(b, hq, lq, bm)](
                *dq_args, **common, NEED_DALPHA=bool(need_dalpha), BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s
            )
            if lag_cfg is None:
                _attn_bwd_dkdv_kernel[dkdv_grid(b, hkv, lk, bn)](
                    *dkdv_args, **common, BLOCK_M=bm, BLOCK_N=bn, LAG_T=2 * max(bm, bn), num_warps=w, num_stages=s,
                )
        else:
            _dq_tuned[lambda meta: dq_grid(b, hq, lq, meta["BLOCK_M"])](
                *dq_args, **common, NEED_DALPHA=bool(need_dalpha)
            )
            if lag_cfg is None:
                _dkdv_tuned[lambda meta: dkdv_grid(b, hkv, lk, meta["BLOCK_N"])](*dkdv_args, **common)
        if lag_cfg is not None:
            lb, _, w, s = lag_cfg
            _attn_bwd_dkdv_kernel[dkdv_grid(b, hkv, lk, lb)](
                *dkdv_args, **common, BLOCK_M=lb, BLOCK_N=lb, LAG_T=2 * lb, num_warps=w, num_stages=s,
            )
    else:
        dq.zero_()
        dk.zero_()
        dv.zero_()

    dalpha = da.view(b, hq, nmb).sum(dim=(0, 2)) if need_dalpha else None
    grads = []
    if need_dprior:
        if kind == "lag":
            grads = [_reduce_lag(dl, nnb_lag, lag_k, lag_cfg[0], pack.pw).view(b, hq, -1)]
        elif kind == "lowrank":
            grads = [dpr_q, dpr_k]
        elif kind == "banded":
            grads = [_band_grad(dpr_q, b, hq, lq, pack.pw)]
        else:
            grads = [dpr_q]
    return dq, dk, dv, dalpha, grads


BAND_GRAD_GROUP = 128  # rows per group of the band-gradient buffer (== _dq_kernel BAND_GROUP, >= every BLOCK_M)


def _band_grad(buf: torch.Tensor, b: int, hq: int, lq: int, w: int) -> torch.Tensor:
    """The dq kernel's band-gradient buffer (b·hq, rows, 128 + 2W), where row i holds α·dS[i, j] at column
    j - 128·(i // 128) + W, as the (b, hq, lq, 2W + 1) band layout: row i's band starts at column i mod 128,
    so a strided view (row stride + 1) lines the bands up; copied once into a contiguous result (the full
    groups, then the rows of the last one below lq), no tile-size dependence."""
    bh, rows, r = buf.shape
    g = BAND_GRAD_GROUP
    band = buf.as_strided((bh, rows // g, g, 2 * w + 1), (rows * r, g * r, r + 1, 1))
    out = buf.new_empty(bh, lq, 2 * w + 1)
    full = lq // g
    out[:, : full * g].view(bh, full, g, 2 * w + 1).copy_(band[:, :full])
    if lq > full * g:
        out[:, full * g :].copy_(band[:, full, : lq - full * g])
    return out.view(b, hq, lq, 2 * w + 1)


def _reduce_lag(dl: torch.Tensor, nnb: int, k: int, blk: int, w: int) -> torch.Tensor:
    """Per-tile diagonal sums -> gradient of the 2W+1 lag table, with dense ops in a fixed order.

    Slot (key block n, dm = query block - n, t) holds lag dm·blk - (blk - 1) + t for dm in (-K, K):
    summing over n first leaves (2K - 1) overlapping segments of 2·blk lags; the first blk entries of
    segment dm and the last blk - 1 of segment dm - 1 tile lags ((dm - 1)·blk, dm·blk] exactly, so two
    shifted adds lay them end to end. Lags beyond ±W then fold onto the table's ends, together with the
    tiles that lay entirely beyond the window (the two trailing "ends" per key block).
    """
    bh = dl.shape[0]
    nwin = 2 * k - 1
    diag = dl[:, : nnb * nwin * 2 * blk].view(bh, nnb, nwin, 2 * blk).sum(1)
    ends = dl[:, nnb * nwin * 2 * blk :].view(bh, nnb, 2).sum(1)
    seg = torch.zeros(bh, 2 * k, blk, dtype=dl.dtype, device=dl.device)
    seg[:, : 2 * k - 1] += diag[:, :, :blk]
    seg[:, 1:] += diag[:, :, blk:]
    flat = seg.reshape(bh, 2 * k * blk)
    lags = torch.arange(-k * blk + 1, k * blk + 1, device=dl.device)
    out = torch.zeros(bh, 2 * w + 1, dtype=dl.dtype, device=dl.device)
    if w > 0:
        out[:, 1 : 2 * w] = flat[:, (lags > -w) & (lags < w)]
    out[:, 0] += flat[:, lags <= -w].sum(-1) + ends[:, 0]
    out[:, 2 * w] += flat[:, (lags >= w) & (lags > -w)].sum(-1) + ends[:, 1]
    return out


def reduce_prior_grads(prior_tensors, grads, kind: str):
    """Sum the (B, Hq, ...) per-head grads to each prior tensor's broadcast lead dims, in its dtype."""
    out = []
    for t, g in zip(prior_tensors, grads):
        trailing = 1 if kind == "lag" else 2
        shape = tuple(lead4(t, trailing).shape)
        out.append(sum_to(g, shape[:2] + tuple(g.shape[2:])).reshape(t.shape).to(t.dtype))
    return out


