"""Leakage guard and audit log of rapkern.build.RAPBuilder: nothing is fit on held-out rows."""

import json

import numpy as np
import pytest

pytest.importorskip("cutlass")

from test_build_data import planted_windows  # noqa: E402

from rapkern.build import LeakageError, RAPBuilder  # noqa: E402


@pytest.fixture
def split():
    X, y, _ = planted_windows(n=300, seed=11)
    ids = np.arange(1000, 1300)
    return (X[:200], y[:200], ids[:200]), (X[200:], y[200:], ids[200:])


def test_overlap_by_row_id_raises_and_names_the_count(split):
    (Xtr, ytr, rtr), (Xte, yte, rte) = split
    b = RAPBuilder().declare_holdout(rows=rte, name="test")
    rows = rtr.copy()
    rows[:3] = rte[:3]  # three training rows carry test ids
    with pytest.raises(LeakageError, match=r"fit: 3 of 200 rows overlap the declared holdout 'test'"):
        b.fit(Xtr, ytr, rows=rows)
    b.fit(Xtr, ytr, rows=rtr)  # clean ids pass


def test_overlap_by_content_is_caught_without_ids(split):
    (Xtr, ytr, _), (Xte, yte, _) = split
    b = RAPBuilder().declare_holdout(X=Xte, name="val")
    X = np.concatenate([Xtr, Xte[:5]])
    y = np.concatenate([ytr, yte[:5]])
    with pytest.raises(LeakageError, match=r"5 of 205 rows overlap the declared holdout 'val'"):
        b.fit(X, y)
    with pytest.raises(LeakageError, match=r"5 of 205 rows"):  # fresh ids do not hide the content
        b.fit(X, y, rows=np.arange(205) + 10**6)
    assert b.audit_log[-1]["action"] == "declare_holdout"  # the refused fits left no trace of fitting
    with pytest.raises(RuntimeError, match="not fitted"):
        b.prior_matrix()


def test_holdout_declared_after_fit_is_checked_against_the_rows_seen(split):
    (Xtr, ytr, rtr), (Xte, _, rte) = split
    b = RAPBuilder().fit(Xtr, ytr, rows=rtr)
    with pytest.raises(LeakageError, match=r"declare_holdout\('test'\): 4 of 4 rows were already used"):
        b.declare_holdout(rows=rtr[:4], name="test")
    with pytest.raises(LeakageError, match=r"2 of 3 rows were already used"):
        b.declare_holdout(X=np.concatenate([Xtr[:2], Xte[:1]]))
    b.declare_holdout(rows=rte, X=Xte, name="test")


def test_scoring_on_held_out_rows_raises(split):
    (Xtr, ytr, rtr), (Xte, yte, rte) = split
    b = RAPBuilder().declare_holdout(rows=rte, X=Xte, name="test").fit(Xtr, ytr, rows=rtr)
    with pytest.raises(LeakageError, match=r"dependency_scores: 100 of 100 rows overlap the declared holdout 'test'"):
        b.dependency_scores(Xte, yte)
    S = b.dependency_scores(Xtr[:100], ytr[:100], rows=rtr[:100])
    assert S.shape == (40, 40)
    b.transform(Xte)  # applying the fitted ranges to held-out windows uses no labels: allowed


def test_audit_log_records_each_fit_with_rows_and_parameters(split):
    (Xtr, ytr, rtr), (Xte, _, rte) = split
    b = RAPBuilder(keep_top=0.3, sdfilter=2.5).declare_holdout(rows=rte, X=Xte, name="test")
    b.fit(Xtr, ytr, rows=rtr)
    b.fit(Xtr[:150], ytr[:150])
    log = b.audit_log
    assert [e["action"] for e in log] == ["declare_holdout", "fit", "fit"]
    fit1, fit2 = log[1], log[2]
    assert fit1["n_rows"] == 200 and fit1["n_events"] == int(ytr.sum()) and fit1["row_ids_given"]
    assert fit2["n_rows"] == 150 and not fit2["row_ids_given"]
    assert fit1["rows_digest"] != fit2["rows_digest"]
    assert fit1["params"]["keep_top"] == 0.3 and fit1["params"]["sdfilter"] == 2.5
    assert fit1["versions"]["cutlass"]
    assert fit1["shape"] == [200, 10, 4]
    # the same rows give the same digest whatever their order: it identifies the row set
    b2 = RAPBuilder().fit(Xtr[::-1], ytr[::-1])
    assert b2.audit_log[0]["rows_digest"] == fit1["rows_digest"]
    assert json.loads(b.audit_json())["entries"][1]["n_rows"] == 200


def test_declare_holdout_needs_rows_or_windows():
    with pytest.raises(ValueError, match="declare_holdout needs rows="):
        RAPBuilder().declare_holdout()
    with pytest.raises(ValueError, match=r"rows must have one id per sample \(2\), got 3"):
        RAPBuilder().declare_holdout(rows=[1, 2, 3], X=np.zeros((2, 3, 1)))
