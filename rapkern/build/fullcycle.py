"""The seed's full-cycle variant: rectify → sparse L1 fit → logical polish, turned into a prior B_R.

The rectification is the builder's own (same ``cutlass.Rectifier`` ranges), so ``cutlass.CutlassClassifier`` runs
with ``rectify=False`` on the ±1 indicators in token order and its coefficients come back in that order.
B_R is the outer product ``w wᵀ`` of the selected terms' weights: two (feature, lag) tokens that vote in the
polished rule attend to each other, with the sign of their joint vote; unselected tokens get 0.
"""

from __future__ import annotations

import numpy as np

from ._deps import require

# fista is ~20x faster than the default coordinate descent here; the rest are cutlass's own defaults.
FULL_CYCLE_DEFAULTS = {"solver": "fista", "Cs": 8, "cv": 3, "max_iter": 500, "logic_polish": True, "verbose": False}


def full_cycle_weights(Z: np.ndarray, y: np.ndarray, columns: list[str], params: dict) -> tuple[np.ndarray, object]:
    """Fit ``CutlassClassifier`` on indicators ``Z (n, P)``; return its weights ``(P,)`` (token order)."""
    cutlass = require("cutlass")
    kwargs = {**FULL_CYCLE_DEFAULTS, **params, "rectify": False}
    clf = cutlass.CutlassClassifier(**kwargs)
    clf.fit(Z.astype(np.float64), y.astype(int), feature_names=columns)
    if list(clf.feature_names_) != list(columns):  # rectify=False keeps the input order; guard the assumption
        raise RuntimeError("cutlass.CutlassClassifier reordered the columns; cannot map weights to tokens")
    return np.asarray(clf.coef_, dtype=np.float64).ravel(), clf


def rule_prior(w: np.ndarray) -> np.ndarray:
    """B_R = w wᵀ over feature-lag tokens."""
    return np.outer(w, w)
