"""Memory-efficient biased attention in pure PyTorch (any device).

Algorithm: walk query blocks of ``bq`` rows; for each, take only the keys that can be visible (causal
prefix, or the band when a banded prior masks outside it), build that tile's logits
``scale·q kᵀ + α·B`` from the compact prior, apply the masks, and keep one row of log-sum-exp. The
backward recomputes each tile from the LSE (FlashAttention's recipe) and hands the tile's dS to the
prior, which reduces it to the compact gradient without scatter (deterministic on every device).

Peak extra memory is a few tiles of ``B·Hq·bq·nk`` floats (``RAPKERN_TORCH_TILE_MB``, default 32 MB
each), never Lq×Lk. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ...priors import DensePrior, Prior, lead4, sum_to
from ..base import alpha_grad, apply_attention_function, guard_double_backward
from . import cpu_flash, lowrank_concat

_NEG_INF = float("-inf")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class TilePlan:
    """Everything a tile of logits needs; shared by forward and backward so both see the same tiles."""

    def __init__(self, q, k, v, prior: Prior | None, alpha, causal, kpm, scale, dropout_p, seed):
        self.b, self.hq, self.lq, self.d = q.shape
        self.hkv, self.lk = k.shape[1], k.shape[2]
        self.g = self.hq // self.hkv
        self.dv = v.shape[3]
        self.cdt = compute_dtype(q.dtype)
        self.device = q.device
        # Group query heads by their kv head (head h uses kv head h // G, as SDPA's enable_gqa does).
        self.qg = q.reshape(self.b, self.hkv, self.g, self.lq, self.d)
        self.kc = k.to(self.cdt).unsqueeze(2)
        self.vc = v.to(self.cdt).unsqueeze(2)
        self.prior = prior
        self.alpha = alpha
        self.alpha5 = None
        if isinstance(alpha, Tensor):
            self.alpha5 = alpha.to(self.cdt).expand(self.hq).reshape(1, self.hkv, self.g, 1, 1)
        self.causal = causal
        self.kpm5 = None if kpm is None else kpm.reshape(self.b, 1, 1, 1, self.lk)
        self.scale = scale
        self.dropout_p = dropout_p
        self.seed = seed
        self.bq = self._block_rows()

    def use_fused_blocks(self) -> None:
        """Before running the fused CPU kernel: when no tile is materialized, take bigger blocks."""
        if cpu_flash.mask_is_view(self):
            rows = cpu_flash.fused_rows(self, int(os.environ.get("RAPKERN_TORCH_FUSED_ROWS", "1024")))
            self.bq = max(1, min(rows, self.lq))

    def _block_rows(self) -> int:
        budget = int(float(os.environ.get("RAPKERN_TORCH_TILE_MB", "32")) * 2**20)
        esize = torch.finfo(self.cdt).bits // 8
        nk = max(self.lk, 1)
        bq = 16
        for _ in range(2):  # a banded prior that masks outside its band needs only bq + 2w keys
            if self.prior is not None and self.prior.masks_outside:
                nk = max(min(self.lk, bq + 2 * self.prior.half_width + 1), 1)
            bq = budget // max(self.b * self.hq * nk * esize, 1)
            bq = max(16, min(2048, bq // 16 * 16))
        return max(1, min(bq, self.lq))

    def blocks(self):
        for i0 in range(0, self.lq, self.bq):
            i1 = min(i0 + self.bq, self.lq)
            j0, j1 = (0, self.lk) if self.prior is None else self.prior.key_range(i0, i1, self.lk)
            if self.causal:
                j1 = min(j1, i1)
            yield i0, i1, j0, max(j0, j1)

    def _to5(self, tile: Tensor) -> Tensor:
        bp, hp = tile.shape[:2]
        if hp == 1:
            return tile.unsqueeze(2)
        return tile.reshape(bp, self.hkv, self.g, *tile.shape[2:])

    def bias_tile(self, i0, i1, j0, j1) -> Tensor | None:
        """``α·B`` with the causal and band masks as -inf, (Bp|1, Hq|1, bq, nk); None if all zero."""
        tile = None
        if self.prior is not None:
            bias = self.prior.block(i0, i1, j0, j1, self.cdt)
            alpha = self.alpha5.reshape(1, -1, 1, 1) if self.alpha5 is not None else self.alpha
            tile = bias * alpha
            if isinstance(self.prior, DensePrior):  # -inf in a user's dense bias masks for every alpha
                tile = tile.masked_fill(bias == _NEG_INF, _NEG_INF)
        vis = self.visible(i0, i1, j0, j1)
        if vis is not None:
            tile = torch.zeros((), dtype=self.cdt, device=self.device) if tile is None else tile
            tile = tile.masked_fill(~vis, _NEG_INF)
            if tile.dim() < 4:
                tile = tile.reshape(1, 1, *tile.shape)
        return tile

    def visible(self, i0, i1, j0, j1) -> Tensor | None:
        """Bool (bq, nk) of keys the causal and band masks leave visible, or None for all."""
        vis = None
        if self.causal:
            i = torch.arange(i0, i1, device=self.device)[:, None]
            vis = torch.arange(j0, j1, device=self.device)[None, :] <= i
        if self.prior is not None:
            pv = self.prior.visible(i0, i1, j0, j1)
            if pv is not None:
                vis = pv if vis is None else vis & pv
        return vis

    def logits(self, i0, i1, j0, j1) -> tuple[Tensor, Tensor | None]:
        """(logits tile (B, Hkv, G, bq, nk), the prior tile in 5-D or None)."""
        qb = self.qg[..., i0:i1, :].to(self.cdt) * self.scale
        s = torch.matmul(qb, self.kc[..., j0:j1, :].transpose(-1, -2))
        bias = None
        if self.prior is not None:
            bias = self._to5(self.prior.block(i0, i1, j0, j1, self.cdt))
            term = bias * (self.alpha5 if self.alpha5 is not None else self.alpha)
            if isinstance(self.prior, DensePrior):  # -inf in a user's dense bias masks for every alpha
                term = term.masked_fill(bias == _NEG_INF, _NEG_INF)
            s = s + term
        vis = self.visible(i0, i1, j0, j1)
        if vis is not None:
            s = s.masked_fill(~vis, _NEG_INF)
        if self.kpm5 is not None:
            s = s.masked_fill(self.kpm5[..., j0:j1], _NEG_INF)
        return s, bias

    def dropout_scale(self, i0, shape) -> Tensor:
        """keep/(1-p) for one tile, regenerated identically in backward from (seed, i0)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed((self.seed + i0) % (2**63 - 1))
        keep = torch.rand(shape, generator=gen, device=self.device, dtype=self.cdt) >= self.dropout_p
        return keep.to(self.cdt) / (1.0 - self.dropout_p)


