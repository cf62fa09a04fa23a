"""LDA routing softmax in pure PyTorch, blocked over queries (any device).

``w = softmax(s/τ)`` with ``s = cos(q, c)`` (or ``q·c``), ``out = w·answers``; with ``top_k`` the softmax
runs over the k largest scores only (ties go to the lower index: a stable sort). Only per-row LSE is kept
for backward; each query block's scores are recomputed there, so memory is O(block·n), not O(N·n).
Normalization happens outside the autograd function, where autograd differentiates it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .attention import compute_dtype

_NORM_EPS = 1e-8  # cos(q, c) of a zero vector is 0, not NaN


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def top_k_mask(s: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries per row; ties resolved towards the lower index."""
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


def scores(q: Tensor, c: Tensor, tau: float, top_k: int | None) -> Tensor:
    s = torch.matmul(q, c.transpose(-1, -2)) / tau
    if top_k is not None and top_k < s.shape[-1]:
        s = s.masked_fill(~top_k_mask(s, top_k), float("-inf"))
    return s


def _rows_per_block(g: int, n: int, esize: int) -> int:
    budget = int(float(os.environ.get("RAPKERN_TORCH_TILE_MB", "32")) * 2**20)
    return max(16, budget // max(g * n * esize, 1))


class BlockedRouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tau, top_k, qn, cn, a):
        g, n_q, _ = qn.shape
        ac = a.to(qn.dtype)
        out = torch.empty(g, n_q, a.shape[-1], dtype=qn.dtype, device=qn.device)
        lse = torch.empty(g, n_q, dtype=qn.dtype, device=qn.device)
        bq = _rows_per_block(g, cn.shape[1], qn.element_size())
        for i0 in range(0, n_q, bq):
            s = scores(qn[:, i0 : i0 + bq], cn, tau, top_k)
            lse_b = torch.logsumexp(s, dim=-1, keepdim=True)
            out[:, i0 : i0 + bq] = torch.matmul(torch.exp(s - lse_b), ac)
            lse[:, i0 : i0 + bq] = lse_b.squeeze(-1)
        ctx.tau, ctx.top_k, ctx.bq = tau, top_k, bq
        ctx.save_for_backward(qn, cn, a, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        qn, cn, a, lse = ctx.saved_tensors
        tau, top_k, bq = ctx.tau, ctx.top_k, ctx.bq
        ac = a.to(qn.dtype)
        dout = dout.to(qn.dtype)
        dqn = torch.empty_like(qn)
        dcn = torch.zeros_like(cn)
        da = torch.zeros_like(ac)
        for i0 in range(0, qn.shape[1], bq):
            qb, dob = qn[:, i0 : i0 + bq], dout[:, i0 : i0 + bq]
            w = torch.exp(scores(qb, cn, tau, top_k) - lse[:, i0 : i0 + bq, None])
            da += torch.matmul(w.transpose(-1, -2), dob)
            dw = torch.matmul(dob, ac.transpose(-1, -2))
            ds = w * (dw - (w * dw).sum(-1, keepdim=True)) / tau
            dqn[:, i0 : i0 + bq] = torch.matmul(ds, cn)
            dcn += torch.matmul(ds.transpose(-1, -2), qb)
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
    s = scores(q, c, p.tau, p.top_k)
    w = torch.softmax(s, dim=-1)
    out = torch.matmul(w, p.answers.to(cdt)).to(p.dtype)
    if p.top_k is None:
        return out, w.to(p.dtype), None
    idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., : p.top_k]
    return out, torch.gather(w, -1, idx).to(p.dtype), idx
