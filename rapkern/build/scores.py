"""Dependency scores between tokens, on the training rows only.

All scores are ``P × P`` over feature-lag tokens (token ``t·F + f``) and symmetric:

* ``coactivation`` (default): ``P(i and j active | event) − P(i and j active | non-event)``, "active" = the
  indicator is +1 (inside the critical range). Class-conditional by definition.
* ``indicator_corr``: Pearson correlation of the ±1 indicators; class-conditional = correlation among events
  minus correlation among non-events.
* ``raw_corr``: the same on the continuous inputs (the seed's first competing method: no rectification).

A constant column has correlation 0 with everything (itself included), rather than NaN.
``to_time_tokens`` averages each ``F × F`` block to get a ``T × T`` score between time steps.
"""

from __future__ import annotations

import numpy as np


def coactivation(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
    A = (Z > 0).astype(np.float64)
    a1, a0 = A[y], A[~y]
    return a1.T @ a1 / len(a1) - a0.T @ a0 / len(a0)


def correlation(V: np.ndarray) -> np.ndarray:
    V = np.asarray(V, dtype=np.float64)
    c = V - V.mean(axis=0)
    sd = np.sqrt((c * c).mean(axis=0))
    c = np.divide(c, sd, out=np.zeros_like(c), where=sd > 1e-12 * (1.0 + np.abs(V).max(initial=0.0)))
    return c.T @ c / len(V)


def conditional_correlation(V: np.ndarray, y: np.ndarray, class_conditional: bool) -> np.ndarray:
    if class_conditional:
        return correlation(V[y]) - correlation(V[~y])
    return correlation(V)


def to_time_tokens(S: np.ndarray, T: int, F: int, aggregate: str = "mean") -> np.ndarray:
    """``P × P`` → ``T × T``: the mean (or the entry of largest magnitude) of each ``F × F`` block."""
    blocks = S.reshape(T, F, T, F).transpose(0, 2, 1, 3).reshape(T, T, F * F)
    if aggregate == "mean":
        return blocks.mean(axis=-1)
    idx = np.abs(blocks).argmax(axis=-1)
    return np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]
