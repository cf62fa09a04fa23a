"""Data for the RAP experiment: windows (samples, T, features) with binary event labels.

* ``threshold_lag``: the regime where the seed expects RAP to help. An event at the window's end happens iff
  feature ``a`` crossed a threshold at step ``p_a`` and feature ``b`` crossed one ``lag`` steps earlier (an AND of
  two threshold crossings at fixed lags). Non-events carry decoys (``a`` alone, ``b`` alone), so neither crossing
  alone decides. Distractors: ``a~``/``b~`` share a's/b's smooth amplitude (collinear, correlation ≈ 0.9) without
  the crossings, and ``c1..c3`` are three strongly collinear copies of one large common factor. 3 % label noise.
* ``control``: the same features with no threshold structure: the label is a noisy linear function of the
  window means of ``a`` and ``b`` (where the seed expects no help).
* ``basic_motions`` / ``japanese_vowels``: aeon's bundled real data sets, one class against the rest.
"""

from __future__ import annotations

import numpy as np

FEATURES = ["a", "b", "a~", "b~", "c1", "c2", "c3", "e"]
THRESHOLD = 1.5


def _ar1(rng, n, T, phi=0.7):
    x = np.empty((n, T))
    x[:, 0] = rng.standard_normal(n)
    eps = rng.standard_normal((n, T)) * np.sqrt(1 - phi**2)
    for t in range(1, T):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    return x


def _background(rng, n, T):
    a, b, g = _ar1(rng, n, T), _ar1(rng, n, T), 3.0 * _ar1(rng, n, T, phi=0.9)
    noise = lambda s: s * rng.standard_normal((n, T))  # noqa: E731
    cols = [a, b, 0.9 * a + noise(0.44), 0.9 * b + noise(0.44), g + noise(0.3), g + noise(0.3), g + noise(0.3),
            noise(1.0)]
    return np.stack(cols, axis=-1)


def threshold_lag(n: int, *, T: int = 24, lag: int = 4, seed: int = 0, label_noise: float = 0.03):
    """Returns X (n, T, 8) float32, y (n,) int64, and the planted positions ``(p_a, p_b)``."""
    rng = np.random.default_rng(seed)
    X = _background(rng, n, T)
    p_a, p_b = T - 3, T - 3 - lag
    kind = rng.choice(4, size=n, p=[0.35, 0.2, 0.2, 0.25])  # 0 event, 1 a only, 2 b only, 3 neither
    spike = lambda k: THRESHOLD + 0.2 + rng.exponential(0.6, size=k)  # noqa: E731
    below = lambda v: np.minimum(v, THRESHOLD - 0.2)  # noqa: E731
    has_a, has_b = np.isin(kind, (0, 1)), np.isin(kind, (0, 2))
    X[:, p_a, 0] = np.where(has_a, spike(n), below(X[:, p_a, 0]))
    X[:, p_b, 1] = np.where(has_b, spike(n), below(X[:, p_b, 1]))
    y = (kind == 0) ^ (rng.random(n) < label_noise)
    return X.astype(np.float32), y.astype(np.int64), (p_a, p_b)


def control(n: int, *, T: int = 24, seed: int = 0):
    """No threshold structure: y = 1 iff mean(a) + mean(b) + noise is in its top 35 %."""
    rng = np.random.default_rng(seed)
    X = _background(rng, n, T)
    s = X[:, :, 0].mean(1) + X[:, :, 1].mean(1) + 0.3 * rng.standard_normal(n)
    y = s > np.quantile(s, 0.65)
    return X.astype(np.float32), y.astype(np.int64), None


def _aeon_split(loader, split, T=None):
    X, labels = loader(split=split)
    if isinstance(X, list) or X.dtype == object:  # unequal length: crop to T, pad with the last frame
        out = np.empty((len(X), X[0].shape[0], T), dtype=np.float64)
        for i, x in enumerate(X):
            x = np.asarray(x, dtype=np.float64)[:, :T]
            out[i, :, : x.shape[1]] = x
            out[i, :, x.shape[1]:] = x[:, -1:]
        X = out
    return np.asarray(X, dtype=np.float64).transpose(0, 2, 1), np.asarray(labels)  # (n, T, channels)


def aeon_one_vs_rest(name: str, event_class: str, T: int | None = None):
    """(X_train, y_train, X_test, y_test) from aeon's bundled copy, channels standardized on the train split."""
    import aeon.datasets as ds

    loader = {"BasicMotions": ds.load_basic_motions, "JapaneseVowels": ds.load_japanese_vowels}[name]
    Xtr, ltr = _aeon_split(loader, "train", T)
    Xte, lte = _aeon_split(loader, "test", T)
    mu, sd = Xtr.mean(axis=(0, 1)), Xtr.std(axis=(0, 1)) + 1e-8
    f = lambda X: ((X - mu) / sd).astype(np.float32)  # noqa: E731
    return f(Xtr), (ltr == event_class).astype(np.int64), f(Xte), (lte == event_class).astype(np.int64)


def stratified_split(y: np.ndarray, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (first, second) with ``frac`` of each class in the second part."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(frac * len(idx))))
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
