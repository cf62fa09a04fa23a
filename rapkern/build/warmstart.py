"""Mode B of the seed: initialize part of W_Q and W_K from a rank-r factorization of the prior.

The mapping, on token embeddings ``X (N, L, E)`` (the attention's input at initialization, positions included):
factor the prior ``M ≈ U_r Σ_r V_rᵀ`` and set target query/key features ``A = U_r √(Σ_r·gain/scale)`` and
``K = V_r √(Σ_r·gain/scale)`` (``L × r``), so that ``scale · A Kᵀ = gain · M_r``. The first ``rank`` rows of each
chosen head's W_Q (and its in-projection bias, when the module has one) are the ridge least-squares solution of
``X W_Qᵀ + b ≈ A`` over all windows and positions; likewise W_K for ``K``. The other ``head_dim − rank`` rows, the
other heads and W_V keep their random initialization. The fit can only reproduce M where the embeddings tell the
positions apart (e.g. positional encodings with ``E ≳ L``); the returned R² and ``qk_prior_correlation`` on held-out
windows say how much of the prior the initial logits carry. Since the head's other dims stay random, that share
grows with ``gain``: on LayerNormed 32-d embeddings (4 heads of 8, rank 4, xavier init) the correlation of the
initial logits with the prior is about 0.3 at gain 1, 0.6 at gain 4 and 0.8 at gain 16 (tests/test_build_warmstart.py).

Works on ``torch.nn.MultiheadAttention`` and ``rapkern.nn.BiasedMultiheadAttention`` (same parameter names:
``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` when kdim/vdim differ, and ``in_proj_bias``), and on
Hugging Face attention layers: BERT-style ``query``/``key`` and Llama/Qwen-style ``q_proj``/``k_proj`` linears (with
grouped-query heads, query heads that share a key head must share the prior: they share its key rows). For a
Hugging Face layer the embeddings are its input hidden states (rotary position embeddings, which act after the
projections, are not modelled).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _hf_projections(module):
    """Hugging Face attention layers: BERT's ``query``/``key`` or Llama/Qwen's ``q_proj``/``k_proj`` (GQA: key
    heads are shared by ``num_key_value_groups`` query heads). None when ``module`` is not one."""
    q = getattr(module, "query", None) or getattr(module, "q_proj", None)
    k = getattr(module, "key", None) or getattr(module, "k_proj", None)
    if not isinstance(q, torch.nn.Linear) or not isinstance(k, torch.nn.Linear):
        return None
    D = getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
    if not isinstance(D, int) or q.out_features % D or k.out_features % D:
        raise TypeError(f"{type(module).__name__}: cannot tell its head dim (attention_head_size or head_dim)")
    H, groups = q.out_features // D, q.out_features // k.out_features
    return q.weight, k.weight, q.bias, k.bias, q.in_features, H, D, groups


def _projections(module):
    """(Wq, Wk, bq, bk, E, H, D, groups): views into the module's parameters; query head h reads key rows of key
    head ``h // groups`` (1 except for grouped-query Hugging Face layers)."""
    hf = _hf_projections(module)
    if hf is not None:
        return hf
    E = getattr(module, "embed_dim", None)
    H = getattr(module, "num_heads", None)
    if not isinstance(E, int) or not isinstance(H, int):
        raise TypeError(f"module must be an attention module with embed_dim and num_heads (nn.MultiheadAttention, "
                        f"rapkern.nn.BiasedMultiheadAttention) or a Hugging Face attention layer with query/key "
                        f"or q_proj/k_proj projections, got {type(module).__name__}")
    w = getattr(module, "in_proj_weight", None)
    if w is not None:
        Wq, Wk = w[:E], w[E:2 * E]
    else:
        Wq, Wk = getattr(module, "q_proj_weight", None), getattr(module, "k_proj_weight", None)
        if Wq is None or Wk is None:
            raise TypeError(f"{type(module).__name__} has neither in_proj_weight nor q_proj_weight/k_proj_weight")
    b = getattr(module, "in_proj_bias", None)
    bq, bk = (None, None) if b is None else (b[:E], b[E:2 * E])
    return Wq, Wk, bq, bk, E, H, E // H, 1


def _scale(module, D) -> float:
    """The module's logit scale: ``scale`` (rapkern) or ``scaling`` (Hugging Face), else 1/sqrt(D)."""
    for name in ("scale", "scaling"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v)
    return 1.0 / math.sqrt(D)


