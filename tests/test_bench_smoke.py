"""The benchmark harness and every provider still run (`python -m bench --smoke`): not a measurement."""

import csv
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_runs_every_provider(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for f in glob.glob(str(tmp_path / "*.csv")) for r in csv.DictReader(open(f))]
    assert rows, "smoke wrote no CSV rows"
    by_provider = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    torch_rows = by_provider.get("rapkern-torch", [])
    assert torch_rows and all(r["status"] == "ok" for r in torch_rows), torch_rows
    # no provider may fail silently: every non-ok row carries its reason
    for r in rows:
        assert r["status"] == "ok" or r["error"], r
    # the smoke compares rapkern's output with the float64 reference
    errs = [float(r["max_err"]) for r in torch_rows if r.get("max_err")]
    assert errs and max(errs) < 1e-4, errs
