"""Attention statistics and attention KL in blocked PyTorch (any device).

Walks the query blocks of attention.py's ``TilePlan``. A tile holds whole rows (every key its block can
see), so per-row quantities (LSE, entropy, ``c_i`` below) are finished inside the tile and nothing of size
Lq×Lk is kept; the backward recomputes each tile from the saved LSE(s). With s the logits
``scale·q kᵀ + α·B`` (masked entries -inf) and p = softmax(s):

* stats: ``H_i = lse_i − Σ_j p_ij s_ij``, ``M_j = Σ_i p_ij``; for a loss with gradients gH, gM,
  ``dL/ds_ij = p_ij (gM_j − c_i) − gH_i p_ij (s_ij − μ_i)`` with ``c_i = Σ_k p_ik gM_k`` and
  ``μ_i = Σ_j p_ij s_ij = lse_i − H_i``.
* KL: with s' = s/T, ``KL_i = Σ_j p_t,ij (log p_t,ij − log p_s,ij)`` (= Σ p_t (s_t' − s_s') − lse_t' + lse_s'),
  ``dL/ds_s,ij = g_i (p_s,ij − p_t,ij) / T`` (0 where the student's logit is masked).

dL/ds then goes to q, k, alpha and the prior's compact tensors exactly as in ``attention_bwd``.
Half-precision inputs are computed in float32; results are float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...priors import DensePrior, lead4, sum_to
from ..base import alpha_grad, guard_double_backward
from .attention import TilePlan, compute_dtype

_NEG_INF = float("-inf")
_POS_INF = float("inf")


def _plan(q, k, prior, alpha, causal, kpm, scale, cdt) -> TilePlan:
    """A TilePlan with no v (k stands in; it is never read as v) computing in ``cdt``."""
    if compute_dtype(q.dtype) != cdt:
        q, k = q.to(cdt), k.to(cdt)  # a KL side in float32 or half next to a float64 side: computed in float64
    return TilePlan(q, k, k, prior, alpha, causal, kpm, scale, 0.0, 0)


def _tile(plan: TilePlan, i0, i1, j0, j1) -> tuple[Tensor, Tensor | None]:
    """Logits (B, Hq, bq, nk) and the prior tile in TilePlan's 5-D layout (or None)."""
    s, bias = plan.logits(i0, i1, j0, j1)
    return s.reshape(plan.b, plan.hq, i1 - i0, j1 - j0), bias


def _safe_lse(lse: Tensor) -> Tensor:
    """-inf (no visible key) -> +inf, so exp(s - lse) is 0 there instead of NaN."""
    return lse.masked_fill(lse == _NEG_INF, _POS_INF)


def _row_lse(s: Tensor) -> Tensor:
    m = s.amax(-1, keepdim=True)
    m = m.masked_fill(m == _NEG_INF, 0.0)
    return m + torch.log(torch.exp(s - m).sum(-1, keepdim=True))  # -inf for a row with no visible key


