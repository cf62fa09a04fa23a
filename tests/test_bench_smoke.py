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


def _run_module(module: str, out: Path, *args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--threads", "1", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for f in glob.glob(str(out / "*.csv")) for r in csv.DictReader(open(f))]
    assert rows, f"{module} --smoke wrote no CSV rows"
    for r in rows:  # no provider may fail silently
        assert r["status"] == "ok" or r["error"], r
    return rows


def _cpp_available() -> bool:
    from rapkern import dispatch

    try:
        return dispatch.get("cpp").availability() is None
    except ValueError:
        return False


@pytest.mark.slow
def test_seed_windows_smoke_runs_every_section(tmp_path):
    rows = _run_module("bench.seed_windows", tmp_path)
    sections = {r["section"] for r in rows}
    assert sections == {"seed_lag", "seed_banded", "seed_lowrank", "long_lag_train", "long_lag_fwd", "long_banded",
                        "long_lowrank"}, sections
    for prov in ["rapkern-torch", "rapkern-auto"] + (["rapkern-cpp"] if _cpp_available() else []):
        mine = [r for r in rows if r["provider"] == prov]
        assert mine and all(r["status"] == "ok" for r in mine), mine
        errs = [float(r["max_err"]) for r in mine]  # every smoke row checks against the float64 reference
        assert len(errs) == len(mine) and max(errs) < 1e-4, (prov, errs)
    # the learnable α and table rows: fwd+bwd with prior gradients, against every baseline of the section
    lag_bwd = {r["provider"] for r in rows if r["section"] == "seed_lag" and r["mode"] == "fwd+bwd"
               and r["status"] == "ok"}
    assert {"rapkern-torch", "eager", "sdpa_dense", "sdpa_nobias"} <= lag_bwd, lag_bwd
    assert all(r["learn_alpha"] == "True" for r in rows if r["section"] == "seed_lag" and r["mode"] == "fwd+bwd")
    md = glob.glob(str(tmp_path / "*-targets.md"))
    assert len(md) == 1
    text = open(md[0]).read()
    for heading in ("Seed windows, lag prior", "Long lag prior", "Banded, mask_outside=True", "Low-rank r=16"):
        assert heading in text, heading
    assert "| rapkern-torch |" in text and ("pass" in text or "MISS" in text)


@pytest.mark.slow
def test_overhead_smoke_times_every_provider(tmp_path):
    rows = _run_module("bench.overhead", tmp_path)
    by = {(r["provider"], r["prior"], r["mode"]): r for r in rows}
    for prov in ("sdpa", "rapkern-torch", "rapkern-auto"):
        for prior in ("none", "lag"):
            for mode in ("fwd", "fwd_grad", "fwd+bwd"):
                r = by[(prov, prior, mode)]
                assert r["status"] == "ok" and float(r["time_us"]) > 0, r
    raw = [r for r in rows if r["provider"] == "raw_op"]
    assert raw and all(r["status"] == ("ok" if _cpp_available() else "unavailable") for r in raw), raw
    text = open(glob.glob(str(tmp_path / "*-targets.md"))[0]).read()
    assert "overhead" in text and "| lag | fwd | rapkern-auto |" in text


def test_seed_windows_report_ratios_and_verdicts():
    """The targets report divides by the right baseline and says pass / MISS at the issue's limits."""
    from bench import seed_windows as S

    base = {"section": "seed_lag", "prior_spec": "lag", "prior": "lag", "causal": False, "B": 32, "H": 4, "D": 32,
            "L": 64, "W": 16, "mode": "fwd", "status": "ok"}
    times = {"eager": 10.0, "sdpa_dense": 8.0, "sdpa_nobias": 5.0, "rapkern-a": 9.0, "rapkern-b": 6.0}
    rows = [{**base, "provider": p, "time_ms": t} for p, t in times.items()]
    rows.append({**base, "L": 8192, "B": 1, "H": 8, "D": 64, "W": 128, "section": "long_lag_train", "mode": "fwd+bwd",
                 "provider": "sdpa_nobias", "time_ms": 100.0, "peak_mem_mb": 50.0})
    rows.append({**rows[-1], "provider": "rapkern-a", "time_ms": 190.0, "peak_mem_mb": 600.0})
    text = S.report(rows, {}, "full", 2)
    lines = {ln.split("|")[3].strip() + ln.split("|")[2].strip(): ln for ln in text.splitlines()
             if ln.startswith("| B=")}
    a, b = lines["rapkern-afwd"], lines["rapkern-bfwd"]
    assert "1.12×" in a and "| MISS |" in a and "1.80×" in a and "goal MISS" in a  # 9/8, 9/5
    assert "0.75×" in b and "| pass |" in b and "1.20×" in b and "goal pass" in b  # 6/8, 6/5 (goal ≤ 1.2)
    long = lines["rapkern-afwd+bwd"]
    assert "1.90×" in long and "| pass | MISS |" in long  # time within 2x, memory over 512 MB


def test_overhead_report_subtracts_the_raw_op_only_for_the_cpp_path():
    from bench import overhead as O

    base = {"prior": "lag", "status": "ok"}
    rows = [{**base, "mode": "fwd", "provider": "raw_op", "time_us": 10.0},
            {**base, "mode": "fwd", "provider": "sdpa", "time_us": 5.0},
            {**base, "mode": "fwd", "provider": "rapkern-cpp", "time_us": 30.0},
            {**base, "mode": "fwd", "provider": "rapkern-auto", "time_us": 40.0, "auto_backend": "cpp"},
            {**base, "mode": "fwd", "provider": "rapkern-torch", "time_us": 90.0},
            {**base, "mode": "fwd_grad", "provider": "rapkern-cpp", "time_us": 36.0}]  # vs the raw forward
    text = O.report(rows, {}, 1, "full")
    line = {ln.split("|")[3].strip() + ln.split("|")[2].strip(): ln for ln in text.splitlines()
            if ln.startswith("| lag |")}
    assert "| 20.0 | pass |" in line["rapkern-cppfwd"] and "+25.0" in line["rapkern-cppfwd"]
    assert "| 30.0 | MISS |" in line["rapkern-autofwd"]
    assert "| 26.0 | MISS |" in line["rapkern-cppfwd_grad"]
    assert "n/a (runs torch)" in line["rapkern-torchfwd"]