def attention_fwd(plan: TilePlan) -> tuple[Tensor, Tensor]:
    p_ = plan
    out = torch.zeros(p_.b, p_.hkv, p_.g, p_.lq, p_.dv, dtype=p_.qg.dtype, device=p_.device)
    # kept in the compute dtype: backward rebuilds p = exp(s - lse) from it (float64 stays float64)
    lse = torch.full((p_.b, p_.hkv, p_.g, p_.lq), _NEG_INF, dtype=p_.cdt, device=p_.device)
    for i0, i1, j0, j1 in p_.blocks():
        if j1 <= j0:
            continue  # no visible key: output 0, lse -inf
        s, _ = p_.logits(i0, i1, j0, j1)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill(m == _NEG_INF, 0.0)  # fully masked rows: keep exp() at 0, not NaN
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        lse[..., i0:i1] = (m + torch.log(denom)).squeeze(-1)
        p = p / denom.masked_fill(denom == 0, 1.0)
        if p_.dropout_p > 0:
            p = p * p_.dropout_scale(i0, p.shape)
        out[..., i0:i1, :] = torch.matmul(p, p_.vc[..., j0:j1, :]).to(out.dtype)
    return out.reshape(p_.b, p_.hq, p_.lq, p_.dv), lse.reshape(p_.b, p_.hq, p_.lq)


def attention_bwd(plan: TilePlan, out, lse, dout, need_q, need_k, need_v, prior_needs, need_alpha, dlse=None):
    """Gradients (dq, dk, dv, dalpha per head, [d prior tensor...]) by tile recomputation.

    ``dlse`` (B, Hq, Lq) or None: the gradient reaching the LSE output. Since dlse_i/ds_ij = p_ij, it
    enters as ``ds = p·(dp − (delta − dlse))``.
    """
    p_ = plan
    cdt, b, hkv, g = p_.cdt, p_.b, p_.hkv, p_.g
    dog = dout.reshape(b, hkv, g, p_.lq, p_.dv).to(cdt)
    delta = (dog * out.reshape(b, hkv, g, p_.lq, p_.dv).to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.reshape(b, hkv, g, p_.lq).to(cdt)
    lse_g = lse.reshape(b, hkv, g, p_.lq).to(cdt)
    lse_g = lse_g.masked_fill(lse_g == _NEG_INF, float("inf"))  # dead rows: p = exp(-inf) = 0
    dq = torch.zeros(b, hkv, g, p_.lq, p_.d, dtype=cdt, device=p_.device) if need_q else None
    dk = torch.zeros(b, hkv, p_.lk, p_.d, dtype=cdt, device=p_.device) if need_k else None
    dv = torch.zeros(b, hkv, p_.lk, p_.dv, dtype=cdt, device=p_.device) if need_v else None
    dalpha = torch.zeros(hkv, g, dtype=cdt, device=p_.device) if need_alpha else None
    prior_grads = []
    if p_.prior is not None:
        for t, need in zip(p_.prior.tensors(), prior_needs):
            trailing = 1 if p_.prior.kind == "lag" else 2
            prior_grads.append(torch.zeros(lead4(t, trailing).shape, dtype=cdt, device=p_.device) if need else None)
    want_ds_prior = any(x is not None for x in prior_grads)

    for i0, i1, j0, j1 in p_.blocks():
        if j1 <= j0:
            continue
        s, bias = p_.logits(i0, i1, j0, j1)
        p = torch.exp(s - lse_g[..., i0:i1, None])
        dob = dog[..., i0:i1, :]
        if p_.dropout_p > 0:
            drop = p_.dropout_scale(i0, p.shape)
            pd = p * drop
        else:
            drop, pd = None, p
        if dv is not None:
            dv[:, :, j0:j1] += torch.matmul(pd.transpose(-1, -2), dob).sum(2)
        dp = torch.matmul(dob, p_.vc[..., j0:j1, :].transpose(-1, -2))
        if drop is not None:
            dp = dp * drop
        ds = p * (dp - delta[..., i0:i1, None])  # dL/d(logit), logit = scale·qk + α·B
        del dp, pd, drop
        if dalpha is not None:
            prod = ds * bias
            if isinstance(p_.prior, DensePrior):
                prod = prod.nan_to_num(0.0, 0.0, 0.0)  # 0 · (-inf) on masked entries
            dalpha += prod.sum(dim=(0, 3, 4))
        if want_ds_prior:
            db = ds * (p_.alpha5 if p_.alpha5 is not None else p_.alpha)
            db = db.reshape(b, p_.hq, i1 - i0, j1 - j0)
            bp, hp = p_.prior.lead_shape()
            p_.prior.accumulate_grad(prior_grads, sum_to(db, (bp, hp) + db.shape[2:]), i0, i1, j0, j1)
        if dq is not None:
            dq[..., i0:i1, :] = torch.matmul(ds, p_.kc[..., j0:j1, :]) * p_.scale
        if dk is not None:
            qb = p_.qg[..., i0:i1, :].to(cdt)
            dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb).sum(2) * p_.scale
    if dq is not None:
        dq = dq.reshape(b, p_.hq, p_.lq, p_.d)
    return dq, dk, dv, (None if dalpha is None else dalpha.reshape(p_.hq)), prior_grads


class BlockedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, v, alpha_t, kpm, *prior_tensors):
        prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
        alpha = alpha_t if alpha_t is not None else cfg["alpha"]
        seed = cfg["seed"]
        plan = TilePlan(q, k, v, prior, alpha, cfg["causal"], kpm, cfg["scale"], cfg["dropout_p"], seed)
        if cpu_flash.usable(plan):
            plan.use_fused_blocks()
            out, lse = cpu_flash.forward(plan)
        else:
            out, lse = attention_fwd(plan)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, v, out, lse, alpha_t, kpm, *prior_tensors)
        ctx.set_materialize_grads(False)  # an unused out or lse gets no zero-filled gradient
        return out, lse.float()

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.no_grad():  # the backward is not differentiable: see guard_double_backward
            grads = BlockedAttentionFunction._backward(ctx, dout, dlse)
        return guard_double_backward(grads, ctx.saved_tensors)

    @staticmethod
    def _backward(ctx, dout, dlse):
        q, k, v, out, lse, alpha_t, kpm, *prior_tensors = ctx.saved_tensors
        cfg = ctx.cfg
        prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
        alpha = alpha_t if alpha_t is not None else cfg["alpha"]
        plan = TilePlan(q, k, v, prior, alpha, cfg["causal"], kpm, cfg["scale"], cfg["dropout_p"], cfg["seed"])
        nig = ctx.needs_input_grad
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:  # rows with no key (lse = -inf) have p = 0: whatever reaches them is dropped
            dlse = dlse.masked_fill(lse == _NEG_INF, 0.0)
        need_alpha = alpha_t is not None and nig[4] and prior is not None
        if dlse is None and cpu_flash.backward_usable(plan, need_alpha or any(nig[6:])):
            plan.use_fused_blocks()
            dq, dk, dv = cpu_flash.backward(plan, out, lse, dout)
            dalpha, dprior = None, None
        else:
            dq, dk, dv, dalpha, dprior = attention_bwd(
                plan, out, lse, dout.contiguous(), nig[1], nig[2], nig[3], list(nig[6:]), need_alpha, dlse
            )
        grads_prior = []
        for t, gbuf in zip(prior_tensors, dprior or [None] * len(prior_tensors)):
            grads_prior.append(None if gbuf is None else gbuf.reshape(t.shape).to(t.dtype))
        dalpha_out = alpha_grad(alpha_t, dalpha, plan.hq, nig[4])
        return (
            None,
            None if dq is None else dq.to(q.dtype),
            None if dk is None else dk.to(k.dtype),
            None if dv is None else dv.to(v.dtype),
            dalpha_out,
            None,
            *grads_prior,
        )


def blocked_attention(p) -> tuple[Tensor, Tensor]:
    """Run an ``AttentionProblem`` through the blocked autograd function (a low-rank prior on CPU as one
    unbiased call over concatenated operands, see lowrank_concat.py)."""
    if lowrank_concat.applies(p):
        p2, dv = lowrank_concat.as_unbiased(p)
        out, lse = apply_attention_function(BlockedAttentionFunction, p2, 2**62)
        return (out if out.shape[-1] == dv else out[..., :dv].contiguous()), lse
    return apply_attention_function(BlockedAttentionFunction, p, 2**62)
