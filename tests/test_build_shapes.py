"""rapkern.build.shapes: each mapping reproduces the dense prior within its stated error; stacking head families."""

import numpy as np
import pytest
import torch

import rapkern
from rapkern.build import relative_error, stack_priors, to_band_prior, to_dense_prior, to_lag_prior, to_lowrank_prior

L = 9


def _toeplitz(seed, L=L):
    c = np.random.default_rng(seed).standard_normal(2 * L - 1)
    i = np.arange(L)
    return c[(i[:, None] - i[None, :]) + L - 1]


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape or (L, L))


def test_lag_prior_is_exact_for_a_toeplitz_matrix():
    M = _toeplitz(0)
    p = to_lag_prior(M)
    assert p.table.shape == (2 * L - 1,)
    assert relative_error(p, M) < 1e-6
    # B[i, j] = table[W + (i - j)]: spot-check the orientation
    W = L - 1
    assert p.table[W + 3].item() == pytest.approx(M[5, 2], abs=1e-6)


def test_lag_prior_is_the_least_squares_projection():
    M = _rand(1)
    p = to_lag_prior(M)
    R = M - p.materialize(1, 1, L, L)[0, 0].double().numpy()
    i = np.arange(L)
    d = i[:, None] - i[None, :]
    for lag in range(-(L - 1), L):  # residual orthogonal to every diagonal indicator
        assert abs(R[d == lag].sum()) < 1e-5
    # clamped window: the end entries take every lag beyond ±W
    q = to_lag_prior(_toeplitz(2), max_lag=2)
    assert q.table.shape == (5,)
    assert relative_error(q, _toeplitz(2)) > 0.1  # lags beyond 2 are averaged, no longer exact


def test_band_prior_is_exact_inside_the_band_and_its_error_is_outside():
    M = _rand(3)
    w = 2
    p = to_band_prior(M, w)
    B = p.materialize(1, 1, L, L)[0, 0].double().numpy()
    i = np.arange(L)
    inside = np.abs(i[:, None] - i[None, :]) <= w
    np.testing.assert_allclose(B[inside], M[inside], rtol=1e-6, atol=1e-6)
    assert np.all(B[~inside] == 0)
    assert relative_error(p, M) == pytest.approx(np.linalg.norm(M[~inside]) / np.linalg.norm(M), rel=1e-5)
    assert relative_error(to_band_prior(np.where(inside, M, 0.0), w), np.where(inside, M, 0.0)) < 1e-6


@pytest.mark.parametrize("rank", [1, 3, L])
def test_lowrank_error_is_exactly_the_energy_left_out(rank):
    M = _rand(4)
    p, kept = to_lowrank_prior(M, rank=rank)
    assert p.u.shape == (L, rank) and p.v.shape == (L, rank)
    assert relative_error(p, M) ** 2 == pytest.approx(1 - kept, abs=1e-6)
    if rank == L:
        assert kept == pytest.approx(1.0)


def test_lowrank_energy_target_picks_the_smallest_rank():
    M = _rand(5)
    p, kept = to_lowrank_prior(M, energy=0.8)
    assert kept >= 0.8
    _, below = to_lowrank_prior(M, rank=p.rank - 1)
    assert below < 0.8
    with pytest.raises(ValueError, match="give rank or energy, not both"):
        to_lowrank_prior(M, rank=2, energy=0.5)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 9\]"):
        to_lowrank_prior(M, rank=10)


def test_dense_and_heads_and_per_head_stacks():
    M = _rand(6)
    assert relative_error(to_dense_prior(M), M) < 1e-7  # float32 rounding only
    assert relative_error(to_dense_prior(M, dtype=torch.float64), M) == 0.0
    assert to_dense_prior(M, heads=3).bias.shape == (3, L, L)
    S = np.stack([_toeplitz(7), _toeplitz(8)])
    lag = to_lag_prior(S)
    assert lag.table.shape == (2, 2 * L - 1)
    assert relative_error(lag, S) < 1e-6
    lr, kept = to_lowrank_prior(S, energy=0.9)
    assert len(kept) == 2 and lr.u.shape[:2] == (2, L)
    with pytest.raises(ValueError, match="heads= repeats a single"):
        to_dense_prior(S, heads=2)


def test_stack_priors_builds_a_head_family():
    a, b = _toeplitz(9), _toeplitz(10)
    p = stack_priors([to_lag_prior(a, heads=2), to_lag_prior(b), None])
    assert p.table.shape == (4, 2 * L - 1)
    dense = p.materialize(1, 4, L, L)[0].double().numpy()
    np.testing.assert_allclose(dense[0], a, atol=1e-5)
    np.testing.assert_allclose(dense[1], a, atol=1e-5)
    np.testing.assert_allclose(dense[2], b, atol=1e-5)
    assert np.all(dense[3] == 0)  # a free head: no bias whatever its alpha
    lr = stack_priors([to_lowrank_prior(a, rank=2)[0], to_lowrank_prior(b, rank=4)[0]])
    assert lr.u.shape == (2, L, 4)  # zero-padded to the larger rank
    np.testing.assert_allclose(lr.materialize(1, 2, L, L)[0, 0].numpy(),
                               to_lowrank_prior(a, rank=2)[0].materialize(1, 1, L, L)[0, 0].numpy(), atol=1e-6)
    q, k, v = torch.randn(3, 1, 4, L, 8).unbind(0)
    out = rapkern.attention(q, k, v, prior=p, alpha=torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert out.shape == (1, 4, L, 8)
    with pytest.raises(TypeError, match="one kind"):
        stack_priors([to_lag_prior(a), to_dense_prior(a)])
    with pytest.raises(ValueError, match="equal shapes"):
        stack_priors([to_dense_prior(a), to_dense_prior(_rand(1, 4, 4))])
    with pytest.raises(ValueError, match="at least one prior"):
        stack_priors([None, None])


def test_bad_matrices():
    with pytest.raises(ValueError, match=r"M must be a square matrix \(L, L\) or a stack \(H, L, L\), got shape \(3"):
        to_dense_prior(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="M must be finite"):
        to_lag_prior(np.full((3, 3), np.nan))
    with pytest.raises(TypeError, match="M must be a numpy array or torch tensor"):
        to_band_prior([[1.0]], 0)
    with pytest.raises(ValueError, match="width must be a non-negative int"):
        to_band_prior(np.zeros((3, 3)), -1)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        to_dense_prior(np.zeros((3, 3)), heads=0)