def _embeddings(embeddings, E, kdim, name="embeddings"):
    qe, ke = embeddings if isinstance(embeddings, (tuple, list)) else (embeddings, embeddings)
    for t, dim, what in ((qe, E, "query"), (ke, kdim, "key")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor (N, L, E) or a (query, key) pair of them, got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != dim:
            raise ValueError(f"{name} ({what}) must have shape (N, L, {dim}), got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} ({what}) must be finite")
    if qe.shape[1] != ke.shape[1]:
        raise ValueError(f"{name}: query and key windows must have the same length, "
                         f"got {qe.shape[1]} and {ke.shape[1]}")
    return qe.detach().double(), ke.detach().double()


def _heads(heads, H):
    if heads is None:
        return list(range(H))
    hs = [int(h) for h in heads]
    if not hs or len(set(hs)) != len(hs) or any(h < 0 or h >= H for h in hs):
        raise ValueError(f"heads must be distinct head indices in [0, {H}), got {heads!r}")
    return hs


def _priors(prior_matrix, n_heads, L):
    M = torch.as_tensor(prior_matrix).detach().double().cpu()
    if M.dim() == 2:
        M = M.expand(n_heads, *M.shape)
    if M.dim() != 3 or M.shape[0] != n_heads or M.shape[1:] != (L, L):
        raise ValueError(f"prior_matrix must have shape (L, L) = ({L}, {L}) or (len(heads), L, L) = "
                         f"({n_heads}, {L}, {L}), got {tuple(torch.as_tensor(prior_matrix).shape)}")
    if not torch.isfinite(M).all():
        raise ValueError("prior_matrix must be finite")
    return M


def _ridge_fit(X: torch.Tensor, target: torch.Tensor, with_bias: bool, ridge: float):
    """Least squares ``X W + b ≈ target`` (rows = tokens); returns W (E, r), b (r,) or None, R²."""
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1) if with_bias else X
    G = Xa.T @ Xa
    lam = ridge * G.diagonal().mean().clamp_min(1e-12)
    sol = torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), Xa.T @ target)
    pred = Xa @ sol
    ss = ((target - target.mean(0)) ** 2).sum()
    r2 = float(1 - ((target - pred) ** 2).sum() / ss) if ss > 0 else 1.0
    return (sol[:-1], sol[-1]) if with_bias else (sol, None), r2


def warm_start_qk(module, prior_matrix, rank: int, embeddings, *, heads=None, scale=None, gain: float = 1.0,
                  ridge: float = 1e-3) -> dict:
    """Set the first ``rank`` query/key rows of each head in ``heads`` so that ``scale·QKᵀ ≈ gain·M_r`` on the
    given token embeddings (see module docstring). Returns a report: heads, rank, scale, energy kept, R²."""
    Wq, Wk, bq, bk, E, H, D, groups = _projections(module)
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= D):
        raise ValueError(f"rank must be an int in [1, head_dim = {D}], got {rank!r}")
    if not (isinstance(gain, (int, float)) and gain > 0):
        raise ValueError(f"gain must be a positive number, got {gain!r}")
    hs = _heads(heads, H)
    qe, ke = _embeddings(embeddings, E, Wk.shape[1])
    N, L, _ = qe.shape
    M = _priors(prior_matrix, len(hs), L)
    for a in range(len(hs)):  # query heads sharing a key head (GQA) share its key rows: one prior per group
        for b in range(a):
            if hs[a] // groups == hs[b] // groups and not torch.equal(M[a], M[b]):
                raise ValueError(f"heads {hs[b]} and {hs[a]} share a key head (grouped-query attention) and "
                                 "need the same prior")
    scale = _scale(module, D) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    Xq, Xk = qe.reshape(N * L, -1), ke.reshape(N * L, -1)
    report = {"heads": hs, "rank": rank, "scale": scale, "energy_kept": [], "r2_q": [], "r2_k": []}
    with torch.no_grad():
        for i, h in enumerate(hs):
            U, s, Vh = torch.linalg.svd(M[i])
            total = float((s**2).sum())
            report["energy_kept"].append(float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0)
            root = torch.sqrt(s[:rank] * gain / scale)
            targets = ((Wq, bq, Xq, U[:, :rank] * root, "r2_q"), (Wk, bk, Xk, Vh[:rank].T * root, "r2_k"))
            for W, b, Xs, F, key in targets:
                (w_fit, b_fit), r2 = _ridge_fit(Xs, F.repeat(N, 1), b is not None, ridge)
                head = h if key == "r2_q" else h // groups
                rows = slice(head * D, head * D + rank)
                W[rows] = w_fit.T.to(W.dtype)
                if b is not None:
                    b[rows] = b_fit.to(b.dtype)
                report[key].append(r2)
    return report


def qk_prior_correlation(module, prior_matrix, embeddings, *, heads=None, scale=None) -> list[float]:
    """Per head: Pearson correlation between the initial logits ``scale·q kᵀ`` and the prior, flattened over
    (query, key) and averaged over the windows of ``embeddings`` (use held-out windows)."""
    Wq, Wk, bq, bk, E, H, D, groups = _projections(module)
    hs = _heads(heads, H)
    qe, ke = _embeddings(embeddings, E, Wk.shape[1])
    N, L, _ = qe.shape
    M = _priors(prior_matrix, len(hs), L)
    scale = _scale(module, D) if scale is None else float(scale)
    out = []
    with torch.no_grad():
        q = qe @ Wq.double().T + (0 if bq is None else bq.double())
        k = ke @ Wk.double().T + (0 if bk is None else bk.double())
        for i, h in enumerate(hs):
            kvh = h // groups
            qh, kh = q[..., h * D:(h + 1) * D], k[..., kvh * D:(kvh + 1) * D]
            logits = (scale * qh @ kh.transpose(1, 2)).reshape(N, -1)
            m = M[i].reshape(-1) - M[i].mean()
            z = logits - logits.mean(1, keepdim=True)
            den = z.norm(dim=1) * m.norm()
            corr = torch.where(den > 0, (z @ m) / den.clamp_min(1e-300), torch.zeros_like(den))
            out.append(float(np.mean(corr.numpy())))
    return out
