"""``RAPBuilder``: from event windows to the compact priors the kernels take, fit on training rows only.

Steps (the seed's recipe): critical ranges per (feature, lag) with ``cutlass.Rectifier`` → ±1 lag-expanded
indicators → dependency scores between feature-lag tokens (``P × P``, token ``t·F + f``) or time steps
(``T × T``, the mean of each ``F × F`` block) → regularize → map to a lag, band, low-rank or dense prior.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from . import regularize as _reg
from . import scores as _scores
from . import shapes
from ._deps import version_of
from .fullcycle import full_cycle_weights, rule_prior
from .guard import AuditLog, LeakageGuard, normalize_rows, window_hashes
from .inputs import as_labels, as_windows, feature_names_or_default
from .rectify import LagRectifier

SCORES = ("coactivation", "indicator_corr", "raw_corr", "full_cycle")
TOKENS = ("time", "feature_lag")
AGGREGATES = ("mean", "maxabs")


class RAPBuilder:
    """Build a Rectified Attention Prior from windows ``X (samples, T, features)`` and event labels ``y``.

    score: ``coactivation`` (``P(i∧j active | event) − P(i∧j active | non-event)``, the default),
        ``indicator_corr`` / ``raw_corr`` (Pearson correlation of the ±1 indicators / of the raw inputs;
        ``class_conditional=True`` takes events minus non-events), or ``full_cycle`` (the polished rule's
        ``w wᵀ``, see ``fullcycle.py``; ``full_cycle={...}`` passes ``cutlass.CutlassClassifier`` parameters).
    sdfilter, snap, quantile_bounds: passed to ``cutlass.Rectifier`` unchanged.
    aggregate: how a ``F × F`` block becomes one time-step score (``mean`` or the ``maxabs`` entry).
    normalize, clip, keep_top, threshold, band, strength: regularization, see ``regularize.py``.
    """

    def __init__(self, *, score="coactivation", class_conditional=None, aggregate="mean", normalize="maxabs",
                 clip=None, keep_top=None, threshold=None, band=None, strength=1.0, sdfilter=3.0, snap=0.001,
                 quantile_bounds=None, full_cycle=None, feature_names=None):
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if class_conditional is None:
            class_conditional = score == "coactivation"
        if not isinstance(class_conditional, bool):
            raise TypeError(f"class_conditional must be a bool or None, got {type(class_conditional).__name__}")
        if score == "coactivation" and not class_conditional:
            raise ValueError("score='coactivation' is class-conditional by definition; for an unconditional "
                             "score use score='indicator_corr' with class_conditional=False")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        _reg.check_params(normalize=normalize, clip=clip, keep_top=keep_top, threshold=threshold, band=band,
                          strength=strength)
        if full_cycle is not None and not isinstance(full_cycle, dict):
            raise TypeError(f"full_cycle must be a dict of cutlass.CutlassClassifier parameters, "
                            f"got {type(full_cycle).__name__}")
        if full_cycle and score != "full_cycle":
            raise ValueError(f"full_cycle parameters only apply to score='full_cycle', got score={score!r}")
        if quantile_bounds is not None:
            qlo, qhi = quantile_bounds
            if not 0.0 <= qlo < qhi <= 1.0:
                raise ValueError(f"quantile_bounds must satisfy 0 <= low < high <= 1, got {quantile_bounds!r}")
        self._params = {
            "score": score, "class_conditional": class_conditional, "aggregate": aggregate, "normalize": normalize,
            "clip": clip, "keep_top": keep_top, "threshold": threshold, "band": band, "strength": strength,
            "sdfilter": sdfilter, "snap": snap, "quantile_bounds": quantile_bounds, "full_cycle": full_cycle or {},
        }
        self._feature_names = feature_names
        self._guard = LeakageGuard()
        self._audit = AuditLog()
        self._fitted = False

    # -- fitting ------------------------------------------------------------------------------------------
    def get_params(self) -> dict:
        return copy.deepcopy(self._params)

    def _labelled(self, X, y, rows, what):
        X = as_windows(X)
        y = as_labels(y, X.shape[0])
        ids = normalize_rows(rows, X.shape[0])
        hashes = window_hashes(X)
        self._guard.check(ids, hashes, what)
        return X, y, ids, hashes

    def fit(self, X, y, rows=None) -> "RAPBuilder":
        """Fit ranges and scores on training windows X ``(samples, T, features)``, labels y (1 = event).

        ``rows``: optional row ids for the leakage guard (window contents are fingerprinted in any case).
        """
        X, y, ids, hashes = self._labelled(X, y, rows, "fit")
        n, T, F = X.shape
        self.feature_names = feature_names_or_default(self._feature_names, F)
        p = self._params
        rect = LagRectifier(sdfilter=p["sdfilter"], snap=p["snap"], quantile_bounds=p["quantile_bounds"])
        self._rect = rect.fit(X, y, self.feature_names)
        self.T, self.F = T, F
        self._fitted = True
        self.full_cycle_ = None
        self._S = self._score(X, y)
        self._guard.record(ids, hashes)
        self._audit.add("fit", hashes=hashes, ids=ids, y=y, params=self.get_params(), shape=[n, T, F],
                        versions={"cutlass": version_of("cutlass"), "numpy": np.__version__})
        return self

    def _score(self, X, y) -> np.ndarray:
        p = self._params
        n = X.shape[0]
        if p["score"] == "raw_corr":
            return _scores.conditional_correlation(X.reshape(n, -1), y, p["class_conditional"])
        Z = self._rect.transform(X)
        if p["score"] == "coactivation":
            return _scores.coactivation(Z, y)
        if p["score"] == "indicator_corr":
            return _scores.conditional_correlation(Z, y, p["class_conditional"])
        w, clf = full_cycle_weights(Z, y, self._rect.columns, p["full_cycle"])
        self.full_cycle_ = clf
        self.full_cycle_weights_ = w.reshape(self.T, self.F)
        return rule_prior(w)

    def dependency_scores(self, X, y, rows=None, tokens="feature_lag") -> np.ndarray:
        """The raw score matrix on other labelled rows with the fitted ranges (guarded and logged like fit)."""
        self._check_fitted()
        if self._params["score"] == "full_cycle":
            raise ValueError("dependency_scores does not refit the full cycle; use a new builder")
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
        X, y, ids, hashes = self._labelled(X, y, rows, "dependency_scores")
        if X.shape[1:] != (self.T, self.F):
            raise ValueError(f"X must have windows of shape (T, features) = {(self.T, self.F)}, got {X.shape[1:]}")
        S = self._score(X, y)
        self._guard.record(ids, hashes)
        self._audit.add("dependency_scores", hashes=hashes, ids=ids, y=y, params={"tokens": tokens})
        return self._tokens(S, tokens)

    def declare_holdout(self, rows=None, X=None, name: str = "holdout") -> "RAPBuilder":
        """Declare validation/test rows (by ids and/or window contents); later labelled calls on them raise
        ``LeakageError``, and so does a holdout that overlaps rows already used."""
        if rows is None and X is None:
            raise ValueError("declare_holdout needs rows= (row ids) or X= (the held-out windows), or both")
        if X is not None:
            X = as_windows(X)
            hashes = window_hashes(X)
            n = X.shape[0]
        else:
            n = len(np.asarray(rows).reshape(-1))
            hashes = []
        ids = normalize_rows(rows, n)
        self._guard.declare(name, ids, hashes)
        self._audit.add("declare_holdout", name=name, n_rows=n, by_ids=ids is not None, by_content=X is not None)
        return self

    # -- applying the fitted ranges (no labels: not guarded) -----------------------------------------------
    def transform(self, X) -> np.ndarray:
        """±1 int8 indicators ``(samples, T, features)`` of any windows under the fitted critical ranges."""
        self._check_fitted()
        X = as_windows(X)
        if X.shape[1:] != (self.T, self.F):
            raise ValueError(f"X must have windows of shape (T, features) = {(self.T, self.F)}, got {X.shape[1:]}")
        return self._rect.transform(X).reshape(X.shape)

    @property
    def critical_ranges(self) -> dict:
        """Per feature name: ``(T, 2)`` array of [low, high] per time step (NaN = open side), from cutlass."""
        self._check_fitted()
        arr = self._rect.ranges()
        return {name: arr[:, f].copy() for f, name in enumerate(self.feature_names)}

    @property
    def rectifier(self):
        """The fitted ``cutlass.Rectifier`` (its columns are in cutlass's grouped order, named ``{f}_t{t}``)."""
        self._check_fitted()
        return self._rect.rectifier

    @property
    def audit_log(self) -> list[dict]:
        return copy.deepcopy(self._audit.entries)

    def audit_json(self) -> str:
        return self._audit.to_json()

    # -- scores → priors ------------------------------------------------------------------------------------
    def _check_fitted(self):
        if not self._fitted:
            raise RuntimeError("RAPBuilder is not fitted: call fit(X, y) on the training windows first")

    def _tokens(self, S: np.ndarray, tokens: str) -> np.ndarray:
        if tokens not in TOKENS:
            raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
        if tokens == "feature_lag":
            return S.copy()
        return _scores.to_time_tokens(S, self.T, self.F, self._params["aggregate"])

    def score_matrix(self, tokens: str = "time") -> np.ndarray:
        """The raw (unregularized) training score, ``T × T`` or ``P × P``."""
        self._check_fitted()
        return self._tokens(self._S, tokens)

    def prior_matrix(self, tokens: str = "time") -> torch.Tensor:
        """The regularized prior matrix B, float32 ``(T, T)`` or ``(P, P)``."""
        S = self.score_matrix(tokens)
        time_of = np.arange(len(S)) if tokens == "time" else np.arange(len(S)) // self.F
        p = self._params
        B = _reg.regularize(S, time_of=time_of, normalize=p["normalize"], clip=p["clip"], keep_top=p["keep_top"],
                            threshold=p["threshold"], band=p["band"], strength=p["strength"])
        return torch.as_tensor(B, dtype=torch.float32)

    def lag_prior(self, heads=None, *, max_lag=None, tokens="time"):
        """``RelativeLagPrior``: the mean of B along each diagonal (exact when B is Toeplitz)."""
        return shapes.to_lag_prior(self.prior_matrix(tokens), max_lag, heads=heads)

    def band_prior(self, width, *, heads=None, tokens="time", mask_outside=False):
        """``BandedPrior`` of half-width ``width``: B inside the band, exactly."""
        return shapes.to_band_prior(self.prior_matrix(tokens), width, heads=heads, mask_outside=mask_outside)

    def lowrank_prior(self, rank=None, energy=None, *, heads=None, tokens="time"):
        """``(LowRankPrior, energy kept)`` by truncated SVD of B."""
        return shapes.to_lowrank_prior(self.prior_matrix(tokens), rank, energy, heads=heads)

    def dense_prior(self, tokens="time", *, heads=None):
        """``DensePrior``: B itself, ``T × T`` or ``P × P``."""
        return shapes.to_dense_prior(self.prior_matrix(tokens), heads=heads)
