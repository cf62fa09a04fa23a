"""Planted threshold-and-lag windows shared by the rapkern.build tests, and a check that the plant is there."""

import numpy as np

THRESHOLD = 1.5


def planted_windows(n=600, T=10, F=4, lag=3, seed=0, end_gap=1):
    """An event iff feature 0 crosses THRESHOLD at p_a = T-1-end_gap and feature 1 crosses it at p_b = p_a-lag.

    Non-events carry decoys (feature 0 alone, feature 1 alone, or neither), so only the pair decides; the other
    features are noise. Returns X (n, T, F) float64, y (n,) int, (p_a, p_b).
    """
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, T, F))
    p_a = T - 1 - end_gap
    p_b = p_a - lag
    kind = rng.choice(4, size=n, p=[0.4, 0.2, 0.2, 0.2])
    has_a, has_b = np.isin(kind, (0, 1)), np.isin(kind, (0, 2))
    up = THRESHOLD + 0.2 + rng.exponential(0.5, size=(2, n))
    X[:, p_a, 0] = np.where(has_a, up[0], np.minimum(X[:, p_a, 0], THRESHOLD - 0.2))
    X[:, p_b, 1] = np.where(has_b, up[1], np.minimum(X[:, p_b, 1], THRESHOLD - 0.2))
    return X, (kind == 0).astype(int), (p_a, p_b)


def test_planted_windows_label_is_the_and_of_both_crossings():
    X, y, (p_a, p_b) = planted_windows(seed=3)
    both = (X[:, p_a, 0] > THRESHOLD) & (X[:, p_b, 1] > THRESHOLD)
    assert np.array_equal(both, y.astype(bool))
    assert 0.3 < y.mean() < 0.5
