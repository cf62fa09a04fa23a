"""LDA routing softmax in pure PyTorch, blocked over queries (and clusters when n is large), any device.

``w = softmax(s)`` with ``s = q̂·ĉ/τ`` (``q̂``, ``ĉ`` unit rows, or the raw rows with normalize=False),
``out = w·answers``. The query rows are scaled by ``1/(|q|·τ)`` once, outside the autograd functions, so
autograd differentiates the normalization and a tensor ``τ`` (a learnable temperature) for free.

Dense: per query block one score tile ``(G, bq, bc)``; with one cluster block (the common case) the tile
goes through PyTorch's fused softmax (inference) or one max/exp/sum pass that also yields the LSE kept
for backward; with several, an online softmax as in FlashAttention. Backward recomputes the tiles from
the LSE (``delta = dout·out``). Top-k: per query block ``torch.topk`` on the tile (merged across cluster
blocks), then a tie fix-up so equal scores go to the lower index, a softmax over the k values and a
gathered weighted sum (``embedding_bag``): no second matmul. Its backward runs through the k selected
entries only; the cluster-side sums use ``index_add_`` on CPU (sequential, deterministic) and a scattered
tile times a matmul elsewhere (no atomics). ``cluster_mask`` enters the score matmul as a 0/-inf bias
(``baddbmm``: no extra pass). Nothing of size N × n is held unless weights are asked for.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import compute_dtype

_NORM_EPS = 1e-8  # cos(q, c) of a zero vector is 0, not NaN
_NEG_INF = float("-inf")


def unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)


def _tiles(g: int, n_q: int, n: int, esize: int) -> tuple[int, int]:
    """(query rows, clusters) per score tile of about RAPKERN_TORCH_TILE_MB (default 16): enough rows
    (~1000 at n = 4096 fp32) for BLAS to run at full speed, small enough that no N×n term appears and
    the allocator reuses the block instead of faulting in fresh pages (measured on 2 EPYC cores: 4 MB
    tiles were ~15% slower, 32 MB ~40% slower)."""
    mb = os.environ.get("RAPKERN_TORCH_TILE_MB", "16")
    budget = int(float(mb) * 2**20)
    bc = max(1, min(n, int(os.environ.get("RAPKERN_ROUTE_CLUSTER_BLOCK", "16384"))))
    bq = max(1, min(n_q, max(16, budget // max(g * bc * esize, 1))))
    return bq, bc


class _Plan:
    """Score tiles of scaled queries ``qs (G, N, d)`` against ``cs (G, n, d)`` plus the 0/-inf mask bias."""

    def __init__(self, qs: Tensor, cs: Tensor, bias: Tensor | None):
        self.qs, self.cs, self.bias = qs, cs, bias
        self.g, self.n_q, _ = qs.shape
        self.n = cs.shape[1]
        self.bq, self.bc = _tiles(self.g, self.n_q, self.n, qs.element_size())

    def rows(self):
        for r0 in range(0, self.n_q, self.bq):
            yield r0, min(r0 + self.bq, self.n_q)

    def cols(self):
        for c0 in range(0, self.n, self.bc):
            yield c0, min(c0 + self.bc, self.n)

    def scores(self, r0, r1, c0, c1) -> Tensor:
        qb, ct = self.qs[:, r0:r1], self.cs[:, c0:c1].transpose(-1, -2)
        if self.bias is None:
            return torch.bmm(qb, ct)
        return torch.baddbmm(self.bias[:, :, c0:c1], qb, ct)


def stable_topk(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim, ordered by (value desc, position asc): equal values go to the lower
    position, as a stable descending sort would. ``topk`` picks among equal values arbitrarily, so it
    takes k + 1: rows whose (k+1)-th value equals the k-th (a tie across the cut, rare) are redone with a
    stable sort; elsewhere the chosen set is unique and only its order among equal values is fixed."""
    if k >= s.shape[-1]:
        vals, pos = torch.sort(s, dim=-1, descending=True, stable=True)
        return vals, pos
    vals, pos = torch.topk(s, k + 1, dim=-1)
    straddle = vals[..., k] == vals[..., k - 1]
    vals, pos = vals[..., :k], pos[..., :k]
    pos, perm = torch.sort(pos, dim=-1)  # then a stable sort by value puts equal values in position order
    vals, perm = torch.sort(vals.gather(-1, perm), dim=-1, descending=True, stable=True)
    pos = pos.gather(-1, perm)
    if bool(straddle.any()):
        rows = straddle.nonzero(as_tuple=True)
        order = torch.sort(s[rows], dim=-1, descending=True, stable=True).indices[..., :k]
        pos[rows] = order
        vals[rows] = s[rows].gather(-1, order)
    return vals, pos