class _GradSink:
    """Takes dL/d(logit) tile by tile and reduces it to dq, dk, dalpha (per head) and the prior's compact
    gradients, as attention_bwd does (no scatter: deterministic)."""

    def __init__(self, plan: TilePlan, need_q: bool, need_k: bool, prior_needs, need_alpha: bool):
        p_, cdt, dev = plan, plan.cdt, plan.device
        self.plan = plan
        self.dq = torch.zeros(p_.b, p_.hkv, p_.g, p_.lq, p_.d, dtype=cdt, device=dev) if need_q else None
        self.dk = torch.zeros(p_.b, p_.hkv, p_.lk, p_.d, dtype=cdt, device=dev) if need_k else None
        self.dalpha = torch.zeros(p_.hkv, p_.g, dtype=cdt, device=dev) if need_alpha else None
        self.prior_grads = []
        if p_.prior is not None:
            trailing = 1 if p_.prior.kind == "lag" else 2
            for t, need in zip(p_.prior.tensors(), prior_needs):
                self.prior_grads.append(torch.zeros(lead4(t, trailing).shape, dtype=cdt, device=dev) if need else None)
        self.want_prior = any(g is not None for g in self.prior_grads)

    def add(self, ds4: Tensor, bias: Tensor | None, i0, i1, j0, j1) -> None:
        p_ = self.plan
        ds = ds4.reshape(p_.b, p_.hkv, p_.g, i1 - i0, j1 - j0)
        if self.dalpha is not None:
            prod = ds * bias
            if isinstance(p_.prior, DensePrior):
                prod = prod.nan_to_num(0.0, 0.0, 0.0)  # 0 · (-inf) on masked entries
            self.dalpha += prod.sum(dim=(0, 3, 4))
        if self.want_prior:
            db = (ds * (p_.alpha5 if p_.alpha5 is not None else p_.alpha)).reshape(p_.b, p_.hq, i1 - i0, j1 - j0)
            bp, hp = p_.prior.lead_shape()
            p_.prior.accumulate_grad(self.prior_grads, sum_to(db, (bp, hp) + db.shape[2:]), i0, i1, j0, j1)
        if self.dq is not None:
            self.dq[..., i0:i1, :] += torch.matmul(ds, p_.kc[..., j0:j1, :]) * p_.scale
        if self.dk is not None:
            qb = p_.qg[..., i0:i1, :].to(p_.cdt)
            self.dk[:, :, j0:j1] += torch.matmul(ds.transpose(-1, -2), qb).sum(2) * p_.scale

    def grads(self, q, k, alpha_t, prior_tensors, need_alpha_input: bool) -> tuple:
        """(dq, dk, dalpha, *dprior) in each input's dtype and shape; None where not needed."""
        p_ = self.plan
        dq = None if self.dq is None else self.dq.reshape(q.shape).to(q.dtype)
        dk = None if self.dk is None else self.dk.to(k.dtype)
        dalpha = None if self.dalpha is None else self.dalpha.reshape(p_.hq)
        dprior = [
            None if g is None else g.reshape(t.shape).to(t.dtype)
            for t, g in zip(prior_tensors, self.prior_grads or [None] * len(prior_tensors))
        ]
        return (dq, dk, alpha_grad(alpha_t, dalpha, p_.hq, need_alpha_input), *dprior)


# ---------------------------------------------------------------------------------------------- statistics


def stats_fwd(plan: TilePlan) -> tuple[Tensor, Tensor, Tensor]:
    """(entropy (B, Hq, Lq), key_mass (B, Hq, Lk), lse (B, Hq, Lq)) in the compute dtype."""
    p_ = plan
    ent = torch.zeros(p_.b, p_.hq, p_.lq, dtype=p_.cdt, device=p_.device)
    mass = torch.zeros(p_.b, p_.hq, p_.lk, dtype=p_.cdt, device=p_.device)
    lse = torch.full((p_.b, p_.hq, p_.lq), _NEG_INF, dtype=p_.cdt, device=p_.device)
    for i0, i1, j0, j1 in p_.blocks():
        if j1 <= j0:
            continue  # no visible key: entropy 0, no mass
        s, _ = _tile(p_, i0, i1, j0, j1)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill(m == _NEG_INF, 0.0)
        z = s - m
        e = torch.exp(z)
        denom = e.sum(-1, keepdim=True)
        live = denom > 0
        denom1 = denom.masked_fill(~live, 1.0)
        p = e / denom1
        # H = log Σe^z − Σ p z: the shift by the row max keeps both terms small
        pz = (p * z.masked_fill(z == _NEG_INF, 0.0)).sum(-1)
        ent[..., i0:i1] = torch.log(denom1).squeeze(-1) - pz
        lse[..., i0:i1] = (m + torch.log(denom)).squeeze(-1)
        mass[..., j0:j1] += p.sum(-2)
    return ent, mass, lse


def stats_bwd(plan: TilePlan, ent: Tensor, lse: Tensor, g_ent: Tensor | None, g_mass: Tensor | None, sink: _GradSink):
    p_ = plan
    dead = lse == _NEG_INF
    lse_s = _safe_lse(lse)
    mu = (lse - ent).masked_fill(dead, 0.0)
    if g_ent is not None:
        g_ent = g_ent.to(p_.cdt)
    if g_mass is not None:
        g_mass = g_mass.to(p_.cdt)
    for i0, i1, j0, j1 in p_.blocks():
        if j1 <= j0:
            continue
        s, bias = _tile(p_, i0, i1, j0, j1)
        p = torch.exp(s - lse_s[..., i0:i1, None])
        ds = torch.zeros((), dtype=p_.cdt, device=p_.device)
        if g_mass is not None:
            gm = g_mass[..., None, j0:j1]
            c = (p * gm).sum(-1, keepdim=True)  # c_i = Σ_k p_ik gM_k: the whole row is in this tile
            ds = p * (gm - c)
        if g_ent is not None:
            centered = s.masked_fill(s == _NEG_INF, 0.0) - mu[..., i0:i1, None]  # p = 0 where s = -inf
            ds = ds - g_ent[..., i0:i1, None] * p * centered
        sink.add(ds.expand(s.shape), bias, i0, i1, j0, j1)


class BlockedStatsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, q, k, alpha_t, kpm, *prior_tensors):
        prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
        alpha = alpha_t if alpha_t is not None else cfg["alpha"]
        plan = _plan(q, k, prior, alpha, cfg["causal"], kpm, cfg["scale"], cfg["cdt"])
        ent, mass, lse = stats_fwd(plan)
        ctx.cfg = cfg
        ctx.save_for_backward(q, k, alpha_t, kpm, ent, lse, *prior_tensors)
        ctx.set_materialize_grads(False)  # an unused output gets no zero-filled gradient
        return ent, mass

    @staticmethod
    def backward(ctx, g_ent, g_mass):
        with torch.no_grad():  # the backward is not differentiable: see guard_double_backward
            q, k, alpha_t, kpm, ent, lse, *prior_tensors = ctx.saved_tensors
            cfg, nig = ctx.cfg, ctx.needs_input_grad
            prior = None if cfg["prior"] is None else cfg["prior"].with_tensors(*prior_tensors)
            alpha = alpha_t if alpha_t is not None else cfg["alpha"]
            plan = _plan(q, k, prior, alpha, cfg["causal"], kpm, cfg["scale"], cfg["cdt"])
            need_alpha = alpha_t is not None and nig[3] and prior is not None
            sink = _GradSink(plan, nig[1], nig[2], list(nig[5:]), need_alpha)
            if g_ent is not None or g_mass is not None:
                stats_bwd(plan, ent, lse, g_ent, g_mass, sink)
            dq, dk, dalpha, *dprior = sink.grads(q, k, alpha_t, prior_tensors, nig[3])
            grads = (None, dq, dk, dalpha, None, *dprior)
        return guard_double_backward(grads, ctx.saved_tensors)


def _split(side) -> tuple[dict, Tensor | None, tuple]:
    alpha_t = side.alpha if isinstance(side.alpha, Tensor) else None
    cfg = {"prior": side.prior, "alpha": None if alpha_t is not None else side.alpha, "scale": side.scale}
    return cfg, alpha_t, (() if side.prior is None else side.prior.tensors())


def blocked_stats(p) -> tuple[Tensor, Tensor]:
    """Run a ``StatsProblem``: (entropy (B, Hq, Lq), key_mass (B, Hq, Lk))."""
    cfg, alpha_t, prior_tensors = _split(p)
    cfg.update(causal=p.causal, cdt=p.out_dtype)
    return BlockedStatsFunction.apply(cfg, p.q, p.k, alpha_t, p.key_padding_mask, *prior_tensors)


# ---------------------------------------------------------------------------------------------- KL


def _kl_blocks(pt: TilePlan, ps: TilePlan):
    """Query blocks shared by both plans, over the union of the keys either side can see. Blocks where the
    teacher sees no key are skipped (KL 0, no gradient)."""
    pt.bq = ps.bq = min(pt.bq, ps.bq)
    for (i0, i1, a0, a1), (_, _, b0, b1) in zip(pt.blocks(), ps.blocks()):
        if a1 <= a0:
            continue
        yield (i0, i1, a0, a1) if b1 <= b0 else (i0, i1, min(a0, b0), max(a1, b1))


