"""A small encoder-only transformer whose attention calls ``rapkern.attention`` with a prior and a gate α.

The attention keeps ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``, ``in_proj_bias``,
``out_proj``, ``embed_dim``, ``num_heads``) and its initialization, so ``rapkern.build.warm_start_qk`` treats both
alike. Tokens are time steps: ``Linear(features → d)`` plus a learned position embedding (N(0, 1), so positions
stay distinguishable after the first LayerNorm), pre-LN blocks, mean pooling, a linear head giving one logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import rapkern


class PriorAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = d, heads, d // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, prior=None, alpha=0.0):
        B, L, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.num_heads, -1).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = rapkern.attention(q, k, v, prior=prior, alpha=alpha)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = PriorAttention(d, heads)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, prior, alpha):
        h = h + self.drop(self.attn(self.ln1(h), prior, alpha))
        return h + self.drop(self.ff(self.ln2(h)))


class EventTransformer(nn.Module):
    def __init__(self, features: int, T: int, *, d: int = 32, heads: int = 4, layers: int = 2, ff: int = 64,
                 dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(T, d))
        self.blocks = nn.ModuleList(Block(d, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)
        self.heads = heads

    def forward(self, x, prior=None, alpha=None):
        """``alpha``: None (no prior) or one tensor ``(heads,)`` per block (a list)."""
        h = self.embed(x) + self.pos
        for i, blk in enumerate(self.blocks):
            h = blk(h, prior, 0.0 if alpha is None else alpha[i])
        return self.head(self.norm(h.mean(1))).squeeze(-1)

    def attention_inputs(self, x, layer: int):
        """The input of block ``layer``'s attention (after its LayerNorm), without prior: for the warm start."""
        with torch.no_grad():
            h = self.embed(x) + self.pos
            for blk in self.blocks[:layer]:
                h = blk(h, None, 0.0)
            return self.blocks[layer].ln1(h)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


