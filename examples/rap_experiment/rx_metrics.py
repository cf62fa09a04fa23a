"""Metrics without scikit-learn: ROC AUC (ties averaged), Youden's J threshold, F1, Brier, bootstrap intervals."""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)] - 1
    ranks = np.empty(len(x))
    ranks[order] = (0.5 * (starts + ends) + 1)[np.cumsum(new) - 1]
    return ranks


def auc(y: np.ndarray, s: np.ndarray) -> float:
    y = np.asarray(y).astype(bool)
    n1, n0 = y.sum(), (~y).sum()
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = _ranks(np.asarray(s, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximizing TPR − FPR (predict event when p ≥ threshold)."""
    y = np.asarray(y).astype(bool)
    best, thr = -np.inf, 0.5
    for t in np.unique(p):
        pred = p >= t
        j = pred[y].mean() - pred[~y].mean()
        if j > best:
            best, thr = j, t
    return float(thr)


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp = (y & pred).sum()
    den = 2 * tp + (y & ~pred).sum() + (~y & pred).sum()
    return float(2 * tp / den) if den else 0.0


def brier(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y)) ** 2))


def bootstrap_mean_auc(y: np.ndarray, probs: list[np.ndarray], n_boot: int = 1000, seed: int = 0):
    """95 % interval of the seed-averaged test AUC, resampling test windows (same resample for every seed)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        vals.append(np.mean([auc(y[idx], p[idx]) for p in probs]))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))
