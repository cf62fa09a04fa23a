"""rapkern.build.RAPBuilder: planted structure recovered, cutlass's ranges, score definitions, bad inputs."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

cutlass = pytest.importorskip("cutlass")

from test_build_data import THRESHOLD, planted_windows  # noqa: E402

import rapkern.build  # noqa: E402
from rapkern.build import RAPBuilder  # noqa: E402


@pytest.mark.parametrize("lag", [2, 5], ids=lambda v: f"lag{v}")
def test_planted_pair_and_lag_are_recovered(lag):
    X, y, (p_a, p_b) = planted_windows(n=800, T=10, lag=lag, seed=lag)
    b = RAPBuilder(keep_top=0.02).fit(X, y)
    B = b.prior_matrix("time").numpy()
    off = B.copy()
    np.fill_diagonal(off, -np.inf)
    i, j = np.unravel_index(off.argmax(), off.shape)
    assert {int(i), int(j)} == {p_a, p_b}
    table = b.lag_prior().table.numpy()
    W = (len(table) - 1) // 2
    lags = [d for d in np.argsort(-table) - W if d != 0]
    assert abs(lags[0]) == lag
    # feature-lag tokens: the strongest cross-token score is between (p_a, feature 0) and (p_b, feature 1)
    S = b.score_matrix("feature_lag")
    np.fill_diagonal(S, -np.inf)
    i, j = np.unravel_index(S.argmax(), S.shape)
    assert {int(i), int(j)} == {p_a * 4 + 0, p_b * 4 + 1}


def test_shuffled_labels_do_not_show_the_plant():
    X, y, (p_a, p_b) = planted_windows(n=800, seed=1)
    y = np.random.default_rng(0).permutation(y)
    S = RAPBuilder().fit(X, y).score_matrix("feature_lag")
    assert abs(S[p_a * 4, p_b * 4 + 1]) < 0.1


PASS_THROUGH = [{}, {"sdfilter": 2.0, "snap": 0.01}, {"sdfilter": None, "quantile_bounds": (0.05, 0.9)}]


@pytest.mark.parametrize("params", PASS_THROUGH, ids=["defaults", "sdfilter2_snap", "quantiles"])
def test_critical_ranges_equal_cutlass_rectifier_on_the_same_rows(params):
    X, y, (p_a, p_b) = planted_windows(n=400, T=6, F=3, lag=2, seed=7)
    b = RAPBuilder(**params, feature_names=["u", "v", "w1"]).fit(X, y)
    names = [f"{f}_t{t}" for t in range(6) for f in ("u", "v", "w1")]
    ref = cutlass.Rectifier(**params).fit(X.reshape(400, -1), y, feature_names=names)
    assert ref.feature_names_ != names  # cutlass groups by prefix: the mapping back is not the identity
    got = b.critical_ranges
    for k, name in enumerate(ref.feature_names_):
        f, t = name.rsplit("_t", 1)
        np.testing.assert_array_equal(got[f][int(t)], [ref.rmin_[k], ref.rmax_[k]])
    z_ref = ref.transform(X.reshape(400, -1), feature_names=names)
    z = b.transform(X)
    for k, name in enumerate(ref.feature_names_):
        f, t = name.rsplit("_t", 1)
        assert np.array_equal(z[:, int(t), ["u", "v", "w1"].index(f)], z_ref[:, k])
    # the planted crossing: events sit above the threshold, so the range's low side is closed near it
    assert got["u"][p_a][0] > THRESHOLD


def test_critical_ranges_follow_the_parameters():
    X, y, _ = planted_windows(n=400, seed=2)
    a = RAPBuilder().fit(X, y).critical_ranges["f3"]
    q = RAPBuilder(sdfilter=None, quantile_bounds=(0.2, 0.8)).fit(X, y).critical_ranges["f3"]
    assert np.all(q[:, 1] - q[:, 0] < np.nan_to_num(a[:, 1] - a[:, 0], nan=np.inf))


def _active(X, b):
    return (b.transform(X) > 0).reshape(len(X), -1).astype(float)


def test_coactivation_score_is_the_signed_difference_of_joint_activation():
    X, y, _ = planted_windows(n=300, T=4, F=2, lag=1, seed=4)
    b = RAPBuilder(normalize=None).fit(X, y)
    A = _active(X, b)
    e, ne = y == 1, y == 0
    want = np.array([[np.mean(A[e, i] * A[e, j]) - np.mean(A[ne, i] * A[ne, j]) for j in range(8)] for i in range(8)])
    np.testing.assert_allclose(b.score_matrix("feature_lag"), want, atol=1e-12)
    # time tokens: the mean of each 2 x 2 (feature x feature) block
    want_t = want.reshape(4, 2, 4, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(b.score_matrix("time"), want_t, atol=1e-12)
    np.testing.assert_allclose(b.prior_matrix("time").numpy(), want_t, rtol=1e-6, atol=1e-7)


def test_maxabs_aggregation_keeps_the_signed_strongest_entry_of_each_block():
    X, y, _ = planted_windows(n=300, T=4, F=2, lag=1, seed=4)
    S = RAPBuilder(aggregate="maxabs").fit(X, y)
    P = S.score_matrix("feature_lag").reshape(4, 2, 4, 2).transpose(0, 2, 1, 3).reshape(4, 4, 4)
    want = np.take_along_axis(P, np.abs(P).argmax(-1)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(S.score_matrix("time"), want)
    assert S.rectifier.feature_names_[0] == "f0_t0"  # the fitted cutlass object, in its grouped column order


def test_correlation_scores_match_numpy():
    X, y, _ = planted_windows(n=300, T=4, F=2, lag=1, seed=5)
    Z = RAPBuilder().fit(X, y).transform(X).reshape(300, -1).astype(float)
    keep = Z.std(0) > 0
    S = RAPBuilder(score="indicator_corr", class_conditional=True).fit(X, y).score_matrix("feature_lag")
    e = y == 1
    both = keep & (Z[e].std(0) > 0) & (Z[~e].std(0) > 0)
    want = np.corrcoef(Z[e][:, both].T) - np.corrcoef(Z[~e][:, both].T)
    np.testing.assert_allclose(S[np.ix_(both, both)], want, atol=1e-10)
    R = RAPBuilder(score="raw_corr").fit(X, y).score_matrix("feature_lag")
    np.testing.assert_allclose(R, np.corrcoef(X.reshape(300, -1).T), atol=1e-10)


def test_regularization_sparsifies_bands_and_bounds():
    X, y, _ = planted_windows(n=400, seed=6)
    B = RAPBuilder(keep_top=0.1).fit(X, y).prior_matrix("time").numpy()
    assert np.abs(B).max() == pytest.approx(1.0)
    assert (B != 0).sum() == pytest.approx(0.1 * B.size, abs=2)
    B = RAPBuilder(band=2, strength=0.5).fit(X, y).prior_matrix("time").numpy()
    i = np.arange(10)
    assert np.all(B[np.abs(i[:, None] - i[None, :]) > 2] == 0)
    assert np.abs(B).max() == pytest.approx(0.5)
    P = RAPBuilder(band=1).fit(X, y).prior_matrix("feature_lag").numpy()  # Δt of tokens t*F+f
    t = np.arange(40) // 4
    assert np.all(P[np.abs(t[:, None] - t[None, :]) > 1] == 0) and np.any(P[np.abs(t[:, None] - t[None, :]) == 1])


def test_full_cycle_selects_the_planted_terms():
    X, y, (p_a, p_b) = planted_windows(n=500, T=6, F=3, lag=2, seed=8)
    b = RAPBuilder(score="full_cycle", full_cycle={"Cs": 4, "cv": 2}).fit(X, y)
    w = np.abs(b.full_cycle_weights_)
    top = {tuple(ix) for ix in np.argwhere(w >= np.sort(w.ravel())[-2])}
    assert top == {(p_a, 0), (p_b, 1)}
    B = b.prior_matrix("time").numpy()
    np.fill_diagonal(B, -np.inf)
    assert {int(k) for k in np.unravel_index(B.argmax(), B.shape)} == {p_a, p_b}


# -- bad inputs ----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_before_any_work():
    X, y, _ = planted_windows(n=60, seed=9)
    b = RAPBuilder()
    with pytest.raises(ValueError, match=r"X must have shape \(samples, T, features\) \(3 dims\), got 2 dims"):
        b.fit(X[:, :, 0], y)
    with pytest.raises(ValueError, match=r"y must have one label per window of X \(60\), got 59"):
        b.fit(X, y[:-1])
    with pytest.raises(ValueError, match=r"y must contain both events \(1\) and non-events \(0\), got only \[0\]"):
        b.fit(X, np.zeros(60, dtype=int))
    with pytest.raises(ValueError, match=r"y must hold 0/1 or bool labels \(1 = event\), got values \[0, 1, 2\]"):
        b.fit(X, np.arange(60) % 3)
    Xn = X.copy()
    Xn[[4, 7], 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"X has 2 windows with NaN or inf \(rows \[4, 7\]\)"):
        b.fit(Xn, y)
    with pytest.raises(TypeError, match="X must be a numpy array or torch tensor"):
        b.fit(X.tolist(), y)
    with pytest.raises(ValueError, match=r"rows must have one id per sample \(60\), got 3"):
        b.fit(X, y, rows=[1, 2, 3])
    with pytest.raises(RuntimeError, match="not fitted"):
        b.prior_matrix()
    assert b.audit_log == []  # nothing was fit
    b.fit(torch.as_tensor(X), torch.as_tensor(y))  # tensors are accepted
    with pytest.raises(ValueError, match=r"X must have windows of shape \(T, features\) = \(10, 4\), got \(10, 3\)"):
        b.transform(X[:, :, :3])
    with pytest.raises(ValueError, match="tokens must be one of"):
        b.prior_matrix("heads")


@pytest.mark.parametrize("kwargs, err, match", [
    ({"score": "mi"}, ValueError, "score must be one of"),
    ({"score": "coactivation", "class_conditional": False}, ValueError, "class-conditional by definition"),
    ({"keep_top": 0.0}, ValueError, r"keep_top must be a fraction in \(0, 1\]"),
    ({"normalize": "l2"}, ValueError, "normalize must be one of"),
    ({"band": -1}, ValueError, "band must be a non-negative int"),
    ({"quantile_bounds": (0.9, 0.1)}, ValueError, "quantile_bounds must satisfy"),
    ({"full_cycle": ["Cs", 3]}, TypeError, "full_cycle must be a dict"),
    ({"class_conditional": "yes"}, TypeError, "class_conditional must be a bool"),
    ({"full_cycle": {"Cs": 3}}, ValueError, "only apply to score='full_cycle'"),
], ids=["score", "coact_uncond", "keep_top", "normalize", "band", "quantiles", "full_cycle", "cc_type", "fc_unused"])
def test_bad_parameters(kwargs, err, match):
    with pytest.raises(err, match=match):
        RAPBuilder(**kwargs)


def test_importing_rapkern_does_not_import_the_extras():
    """No module-level import of an optional package anywhere in rapkern.build, and rapkern does not import it.

    (Checked on the source: a subprocess that imports torch costs ~10 s of a shared CPU.)"""
    root = Path(rapkern.build.__file__).parent
    extras = {"cutlass", "pandas", "aeon", "sklearn"}
    for path in root.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports live in functions
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & extras, f"{path.name} imports {names} at module level"
    init = (root.parent / "__init__.py").read_text()
    assert "build" not in init


def test_missing_extra_names_it(monkeypatch):
    X, y, _ = planted_windows(n=60, seed=10)
    monkeypatch.setitem(sys.modules, "cutlass", None)  # makes `import cutlass` raise ImportError
    with pytest.raises(ImportError, match=r"rapkern\[build\]"):
        RAPBuilder().fit(X, y)
