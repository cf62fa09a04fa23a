"""Smoke test of examples/rap_experiment.py --quick: the whole pipeline at tiny sizes, and its result files."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("cutlass")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "rap_experiment.py"


def test_quick_run_writes_results_with_provenance(tmp_path):
    spec = importlib.util.spec_from_file_location("rap_experiment_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert {".csv", ".json", ".md"} <= set(files)
    assert all(p.name.startswith("rap_experiment-quick-") for p in files.values())
    rows = list(csv.DictReader(files[".csv"].open()))
    assert [r["variant"] for r in rows] == ["none", "rap_learnable", "mode_b"]
    assert all(0.0 <= float(r["test_auc"]) <= 1.0 and int(r["steps"]) > 0 for r in rows)
    res = json.loads(files[".json"].read_text())
    meta = res["meta"]
    assert meta["machine"]["torch"] and meta["machine"]["cutlass"] and meta["config"]["max_steps"] == 6 and meta["date"]
    # the prior was fit on the training rows only, with val and test declared as holdouts first
    audit = res["priors"]["threshold_lag"]["rap"]["audit"]
    assert [e["action"] for e in audit] == ["declare_holdout", "declare_holdout", "fit"]
    assert audit[2]["n_rows"] == res["data"]["threshold_lag"]["train"][0]
    mode_b = next(r for r in res["runs"] if r["variant"] == "mode_b")
    assert mode_b["qk_corr_warm"] is not None and mode_b["qk_corr_random"] is not None
    assert "| rap_learnable |" in files[".md"].read_text()
    if importlib.util.find_spec("matplotlib"):
        assert ".png" in files


def test_experiment_metrics_match_their_definitions():
    import sys

    sys.path.insert(0, str(SCRIPT.with_suffix("")))
    import numpy as np
    import rx_metrics as M

    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = rng.integers(0, 6, size=60).astype(float)  # many ties
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert M.auc(y, s) == pytest.approx(np.mean(pairs))
    t = M.youden_threshold(y, s)
    j = lambda thr: (s[y] >= thr).mean() - (s[~y] >= thr).mean()  # noqa: E731
    assert j(t) == pytest.approx(max(j(v) for v in np.unique(s)))
    assert M.brier(np.array([1, 0]), np.array([0.75, 0.5])) == pytest.approx((0.0625 + 0.25) / 2)
    assert M.f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
