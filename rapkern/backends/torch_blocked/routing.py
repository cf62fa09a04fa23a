"""LDA routing softmax in pure PyTorch, blocked over queries and clusters (any device).

``w = softmax(s/τ)`` with ``s = cos(q, c)`` (or ``q·c``), ``out = w·answers``. This is attention with
scores ``q̂ ĉᵀ/τ``, so it runs the same way: query blocks × cluster blocks with an online softmax, one
LSE per row kept for backward, tiles recomputed there (``delta = dout·out`` as in FlashAttention).
``top_k`` first finds, per row, the k-th largest score and its index by merging running top-k lists
across cluster blocks (a stable sort, so ties go to the lower index); a score is then kept iff it is
larger than that value, or equal with an index no larger. Nothing of size N × n is held.
Normalization happens outside the autograd function, where autograd differentiates it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .attention import compute_dtype

_NORM_EPS = 1e-8  # cos(q, c) of a zero vector is 0, not NaN
_NEG_INF = float("-inf")


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _tiles(g: int, n_q: int, n: int, esize: int) -> tuple[int, int]:
    budget = int(float(os.environ.get("RAPKERN_TORCH_TILE_MB", "32")) * 2**20)
    bc = max(1, min(n, int(os.environ.get("RAPKERN_ROUTE_CLUSTER_BLOCK", "4096"))))
    bq = max(1, min(n_q, max(16, budget // max(g * bc * esize, 1))))
    return bq, bc


class _Plan:
    def __init__(self, qn, cn, tau, top_k):
        self.qn, self.cn, self.tau, self.top_k = qn, cn, tau, top_k
        g, self.n_q, _ = qn.shape
        self.n = cn.shape[1]
        self.bq, self.bc = _tiles(g, self.n_q, self.n, qn.element_size())
        self.kth = None  # (value, index) of each row's k-th selected score

    def scores(self, r0, r1, c0, c1) -> Tensor:
        s = torch.matmul(self.qn[:, r0:r1], self.cn[:, c0:c1].transpose(-1, -2)) / self.tau
        if self.kth is not None:
            val, idx = self.kth[0][:, r0:r1, None], self.kth[1][:, r0:r1, None]
            j = torch.arange(c0, c1, device=s.device)
            keep = (s > val) | ((s == val) & (j <= idx))
            s = s.masked_fill(~keep, _NEG_INF)
        return s

    def find_kth(self) -> None:
        if self.top_k is None or self.top_k >= self.n:
            return
        k = self.top_k
        g = self.qn.shape[0]
        vals = torch.empty(g, self.n_q, dtype=self.qn.dtype, device=self.qn.device)
        idxs = torch.empty(g, self.n_q, dtype=torch.int64, device=self.qn.device)
        for r0 in range(0, self.n_q, self.bq):
            r1 = min(r0 + self.bq, self.n_q)
            best_v = best_i = None
            for c0 in range(0, self.n, self.bc):
                c1 = min(c0 + self.bc, self.n)
                s = self.scores(r0, r1, c0, c1)
                i = torch.arange(c0, c1, device=s.device).expand_as(s)
                if best_v is not None:  # earlier (lower-index) candidates first: a stable sort keeps them ahead on ties
                    s, i = torch.cat([best_v, s], -1), torch.cat([best_i, i], -1)
                order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
                best_v, best_i = torch.gather(s, -1, order), torch.gather(i, -1, order)
            vals[:, r0:r1], idxs[:, r0:r1] = best_v[..., -1], best_i[..., -1]
        self.kth = (vals, idxs)


class BlockedRouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tau, top_k, qn, cn, a):
        plan = _Plan(qn, cn, tau, top_k)
        plan.find_kth()
        ac = a.to(qn.dtype)
        g = qn.shape[0]
        out = torch.empty(g, plan.n_q, a.shape[-1], dtype=qn.dtype, device=qn.device)
        lse = torch.empty(g, plan.n_q, dtype=qn.dtype, device=qn.device)
        for r0 in range(0, plan.n_q, plan.bq):
            r1 = min(r0 + plan.bq, plan.n_q)
            m = torch.full((g, r1 - r0, 1), _NEG_INF, dtype=qn.dtype, device=qn.device)
            den = torch.zeros_like(m)
            acc = torch.zeros(g, r1 - r0, a.shape[-1], dtype=qn.dtype, device=qn.device)
            for c0 in range(0, plan.n, plan.bc):  # online softmax over cluster blocks
                c1 = min(c0 + plan.bc, plan.n)
                s = plan.scores(r0, r1, c0, c1)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
                rescale = torch.exp(m - m_safe)
                p = torch.exp(s - m_safe)
                den = den * rescale + p.sum(-1, keepdim=True)
                acc = acc * rescale + torch.matmul(p, ac[:, c0:c1])
                m = m_new
            out[:, r0:r1] = acc / den
            lse[:, r0:r1] = (m + torch.log(den)).squeeze(-1)
        ctx.plan = plan
        ctx.save_for_backward(qn, cn, a, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        qn, cn, a, out, lse = ctx.saved_tensors
        plan = ctx.plan
        plan.qn, plan.cn = qn, cn
        ac = a.to(qn.dtype)
        dout = dout.to(qn.dtype)
        delta = (dout * out).sum(-1, keepdim=True)
        dqn = torch.zeros_like(qn)
        dcn = torch.zeros_like(cn)
        da = torch.zeros_like(ac)
        for r0 in range(0, plan.n_q, plan.bq):
            r1 = min(r0 + plan.bq, plan.n_q)
            dob, qb = dout[:, r0:r1], qn[:, r0:r1]
            for c0 in range(0, plan.n, plan.bc):
                c1 = min(c0 + plan.bc, plan.n)
                w = torch.exp(plan.scores(r0, r1, c0, c1) - lse[:, r0:r1, None])
                da[:, c0:c1] += torch.matmul(w.transpose(-1, -2), dob)
                dw = torch.matmul(dob, ac[:, c0:c1].transpose(-1, -2))
                ds = w * (dw - delta[:, r0:r1]) / plan.tau
                dqn[:, r0:r1] += torch.matmul(ds, cn[:, c0:c1])
                dcn[:, c0:c1] += torch.matmul(ds.transpose(-1, -2), qb)
        return None, None, dqn, dcn, da.to(a.dtype)


def route(p, return_weights: bool):
    """(out, weights, indices) with a leading group dim, in the input dtype."""
    cdt = compute_dtype(p.dtype)
    q, c = p.q.to(cdt), p.centroids.to(cdt)
    if p.normalize:
        q, c = unit_rows(q), unit_rows(c)
    if not return_weights:
        out = BlockedRouteFunction.apply(p.tau, p.top_k, q, c, p.answers)
        return out.to(p.dtype), None, None
    # The caller wants the (N, n) weights anyway, so the plain differentiable path costs no extra order.
    s = torch.matmul(q, c.transpose(-1, -2)) / p.tau
    if p.top_k is None:
        w = torch.softmax(s, dim=-1)
        return torch.matmul(w, p.answers.to(cdt)).to(p.dtype), w.to(p.dtype), None
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : p.top_k]
    w_k = torch.softmax(torch.gather(s, -1, idx), dim=-1)
    w = torch.zeros_like(s).scatter(-1, idx, w_k)
    out = torch.matmul(w, p.answers.to(cdt)).to(p.dtype)
    return out, w_k.to(p.dtype), idx
