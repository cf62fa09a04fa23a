"""Routing modules: ``LDARouter`` (one flat table) and ``HierarchicalRouter`` (domains + a meta-router).

Both are thin holders of tables and configuration around ``rapkern.lda_route`` (the seed's
``w = softmax(cos(q, c)/τ)``, ``out = Σ w·a``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import lda_route

__all__ = ["LDARouter", "HierarchicalRouter", "kmeans"]


def _table(name: str, t, rank=(2, 3)) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() not in rank:
        want = " or ".join({2: "(n, ·)", 3: "(G, n, ·)"}[r] for r in rank)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    return t


def _tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    return float(tau)


def _check_pair(centroids: Tensor, answers: Tensor) -> None:
    if centroids.dim() != answers.dim() or centroids.shape[:-1] != answers.shape[:-1]:
        raise ValueError(
            f"centroids and answers must agree in all but the last dim: got {tuple(centroids.shape)} "
            f"and {tuple(answers.shape)}"
        )


class LDARouter(nn.Module):
    """The LDA routing projection ``out = Σ_i softmax(cos(q, c_i)/τ)_i a_i`` as a module.

    Args:
        centroids: ``(n, d)``, or ``(G, n, d)`` for G tables routed independently.
        answers: ``(n, e)`` / ``(G, n, e)``.
        tau: temperature (> 0).
        top_k: route over the k best clusters only (None: all).
        learnable: centroids, answers and the temperature become parameters (τ through ``log τ``, so it
            stays positive); otherwise they are buffers (moved and saved with the module, never trained).
        normalize: cosine scores (True) or plain dot products.

    ``forward(q)``: q ``(N, d)`` or ``(B, N, d)`` (with a 2-D table: one table shared by the batch)
    -> the routed embeddings ``(…, N, e)``. ``weights(q)``: the routing weights ``(…, N, n)``, or with
    top_k the pair ``(weights (…, N, k), indices (…, N, k))``, differentiable (e.g. for a KL term).
    """

    def __init__(self, centroids: Tensor, answers: Tensor, tau: float = 0.1, top_k: int | None = None,
                 learnable: bool = False, normalize: bool = True, backend: str = "auto"):
        super().__init__()
        centroids, answers = _table("centroids", centroids), _table("answers", answers)
        _check_pair(centroids, answers)
        tau = _tau(tau)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be None or an int, got {type(top_k).__name__}")
        if top_k is not None and not 1 <= top_k <= centroids.shape[-2]:
            raise ValueError(f"top_k must be in [1, n] = [1, {centroids.shape[-2]}], got {top_k}")
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
        self.top_k, self.learnable, self.normalize, self.backend = top_k, learnable, normalize, backend
        log_tau = torch.tensor(math.log(tau), dtype=torch.float32, device=centroids.device)
        if learnable:
            self.centroids = nn.Parameter(centroids.detach().clone())
            self.answers = nn.Parameter(answers.detach().clone())
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("centroids", centroids.detach().clone())
            self.register_buffer("answers", answers.detach().clone())
            self.register_buffer("log_tau", log_tau)

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[-2]

    def _route(self, q: Tensor, cluster_mask, return_weights: bool):
        tau = self.tau if self.learnable else float(self.tau)
        return lda_route(q, self.centroids, self.answers, tau=tau, top_k=self.top_k, normalize=self.normalize,
                         cluster_mask=cluster_mask, return_weights=return_weights, backend=self.backend)

    def forward(self, q: Tensor, cluster_mask: Tensor | None = None) -> Tensor:
        return self._route(q, cluster_mask, False)

    def weights(self, q: Tensor, cluster_mask: Tensor | None = None):
        return self._route(q, cluster_mask, True)[1]

    def extra_repr(self) -> str:
        lead = tuple(self.centroids.shape[:-2])
        return (f"clusters={self.num_clusters}, d={self.centroids.shape[-1]}, e={self.answers.shape[-1]}"
                f"{f', groups={lead[0]}' if lead else ''}, tau={float(self.tau):.4g}, top_k={self.top_k}, "
                f"learnable={self.learnable}, normalize={self.normalize}")


def kmeans(x: Tensor, k: int, *, iters: int = 25, seed: int = 0, cosine: bool = True) -> Tensor:
    """Labels ``(n,)`` in ``[0, k)`` from Lloyd's k-means (cosine: on unit rows), k-means++ seeded with a
    fixed generator, so the result is reproducible. Every label is used (empty clusters are reseeded
    with the farthest point)."""
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, n] = [1, {x.shape[0]}], got {k}")
    x = x.detach().double()
    if cosine:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    centers = x[torch.randint(x.shape[0], (1,), generator=gen)]
    for _ in range(1, k):  # k-means++
        d2 = torch.cdist(x, centers).min(-1).values.square()
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        centers = torch.cat([centers, x[torch.multinomial(probs.cpu(), 1, generator=gen).to(x.device)]])
    labels = torch.cdist(x, centers).argmin(-1)
    for _ in range(iters):
        counts = torch.bincount(labels, minlength=k)
        for j in (counts == 0).nonzero().flatten().tolist():  # reseed an empty cluster
            far = torch.cdist(x, centers).min(-1).values.argmax()
            centers[j] = x[far]
            labels[far] = j
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = sums / torch.bincount(labels, minlength=k).clamp_min(1).unsqueeze(-1).to(x.dtype)
        new = torch.cdist(x, centers).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


class HierarchicalRouter(nn.Module):
    """The seed's hierarchical routing: clusters grouped into domains, a meta-router that picks domains.

    Clusters are grouped by ``labels`` (``(n,)`` ints in ``[0, D)``) or by k-means on the centroids
    (``num_domains``). Each domain is a routing table; the tables are padded to the largest domain and
    batched along G with a ``cluster_mask`` for the padding. The meta-router (a small MLP on the query)
    gives domain logits; ``forward`` routes each query through its ``top_domains`` best domains and mixes
    their outputs with the softmax of those logits. ``fit(queries)`` trains the meta-router to minimize
    the MSE to the full (flat) routing output, as in the seed; ``full(q)`` is that flat routing.
    The domain tables are fixed (buffers); only the meta-router has parameters.
    """

    def __init__(self, centroids: Tensor, answers: Tensor, *, num_domains: int | None = None,
                 labels: Tensor | None = None, tau: float = 0.1, top_k: int | None = None, top_domains: int = 2,
                 hidden: int = 128, normalize: bool = True, seed: int = 0, backend: str = "auto"):
        super().__init__()
        centroids, answers = _table("centroids", centroids, (2,)), _table("answers", answers, (2,))
        _check_pair(centroids, answers)
        self.tau, self.top_k, self.normalize, self.backend = _tau(tau), top_k, normalize, backend
        n = centroids.shape[0]
        if labels is None:
            if num_domains is None:
                raise ValueError("give num_domains (k-means on the centroids) or labels (one domain id per cluster)")
            labels = kmeans(centroids, num_domains, seed=seed).to(centroids.device)
        else:
            if not isinstance(labels, Tensor) or labels.dtype not in (torch.int32, torch.int64):
                raise TypeError("labels must be an integer tensor (n,) of domain ids")
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape (n,) = ({n},), got {tuple(labels.shape)}")
            if labels.min() < 0:
                raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
            used = torch.unique(labels)  # renumber to 0..D-1: an unused id would be an empty domain
            labels = torch.searchsorted(used, labels)
        d_count = int(labels.max()) + 1
        if isinstance(top_domains, bool) or not isinstance(top_domains, int) or not 1 <= top_domains <= d_count:
            raise ValueError(f"top_domains must be an int in [1, {d_count}], got {top_domains}")
        self.num_domains, self.top_domains = d_count, top_domains
        sizes = torch.bincount(labels, minlength=d_count)
        width = int(sizes.max())
        if top_k is not None and not 1 <= top_k <= width:
            raise ValueError(f"top_k must be in [1, largest domain] = [1, {width}], got {top_k}")
        order = torch.argsort(labels, stable=True)
        starts = torch.cumsum(sizes, 0) - sizes
        slot = torch.arange(n, device=labels.device) - starts[labels[order]]
        members = torch.full((d_count, width), -1, dtype=torch.int64, device=labels.device)
        members[labels[order], slot] = order
        pad = members < 0
        self.register_buffer("labels", labels)
        self.register_buffer("members", members)  # (D, width) global cluster ids, -1 = padding
        self.register_buffer("cluster_mask", pad)  # True = padding (absent)
        idx = members.clamp_min(0)
        self.register_buffer("centroids", centroids.detach()[idx].masked_fill(pad[..., None], 0.0))
        self.register_buffer("answers", answers.detach()[idx].masked_fill(pad[..., None], 0.0))
        self.register_buffer("flat_centroids", centroids.detach().clone())
        self.register_buffer("flat_answers", answers.detach().clone())
        d = centroids.shape[-1]
        gen = torch.Generator().manual_seed(seed)
        self.meta = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d_count))
        with torch.no_grad():  # seeded init, so a router is reproducible from its arguments
            for m in self.meta:
                if isinstance(m, nn.Linear):
                    bound = 1.0 / math.sqrt(m.in_features)
                    m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                    m.bias.zero_()
        self.meta.to(device=centroids.device, dtype=centroids.dtype)

    def _route(self, q: Tensor, centroids, answers, mask) -> Tensor:
        return lda_route(q, centroids, answers, tau=self.tau, top_k=self.top_k, normalize=self.normalize,
                         cluster_mask=mask, backend=self.backend)

    def full(self, q: Tensor) -> Tensor:
        """The flat routing over every cluster (the teacher of ``fit``)."""
        return self._route(q, self.flat_centroids, self.flat_answers, None)

    def domain_outputs(self, q: Tensor) -> Tensor:
        """Every domain's routing of every query, ``(D, N, e)``: the tables batched along G."""
        return self._route(q.expand(self.num_domains, *q.shape), self.centroids, self.answers, self.cluster_mask)

    def domain_weights(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(weights (N, top_domains), domain ids (N, top_domains)): softmax over the best meta-router logits."""
        top = self.meta(q).topk(self.top_domains, dim=-1)
        return torch.softmax(top.values, dim=-1), top.indices

    def forward(self, q: Tensor) -> Tensor:
        """q ``(N, d)`` -> ``(N, e)``: each query routed through its top domains only. The (query, domain)
        pairs are grouped by domain into a padded ``(D, rows, d)`` batch, one ``lda_route`` call."""
        if not isinstance(q, Tensor) or q.dim() != 2:
            raise ValueError(f"q must be a tensor (N, d), got {getattr(q, 'shape', type(q).__name__)}")
        w, dom = self.domain_weights(q)
        n_q, t = dom.shape
        flat = dom.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_domains)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(flat.numel(), device=q.device) - starts[flat[order]]
        rows = max(int(counts.max()), 1)
        query_of = torch.zeros(self.num_domains, rows, dtype=torch.int64, device=q.device)
        query_of[flat[order], pos] = order // t
        out = self._route(q[query_of], self.centroids, self.answers, self.cluster_mask)  # (D, rows, e)
        picked = torch.empty(flat.numel(), out.shape[-1], dtype=out.dtype, device=q.device)
        picked[order] = out[flat[order], pos]
        return (w.unsqueeze(-1) * picked.view(n_q, t, -1)).sum(1)

    def fit(self, queries: Tensor, *, steps: int = 200, lr: float = 1e-2, batch: int = 256, seed: int = 0) -> list:
        """Train the meta-router (only) to minimize the MSE to the full routing, as in the seed. Training
        mixes every domain with ``softmax(logits)`` (a top-k choice has no gradient: with one domain its
        weight is 1); ``forward`` then keeps the top domains. Returns the loss per step."""
        with torch.no_grad():
            target = self.full(queries)
            per_domain = self.domain_outputs(queries)  # (D, N, e): the tables are fixed
        opt = torch.optim.Adam(self.meta.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        for _ in range(steps):
            idx = torch.randint(queries.shape[0], (min(batch, queries.shape[0]),), generator=gen).to(queries.device)
            w = torch.softmax(self.meta(queries[idx]), dim=-1)  # (b, D)
            pred = torch.einsum("bd,dbe->be", w, per_domain[:, idx])
            loss = torch.nn.functional.mse_loss(pred, target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    def extra_repr(self) -> str:
        sizes = (~self.cluster_mask).sum(-1).tolist()
        return (f"clusters={self.flat_centroids.shape[0]}, domains={self.num_domains} (sizes {sizes}), "
                f"top_domains={self.top_domains}, tau={self.tau:.4g}, top_k={self.top_k}")