def kl_fwd(pt: TilePlan, ps: TilePlan, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """(KL per row (B, Hq, Lq), lse_t', lse_s') with logits divided by the temperature."""
    b, hq, lq, cdt, dev = ps.b, ps.hq, ps.lq, ps.cdt, ps.device
    kl = torch.zeros(b, hq, lq, dtype=cdt, device=dev)
    lse_t = torch.full((b, hq, lq), _NEG_INF, dtype=cdt, device=dev)
    lse_s = torch.full((b, hq, lq), _NEG_INF, dtype=cdt, device=dev)
    for i0, i1, j0, j1 in _kl_blocks(pt, ps):
        st = _tile(pt, i0, i1, j0, j1)[0] / temperature
        ss = _tile(ps, i0, i1, j0, j1)[0] / temperature
        lt, ls = _row_lse(st), _row_lse(ss)
        zt = st - _safe_lse(lt)  # log p_t, -inf where the teacher does not look
        zs = ss - _safe_lse(ls)
        seen_t = zt != _NEG_INF
        term = torch.exp(zt) * (zt - zs)
        # keys the teacher does not see add 0; keys only the student's prior masks make the KL +inf
        term = term.masked_fill(~seen_t, 0.0).masked_fill(seen_t & (zs == _NEG_INF), _POS_INF)
        kl[..., i0:i1] = term.sum(-1)
        lse_t[..., i0:i1] = lt.squeeze(-1)
        lse_s[..., i0:i1] = ls.squeeze(-1)
    return kl, lse_t, lse_s


def kl_bwd(pt: TilePlan, ps: TilePlan, temperature: float, lse_t, lse_s, g: Tensor, sink: _GradSink) -> None:
    g = g.to(ps.cdt).masked_fill(lse_t == _NEG_INF, 0.0)  # rows where the teacher sees nothing: KL ≡ 0
    lse_t, lse_s = _safe_lse(lse_t), _safe_lse(lse_s)
    for i0, i1, j0, j1 in _kl_blocks(pt, ps):
        st = _tile(pt, i0, i1, j0, j1)[0] / temperature
        ss, bias = _tile(ps, i0, i1, j0, j1)
        ss = ss / temperature
        p_t = torch.exp(st - lse_t[..., i0:i1, None])
        p_s = torch.exp(ss - lse_s[..., i0:i1, None])
        ds = (g[..., i0:i1, None] / temperature) * (p_s - p_t)
        ds = ds.masked_fill(ss == _NEG_INF, 0.0)  # a masked student logit depends on nothing
        sink.add(ds, bias, i0, i1, j0, j1)


class BlockedKLFunction(torch.autograd.Function):
    """Inputs: (cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, *prior_s tensors, *prior_t tensors); the
    teacher's get no gradient."""

    @staticmethod
    def forward(ctx, cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, *prior_tensors):
        pt, ps = BlockedKLFunction._plans(cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, prior_tensors)
        kl, lse_t, lse_s = kl_fwd(pt, ps, cfg["temperature"])
        ctx.cfg = cfg
        ctx.save_for_backward(q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, lse_t, lse_s, *prior_tensors)
        return kl

    @staticmethod
    def _plans(cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, prior_tensors):
        t, s, n_s = cfg["teacher"], cfg["student"], cfg["n_prior_s"]
        prior_s = None if s["prior"] is None else s["prior"].with_tensors(*prior_tensors[:n_s])
        prior_t = None if t["prior"] is None else t["prior"].with_tensors(*prior_tensors[n_s:])
        a_s = alpha_s if alpha_s is not None else s["alpha"]
        a_t = alpha_t if alpha_t is not None else t["alpha"]
        cdt, causal = cfg["cdt"], cfg["causal"]
        pt = _plan(q_t, k_t, prior_t, a_t, causal, kpm, t["scale"], cdt)
        ps = _plan(q_s, k_s, prior_s, a_s, causal, kpm, s["scale"], cdt)
        return pt, ps

    @staticmethod
    def backward(ctx, g):
        with torch.no_grad():
            q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, lse_t, lse_s, *prior_tensors = ctx.saved_tensors
            cfg, nig = ctx.cfg, ctx.needs_input_grad
            n_s = cfg["n_prior_s"]
            pt, ps = BlockedKLFunction._plans(cfg, q_s, k_s, alpha_s, kpm, q_t, k_t, alpha_t, prior_tensors)
            need_alpha = alpha_s is not None and nig[3] and ps.prior is not None
            sink = _GradSink(ps, nig[1], nig[2], list(nig[8 : 8 + n_s]), need_alpha)
            kl_bwd(pt, ps, cfg["temperature"], lse_t, lse_s, g, sink)
            dq, dk, dalpha, *dprior = sink.grads(q_s, k_s, alpha_s, prior_tensors[:n_s], nig[3])
            grads = (None, dq, dk, dalpha, None, None, None, None, *dprior, *([None] * (len(prior_tensors) - n_s)))
        return guard_double_backward(grads, ctx.saved_tensors)


def blocked_kl(p) -> Tensor:
    """Run a ``KLProblem``: per-row KL (B, Hq, Lq), before the reduction."""
    t_cfg, alpha_t, prior_t = _split(p.teacher)
    s_cfg, alpha_s, prior_s = _split(p.student)
    cfg = {
        "teacher": t_cfg, "student": s_cfg, "n_prior_s": len(prior_s), "cdt": p.out_dtype,
        "causal": p.student.causal, "temperature": p.temperature,
    }
    s, t = p.student, p.teacher
    return BlockedKLFunction.apply(cfg, s.q, s.k, alpha_s, s.key_padding_mask, t.q, t.k, alpha_t, *prior_s, *prior_t)