def _topk_select(plan: _Plan, r0: int, r1: int, k: int) -> tuple[Tensor, Tensor]:
    """(values, cluster indices) of the k best scores of rows r0:r1, merged over cluster blocks. The running
    list comes first in each merge and holds lower indices in (value desc, index asc) order, so position
    order equals index order among equal values and ``stable_topk`` keeps the lower index."""
    best_v = best_i = None
    for c0, c1 in plan.cols():
        s = plan.scores(r0, r1, c0, c1)
        idx = torch.arange(c0, c1, device=s.device).expand_as(s)
        if best_v is not None:
            s, idx = torch.cat([best_v, s], -1), torch.cat([best_i, idx], -1)
        best_v, pos = stable_topk(s, min(k, s.shape[-1]))
        best_i = idx.gather(-1, pos)
    return best_v, best_i


def _flat(idx: Tensor, n: int) -> Tensor:
    """Group-local cluster indices (G, r, k) -> rows of the (G·n, ·) flattened table."""
    return idx + (torch.arange(idx.shape[0], device=idx.device) * n).view(-1, 1, 1)


def _gather_sum(w: Tensor, idx: Tensor, table: Tensor) -> Tensor:
    """``Σ_j w[..., j] · table[g, idx[..., j]]`` -> (G, r, e) without a (G, r, k, e) buffer."""
    g, r, k = idx.shape
    flat = _flat(idx, table.shape[1]).reshape(-1, k)
    out = F.embedding_bag(flat, table.reshape(-1, table.shape[-1]), per_sample_weights=w.reshape(-1, k).to(table.dtype),
                          mode="sum")
    return out.view(g, r, -1)


