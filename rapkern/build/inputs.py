"""Checks for the builder's inputs: windows X (samples, T, features), labels y, feature names.

Every check runs before any computation and names the argument, what it got and what is allowed.
"""

from __future__ import annotations

import numpy as np


def as_windows(X, name: str = "X") -> np.ndarray:
    """X as a float64 array (samples, T, features) with finite values."""
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor, without importing torch here
        X = X.detach().cpu().numpy()
    if not isinstance(X, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor of shape (samples, T, features), "
                        f"got {type(X).__name__}")
    if X.dtype.kind not in "fiub":
        raise TypeError(f"{name} must hold real numbers, got dtype {X.dtype}")
    if X.ndim != 3:
        raise ValueError(f"{name} must have shape (samples, T, features) (3 dims), got {X.ndim} dims {X.shape}")
    if X.shape[0] < 2 or X.shape[1] < 1 or X.shape[2] < 1:
        raise ValueError(f"{name} must have at least 2 samples and non-empty T and features, got {X.shape}")
    X = np.asarray(X, dtype=np.float64)
    bad = ~np.isfinite(X).all(axis=(1, 2))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has {rows.size} windows with NaN or inf (rows {rows[:5].tolist()}"
                         f"{', ...' if rows.size > 5 else ''}); impute or drop them before building a prior")
    return X


def as_labels(y, n: int, name: str = "y") -> np.ndarray:
    """y as a bool array (samples,) holding both classes: True = event."""
    if hasattr(y, "detach") and hasattr(y, "cpu"):
        y = y.detach().cpu().numpy()
    if not isinstance(y, (np.ndarray, list, tuple)):
        raise TypeError(f"{name} must be a 1-D array of 0/1 or bool event labels, got {type(y).__name__}")
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per window), got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name} must have one label per window of X ({n}), got {y.shape[0]}")
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold 0/1 or bool labels, got dtype {y.dtype}")
    values = np.unique(y)
    if not set(values.tolist()) <= {0, 1}:
        raise ValueError(f"{name} must hold 0/1 or bool labels (1 = event), got values {values[:5].tolist()}")
    if values.size < 2:
        raise ValueError(f"{name} must contain both events (1) and non-events (0), got only {values.tolist()}")
    return y.astype(bool)


def feature_names_or_default(names, n_features: int) -> list[str]:
    if names is None:
        return [f"f{i}" for i in range(n_features)]
    names = [str(s) for s in names]
    if len(names) != n_features:
        raise ValueError(f"feature_names must have one name per feature ({n_features}), got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"feature_names must be unique, got {names}")
    return names
