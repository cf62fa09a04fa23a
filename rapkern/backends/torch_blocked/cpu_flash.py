"""CPU fast path of the torch backend: PyTorch's fused flash kernel per query block.

``aten::_scaled_dot_product_flash_attention_for_cpu`` takes a float ``attn_mask`` and returns the
natural-log LSE, so each query block runs as one fused call with ``α·B + M`` as the mask tile. For a
relative-lag prior (and for causal masking, which is a function of the lag too) the tile depends on
i − j only: with the keys taken in reverse order it is a Hankel matrix, i.e. a strided *view* of a
vector of bq + nk − 1 entries, so the bias costs no memory traffic at all. Other priors build the tile.

Used when: CPU tensors, head dim of v equals that of q/k (the op's requirement), no dropout. Rows with
no visible key are found exactly from interval counts (all masks here are intervals per row plus key
padding) and get lse −inf (the op returns 0 output and 0 lse for them).

Preconditions of the private op, established here (it checks none of them and silently reads wrong
elements otherwise): every tensor operand (q, k, v, out, dout, the mask) has unit stride in its last dim.
Public SDPA routes other layouts to its math path; we copy the offending operand once per call instead
(O(L·D), against the O(L²·D) of the call), see ``_unit_last``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ...priors import BandedPrior, DensePrior, RelativeLagPrior, lead4

_NEG_INF = float("-inf")
_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _unit_last(t: Tensor) -> Tensor:
    """``t`` with unit stride in its last dim (the fused op's precondition): a copy only when needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def usable(plan) -> bool:
    return (
        _FWD is not None
        and plan.device.type == "cpu"
        and plan.d == plan.dv
        and plan.dropout_p == 0
        and plan.cdt in (torch.float32, torch.float64)
    )


def _band_masked(prior) -> bool:
    return isinstance(prior, BandedPrior) and prior.mask_outside


def mask_is_view(plan) -> bool:
    """True when every block's mask is a strided view (lag, masked band or no prior; no key padding):
    nothing of size bq x nk is materialized, so blocks can be large."""
    lag_like = plan.prior is None or isinstance(plan.prior, RelativeLagPrior)
    return (lag_like or _band_masked(plan.prior)) and plan.kpm5 is None


def fused_rows(plan, cap: int) -> int:
    """Query rows per fused call. A masked band of half-width w reads bq + 2w keys per block for 2w + 1
    useful ones, so its blocks stay near w/2 rows (~1.25x the band's work; per-call cost is small
    against a block's work). Everything else takes ``cap`` rows."""
    if _band_masked(plan.prior):
        return min(cap, max(32, plan.prior.half_width // 2 // 16 * 16))
    return cap


def backward_usable(plan, need_prior_or_alpha: bool) -> bool:
    return _BWD is not None and usable(plan) and not need_prior_or_alpha


def dead_rows(plan) -> Tensor:
    """Bool (B, 1, Lq): query rows that see no key (causal, band and padding are per-row intervals)."""
    i = torch.arange(plan.lq, device=plan.device)
    lo = torch.zeros_like(i)
    hi = torch.full_like(i, plan.lk)
    if plan.causal:
        hi = torch.minimum(hi, i + 1)
    if plan.prior is not None and plan.prior.masks_outside:
        w = plan.prior.half_width
        lo = torch.maximum(lo, i - w)
        hi = torch.minimum(hi, i + w + 1)
    lo = lo.clamp(max=plan.lk)
    hi = torch.maximum(hi, lo)
    if plan.kpm5 is None:
        return (hi <= lo).reshape(1, 1, plan.lq)
    kept = (~plan.kpm5.reshape(plan.b, plan.lk)).to(torch.int64).cumsum(-1)
    kept = torch.nn.functional.pad(kept, (1, 0))
    count = kept[:, hi] - kept[:, lo]
    return (count == 0).unsqueeze(1)


def _lag_tile_is_small(plan) -> bool:
    """Whether building a lag prior's tiles outright costs less than the reversed frame's copies of k and
    v (and stays small): short windows, where the tile is (Hp, Lq, Lk) with no batch dim."""
    hp = plan.prior.lead_shape()[0] * plan.prior.lead_shape()[1]
    cap = int(os.environ.get("RAPKERN_TORCH_LAG_TILE_ELEMS", str(1 << 22)))
    return hp * plan.lq * plan.lk <= min(2 * plan.b * plan.hkv * plan.lk * plan.d, cap)


def may_have_dead_rows(plan) -> bool:
    """Rows with no visible key need key padding or a masked band (top-left causal always leaves key 0)."""
    return plan.kpm5 is not None or (plan.prior is not None and plan.prior.masks_outside)


class _Frame:
    """Keys in their own order, or reversed (for lag/causal tiles that are views).

    The reversal costs a copy of k and v, so it is taken only where it saves more: a lag prior whose
    tiles would be large, or causal masking over several query blocks. A single call covering every
    query uses the op's own causal flag (top-left, like ours); short lag windows build their tiles.
    """

    def __init__(self, plan):
        self.plan = plan
        single = plan.bq >= plan.lq
        if isinstance(plan.prior, RelativeLagPrior):
            self.reversed = not _lag_tile_is_small(plan)
        else:
            self.reversed = plan.prior is None and plan.causal and not single
        self.op_causal = plan.causal and plan.prior is None and single
        k = plan.kc.squeeze(2)
        v = plan.vc.squeeze(2)
        # flip() copies but keeps the input's strides, so the stride fix comes after it
        self.k = _unit_last(k.flip(2) if self.reversed else k)
        self.v = _unit_last(v.flip(2) if self.reversed else v)
        self.q = _unit_last(plan.qg.reshape(plan.b, plan.hq, plan.lq, plan.d))
        self.kpm_bias = None
        if plan.kpm5 is not None:
            kb = torch.zeros(plan.b, 1, 1, plan.lk, dtype=plan.cdt, device=plan.device)
            kb.masked_fill_(plan.kpm5.reshape(plan.b, 1, 1, plan.lk), _NEG_INF)
            self.kpm_bias = kb.flip(-1) if self.reversed else kb
        self._band_buf = None  # see _band_view
        self.alpha_h = None  # (Hq, 1) for the lag vector
        if self.reversed and plan.prior is not None:
            a = plan.alpha5.reshape(-1, 1) if plan.alpha5 is not None else plan.alpha
            self.alpha_h = a

    def keys(self, j0, j1) -> slice:
        lk = self.plan.lk
        return slice(lk - j1, lk - j0) if self.reversed else slice(j0, j1)

    def mask(self, i0, i1, j0, j1) -> Tensor | None:
        p = self.plan
        if self.reversed:
            tile = self._lag_view(i0, i1, j0, j1)
        elif _band_masked(p.prior):
            tile = self._band_view(i0, i1, j0, j1)
        elif p.prior is None:
            tile = None  # not causal, or causal through the op's flag (op_causal)
        else:
            tile = p.bias_tile(i0, i1, j0, j1)
        if self.kpm_bias is not None:
            kb = self.kpm_bias[..., self.keys(j0, j1)]
            tile = kb if tile is None else tile + kb
        return None if tile is None else _unit_last(tile)

    def _band_view(self, i0, i1, j0, j1) -> Tensor:
        """A masked band's tile as a strided view: row r of a (bq, S) buffer holds α·values[i0 + r] between
        P = bq - 1 columns of -inf on each side; reading it with row stride S - 1 shifts row r left by r,
        so column c lands on offset j - i of key j = j0 + c. Causal masking fills the offsets > 0.
        The buffer is allocated once per call (its -inf margins are never written) and reused."""
        p = self.plan
        w, bq, nk = p.prior.half_width, i1 - i0, j1 - j0
        vals = lead4(p.prior.values, 2)[..., i0:i1, :]
        alpha = p.alpha5.reshape(1, -1, 1, 1) if p.alpha5 is not None else p.alpha
        bp, hp = vals.shape[0], max(vals.shape[1], p.hq if p.alpha5 is not None else 1)
        pad = p.bq - 1  # >= bq - 1 for every block
        width = 2 * w + 1 + 2 * pad
        if self._band_buf is None:
            self._band_buf = torch.full((bp, hp, p.bq, width), _NEG_INF, dtype=p.cdt, device=p.device)
        buf = self._band_buf
        torch.mul(vals, alpha, out=buf[:, :, :bq, pad : pad + 2 * w + 1])
        if p.causal:
            buf[:, :, :bq, pad + w + 1 : pad + 2 * w + 1] = _NEG_INF
        start = pad + w + j0 - i0  # column of row 0 for key j0; in [0, width) since j0 >= i0 - w
        return buf.as_strided((bp, hp, bq, nk), (hp * p.bq * width, p.bq * width, width - 1, 1), start)

    def _lag_view(self, i0, i1, j0, j1) -> Tensor | None:
        """Reversed column c' is key j1-1-c', so lag = (i0 - j1 + 1) + r + c': a Hankel view."""
        p = self.plan
        nk, bq = j1 - j0, i1 - i0
        lag0 = i0 - j1 + 1
        lags = torch.arange(lag0, lag0 + bq + nk - 1, device=p.device)
        if p.prior is None and not p.causal:
            return None
        if p.prior is None:
            h = torch.zeros(1, lags.shape[0], dtype=p.cdt, device=p.device)
        else:
            w = p.prior.window
            table = p.prior.table.to(p.cdt)
            table = table.reshape(-1, table.shape[-1]) if table.dim() <= 2 else table
            h = table[..., lags.clamp(-w, w) + w] * (self.alpha_h if self.alpha_h is not None else 1.0)
        if p.causal:
            h = h.masked_fill(lags < 0, _NEG_INF)
        view = h.unfold(-1, nk, 1)  # (..., bq, nk), strides (N, 1, 1): no copy
        return view if view.dim() == 4 else view.unsqueeze(0)


def _live_blocks(plan):
    blocks = [blk for blk in plan.blocks() if blk[3] > blk[2]]
    whole = len(blocks) == 1 and blocks[0] == (0, plan.lq, 0, plan.lk)
    return blocks, whole


def forward(plan) -> tuple[Tensor, Tensor]:
    p = plan
    fr = _Frame(p)
    q = fr.q
    blocks, whole = _live_blocks(p)
    if not whole:  # rows of blocks with no visible key keep output 0 and lse -inf
        out = torch.zeros(p.b, p.hq, p.lq, p.dv, dtype=p.qg.dtype, device=p.device)
        lse = torch.full((p.b, p.hq, p.lq), _NEG_INF, dtype=p.cdt, device=p.device)
    for i0, i1, j0, j1 in blocks:
        ks = fr.keys(j0, j1)
        mask = fr.mask(i0, i1, j0, j1)
        o, l = _FWD(q[:, :, i0:i1].to(p.cdt), fr.k[:, :, ks], fr.v[:, :, ks], 0.0, fr.op_causal,
                    attn_mask=mask, scale=p.scale)
        if isinstance(p.prior, DensePrior):  # a user's -inf entries can empty a row: find it exactly
            l = l.masked_fill((mask == _NEG_INF).all(-1), _NEG_INF)
        if whole:  # one call covers everything: its results are ours (no fill, no copy)
            out, lse = o.to(p.qg.dtype), l.to(p.cdt)
        else:
            out[:, :, i0:i1] = o.to(out.dtype)
            lse[:, :, i0:i1] = l.to(p.cdt)
    if may_have_dead_rows(p):
        dead = dead_rows(p)
        if bool(dead.any()):
            lse = lse.masked_fill(dead, _NEG_INF)
            out = out.masked_fill(dead.unsqueeze(-1), 0.0)
    return out, lse


def backward(plan, out: Tensor, lse: Tensor, dout: Tensor):
    """dq, dk, dv (compute dtype) through the fused CPU backward, one query block at a time."""
    p = plan
    fr = _Frame(p)
    q = fr.q
    out, dout = _unit_last(out), _unit_last(dout)
    lse_op = lse.masked_fill(lse == _NEG_INF, 0.0).to(p.cdt)  # dead rows: mask is all -inf -> p = 0
    dead = dead_rows(p) if may_have_dead_rows(p) else None
    if dead is not None and not bool(dead.any()):
        dead = None
    blocks, whole = _live_blocks(p)
    if not whole:
        dq = torch.zeros(p.b, p.hq, p.lq, p.d, dtype=p.cdt, device=p.device)
        dk = torch.zeros(p.b, p.hkv, p.lk, p.d, dtype=p.cdt, device=p.device)
        dv = torch.zeros(p.b, p.hkv, p.lk, p.dv, dtype=p.cdt, device=p.device)
    for i0, i1, j0, j1 in blocks:
        ks = fr.keys(j0, j1)
        do = dout[:, :, i0:i1].to(p.cdt)
        if dead is not None:
            do = do.masked_fill(dead[..., i0:i1, None], 0.0)
        gq, gk, gv = _BWD(
            do, q[:, :, i0:i1].to(p.cdt), fr.k[:, :, ks], fr.v[:, :, ks], out[:, :, i0:i1].to(p.cdt),
            lse_op[:, :, i0:i1], 0.0, fr.op_causal,
            attn_mask=fr.mask(i0, i1, j0, j1), scale=p.scale,
        )
        if whole:
            dq, dk, dv = gq, gk, gv
        else:
            dq[:, :, i0:i1] = gq
            dk[:, :, ks] += gk
            dv[:, :, ks] += gv
    if fr.reversed:
        dk, dv = dk.flip(2), dv.flip(2)
    return dq, dk, dv
