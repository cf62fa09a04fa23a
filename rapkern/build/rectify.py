"""Critical ranges with the method's own implementation (``cutlass.Rectifier``), and the lag expansion.

Windows ``(samples, T, F)`` are lag-expanded to ``P = T·F`` columns in the order of
``X.reshape(samples, T·F)``: token ``t·F + f`` is feature f at time step t, named ``{feature}_t{t}``.
``cutlass.Rectifier`` keeps one critical range per column (fit on the event windows), but returns its columns
grouped by name prefix (all lags of one feature together): they are mapped back to token order here, once.
"""

from __future__ import annotations

import numpy as np

from ._deps import require


def lag_column_names(feature_names: list[str], T: int) -> list[str]:
    """Names in token order ``t·F + f``; cutlass groups ``{feature}_t{t}`` under one prefix per feature."""
    return [f"{name}_t{t}" for t in range(T) for name in feature_names]


class LagRectifier:
    """A fitted ``cutlass.Rectifier`` over the lag-expanded columns, with its column order mapped to tokens."""

    def __init__(self, *, sdfilter=3.0, snap=0.001, quantile_bounds=None):
        self.params = {"sdfilter": sdfilter, "snap": snap, "quantile_bounds": quantile_bounds}

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: list[str]) -> "LagRectifier":
        cutlass = require("cutlass")
        n, T, F = X.shape
        self.T, self.F, self.feature_names = T, F, list(feature_names)
        self.columns = lag_column_names(self.feature_names, T)
        self.rectifier = cutlass.Rectifier(**self.params)
        self.rectifier.fit(X.reshape(n, T * F), y, feature_names=self.columns)
        token_of = {name: i for i, name in enumerate(self.columns)}
        # perm[k] = token index of the rectifier's k-th output column
        self.perm = np.array([token_of[name] for name in self.rectifier.feature_names_], dtype=np.int64)
        self.rmin = np.empty(T * F)
        self.rmax = np.empty(T * F)
        self.rmin[self.perm] = self.rectifier.rmin_
        self.rmax[self.perm] = self.rectifier.rmax_
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """±1 int8 indicators ``(samples, T·F)`` in token order: +1 inside the critical range."""
        n = X.shape[0]
        z = self.rectifier.transform(X.reshape(n, self.T * self.F), feature_names=self.columns)
        out = np.empty_like(z)
        out[:, self.perm] = z
        return out

    def ranges(self) -> np.ndarray:
        """Critical ranges ``(T, F, 2)`` as [low, high] per (time step, feature); NaN = open side."""
        return np.stack([self.rmin, self.rmax], axis=-1).reshape(self.T, self.F, 2)