def _dense_forward(plan: _Plan, a: Tensor, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    g, e = plan.g, a.shape[-1]
    out = torch.empty(g, plan.n_q, e, dtype=plan.qs.dtype, device=plan.qs.device)
    lse = torch.empty(g, plan.n_q, 1, dtype=plan.qs.dtype, device=plan.qs.device) if need_lse else None
    one_block = plan.bc >= plan.n
    for r0, r1 in plan.rows():
        if one_block and not need_lse:  # PyTorch's fused softmax: one read of the tile less
            out[:, r0:r1] = torch.bmm(torch.softmax(plan.scores(r0, r1, 0, plan.n), -1), a)
            continue
        m = den = acc = None
        for c0, c1 in plan.cols():  # online softmax over cluster blocks
            s = plan.scores(r0, r1, c0, c1)
            m_new = s.amax(-1, keepdim=True)
            if m is not None:
                m_new = torch.maximum(m, m_new)
            m_safe = m_new  # a block whose clusters are all absent has max -inf: keep exp() finite
            if not one_block:
                m_safe = m_new.masked_fill(m_new == _NEG_INF, 0.0)
            p = s.sub_(m_safe).exp_()
            if m is None:
                den, acc = p.sum(-1, keepdim=True), torch.bmm(p, a[:, c0:c1])
            else:
                rescale = torch.exp(m - m_safe)
                den = den * rescale + p.sum(-1, keepdim=True)
                acc = acc * rescale + torch.bmm(p, a[:, c0:c1])
            m = m_new
        out[:, r0:r1] = acc / den
        if need_lse:
            lse[:, r0:r1] = m + torch.log(den)
    return out, lse


class DenseRouteFunction(torch.autograd.Function):
    """``out = softmax(qs·csᵀ + bias)·a``; the gradient reaches qs, cs and a (bias is a constant mask)."""

    @staticmethod
    def forward(ctx, qs, cs, a, bias):
        plan = _Plan(qs, cs, bias)
        out, lse = _dense_forward(plan, a, need_lse=True)
        ctx.save_for_backward(qs, cs, a, out, lse)
        ctx.bias = bias
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, cs, a, out, lse = ctx.saved_tensors
        plan = _Plan(qs, cs, ctx.bias)
        dout = dout.contiguous()
        delta = (dout * out).sum(-1, keepdim=True)
        dqs, dcs, da = torch.zeros_like(qs), torch.zeros_like(cs), torch.zeros_like(a)
        for r0, r1 in plan.rows():
            dob, qb = dout[:, r0:r1], qs[:, r0:r1]
            for c0, c1 in plan.cols():
                p = plan.scores(r0, r1, c0, c1).sub_(lse[:, r0:r1]).exp_()
                da[:, c0:c1].baddbmm_(p.transpose(-1, -2), dob)
                ds = torch.bmm(dob, a[:, c0:c1].transpose(-1, -2)).sub_(delta[:, r0:r1]).mul_(p)
                dqs[:, r0:r1].baddbmm_(ds, cs[:, c0:c1])
                dcs[:, c0:c1].baddbmm_(ds.transpose(-1, -2), qb)
        return dqs, dcs, da, None


def _topk_forward(plan: _Plan, a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    g, e = plan.g, a.shape[-1]
    out = torch.empty(g, plan.n_q, e, dtype=plan.qs.dtype, device=plan.qs.device)
    w = torch.empty(g, plan.n_q, k, dtype=plan.qs.dtype, device=plan.qs.device)
    idx = torch.empty(g, plan.n_q, k, dtype=torch.int64, device=plan.qs.device)
    for r0, r1 in plan.rows():
        vals, ids = _topk_select(plan, r0, r1, k)
        wb = torch.softmax(vals, -1)
        out[:, r0:r1] = _gather_sum(wb, ids, a)
        w[:, r0:r1], idx[:, r0:r1] = wb, ids
    return out, w, idx


class TopkRouteFunction(torch.autograd.Function):
    """Top-k routing; backward through the k selected entries of each row."""

    @staticmethod
    def forward(ctx, k, qs, cs, a, bias):
        out, w, idx = _topk_forward(_Plan(qs, cs, bias), a, k)
        ctx.save_for_backward(qs, cs, a, w, idx)
        return out

    @staticmethod
    def backward(ctx, dout):
        qs, cs, a, w, idx = ctx.saved_tensors
        g, n_q, _ = qs.shape
        n, e, d = cs.shape[1], a.shape[-1], qs.shape[-1]
        dout = dout.contiguous()
        dqs = torch.empty_like(qs)
        a_flat, c_flat = a.reshape(g * n, e), cs.reshape(g * n, d)
        da, dcs = torch.zeros(g * n, e, dtype=a.dtype, device=a.device), torch.zeros_like(c_flat)
        plan = _Plan(qs, cs, None)
        for r0, r1 in plan.rows():
            wb, ib, dob, qb = w[:, r0:r1], idx[:, r0:r1], dout[:, r0:r1], qs[:, r0:r1]
            flat = _flat(ib, n).reshape(-1)
            rows = wb.shape[:2]
            dw = torch.matmul(a_flat[flat].view(*rows, -1, e), dob.unsqueeze(-1)).squeeze(-1)
            ds = wb * (dw - (wb * dw).sum(-1, keepdim=True))
            dqs[:, r0:r1] = torch.matmul(ds.unsqueeze(-2), c_flat[flat].view(*rows, -1, d)).squeeze(-2)
            if qs.device.type == "cpu":  # index_add_ runs sequentially on CPU: deterministic
                da.index_add_(0, flat, (wb.unsqueeze(-1) * dob.unsqueeze(-2)).reshape(-1, e))
                dcs.index_add_(0, flat, (ds.unsqueeze(-1) * qb.unsqueeze(-2)).reshape(-1, d))
            else:  # one row block's k entries scattered into a tile (indices are distinct per row), then a matmul
                tile = torch.zeros(*rows, n, dtype=qs.dtype, device=qs.device)
                da.view(g, n, e).baddbmm_(tile.scatter(-1, ib, wb).transpose(-1, -2), dob)
                dcs.view(g, n, d).baddbmm_(tile.scatter(-1, ib, ds).transpose(-1, -2), qb)
        return None, dqs, dcs.view_as(cs), da.view_as(a), None


def _scaled_inputs(p, cdt):
    """(qs, cs, a, bias, keep): queries scaled by 1/(|q|·τ), unit centroids, the 0/-inf mask bias (G, 1, n)
    and the (G, 1, 1) 0/1 factor that zeroes groups with no present cluster (their bias is dropped)."""
    q, c, a = p.q.to(cdt), p.centroids.to(cdt), p.answers.to(cdt)
    tau = p.tau.to(device=q.device, dtype=cdt) if isinstance(p.tau, Tensor) else p.tau
    if p.normalize:
        qs = q * (1.0 / (q.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS) * tau))
        c = unit_rows(c)
    else:
        qs = q / tau
    bias = keep = None
    if p.cluster_mask is not None:
        empty = p.cluster_mask.all(-1)
        mask = p.cluster_mask & ~empty[:, None]
        bias = torch.zeros(mask.shape, dtype=cdt, device=q.device).masked_fill_(mask, _NEG_INF).unsqueeze(1)
        if bool(empty.any()):
            keep = (~empty).to(cdt).view(-1, 1, 1)
    return qs, c, a, bias, keep


def _with_weights(p, qs, cs, a, bias):
    """The caller wants the (N, n) weights anyway: plain differentiable ops over the whole matrix."""
    ct = cs.transpose(-1, -2)
    s = torch.bmm(qs, ct) if bias is None else torch.baddbmm(bias, qs, ct)
    if p.top_k is None:
        w = torch.softmax(s, dim=-1)
        return torch.bmm(w, a), w, None
    _, idx = stable_topk(s.detach(), p.top_k)
    w_k = torch.softmax(torch.gather(s, -1, idx), dim=-1)
    g, n_q, k = idx.shape
    a_sel = a.reshape(-1, a.shape[-1])[_flat(idx, a.shape[1]).reshape(-1)].view(g, n_q, k, -1)
    return torch.matmul(w_k.unsqueeze(-2), a_sel).squeeze(-2), w_k, idx


def route(p, return_weights: bool):
    """(out, weights, indices) with a leading group dim, in the input dtype."""
    cdt = compute_dtype(p.dtype)
    qs, cs, a, bias, keep = _scaled_inputs(p, cdt)
    if return_weights:
        out, w, idx = _with_weights(p, qs, cs, a, bias)
    else:
        w = idx = None
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qs, cs, a))
        if p.top_k is not None and p.top_k < p.centroids.shape[1]:
            if grad:
                out = TopkRouteFunction.apply(p.top_k, qs, cs, a, bias)
            else:
                out = _topk_forward(_Plan(qs, cs, bias), a, p.top_k)[0]
        elif grad:
            out = DenseRouteFunction.apply(qs, cs, a, bias)
        else:
            out = _dense_forward(_Plan(qs, cs, bias), a, need_lse=False)[0]
    if keep is not None:  # groups with no present cluster: zeros (and zero gradients), indices 0..k-1
        out = out * keep
        if w is not None:
            w = w * keep
        if idx is not None:
            first = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
            idx = torch.where(keep.bool(), idx, first)
    return out.to(p.dtype), None if w is None else w.to(p.dtype), idx
