"""The main job: ``make bench`` = ``python -m bench``.

Detects the device and runs

* on a CPU-only machine, a quick suite (about 4 minutes on 2 cores, capped by ``--budget-s``): the torch
  backend against eager, SDPA (dense bias / no bias) and FlexAttention, plus routing, eager vs rapkern;
* on a GPU, the full suite: every provider over priors x causal x modes x L, then routing.

``python -m bench --smoke`` runs a tiny config of every provider in-process (well under a minute) into a
temporary folder: a check that the harness and every provider still work, not a measurement.
Prints the tables and where the CSV files and plots are (bench/results/ unless ``--out``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter

from . import attention, harness, routing
from . import providers as P


def quick_cpu(out_dir, budget_s):
    """~40 jobs: lag sweep (the torch backend vs every baseline), causal fwd+bwd, band, low-rank, routing."""
    cfg = dict(B=1, H=8, D=64, dtype="float32")
    core = ["eager", "sdpa_dense", "sdpa_nobias", "flex"]
    rk = [f"rapkern-{b.name}" for b in P.rapkern_backends()]  # those without a CPU kernel say so
    t0 = time.monotonic()
    sets = [
        ([attention.config("lag", L=L, **cfg) for L in (1024, 2048, 4096)], rk + core),
        ([attention.config("lag", L=2048, causal=True, mode="fwd+bwd", learnable=True, **cfg)], rk + core),
        ([attention.config("banded_masked", L=4096, w=256, **cfg)], rk + core),
        ([attention.config("lowrank", L=2048, r=16, **cfg)], rk + ["eager", "sdpa_lowrank_concat", "sdpa_nobias"]),
    ]
    jobs = [j for configs, provs in sets for j in attention.make_jobs(configs, provs, timeout_s=300)]
    opts = {"timing": {"cpu_min_reps": 1, "cpu_min_time_s": 1.0}}  # slow calls: warm-up + one timed call
    rows, csv_a = harness.run_suite(jobs, device="cpu", name="quick-attention", table_keys=attention.TABLE_KEYS,
                                    plot_keys=attention.PLOT_KEYS, title="quick CPU suite: attention",
                                    out_dir=out_dir, budget_s=budget_s * 0.8, precheck=P.precheck, opts=opts)
    left = max(budget_s - (time.monotonic() - t0), 20)
    rrows, csv_r = routing.run(routing.grid([1024, 4096], clusters=(1024,), top_ks=(0, 8), modes=("fwd", "fwd+bwd")),
                               device="cpu", out_dir=out_dir, name="quick-routing", budget_s=left,
                               title="quick CPU suite: routing", opts=opts)
    return rows + rrows, [csv_a, csv_r]


def full_gpu(out_dir, budget_s):
    lengths = (1024, 2048, 4096, 8192, 16384)
    configs = attention.grid(["lag", "banded_masked", "lowrank", "dense"], lengths, modes=("fwd", "fwd+bwd"),
                             causal=(False, True), head_dims=(128,), dtypes=("bfloat16",), learnable=True, B=2, H=16)
    configs += attention.grid(["lag", "banded"], lengths, modes=("fwd", "bwd"), head_dims=(64,), B=2, H=16,
                              dtypes=("float16",))
    t0 = time.monotonic()
    rows, csv_a = attention.run(configs, device="cuda", out_dir=out_dir, name="full-attention",
                                budget_s=budget_s and budget_s * 0.9, title="full GPU suite: attention",
                                opts={"flex_dynamic": None})
    left = budget_s - (time.monotonic() - t0) if budget_s else None
    rrows, csv_r = routing.run(routing.grid([4096, 16384, 65536], clusters=(1024, 8192), top_ks=(0, 8),
                                            modes=("fwd", "fwd+bwd"), dtypes=("bfloat16",)),
                               device="cuda", out_dir=out_dir, name="full-routing", budget_s=left,
                               title="full GPU suite: routing")
    return rows + rrows, [csv_a, csv_r]


def smoke(device, out_dir):
    """Every provider once on a tiny config, in-process, with max |out - float64 reference| per run."""
    cfg = dict(B=1, H=2, D=16, dtype="float32", W=8, w=8, r=4)
    rk = [f"rapkern-{b.name}" for b in P.rapkern_backends()]
    configs = [attention.config("lag", L=128, **cfg), attention.config("lag", L=128, mode="fwd+bwd", causal=True,
                                                                       learnable=True, **cfg)]
    jobs = attention.make_jobs(configs)
    jobs += attention.make_jobs([attention.config("lowrank", L=128, **cfg)], rk + ["sdpa_lowrank_concat"])
    jobs += attention.make_jobs([attention.config("banded_masked", L=128, causal=True, **cfg)], rk + ["flex"])
    opts = {"check": True, "timing": {"cpu_min_reps": 1, "cpu_max_reps": 2, "cpu_min_time_s": 0.0,
                                      "gpu_rep_ms": 10, "gpu_warmup_ms": 5}}
    rows, csv_a = harness.run_suite(jobs, device=device, name="smoke-attention", table_keys=attention.TABLE_KEYS,
                                    plot_keys=attention.PLOT_KEYS, title="smoke: attention", out_dir=out_dir,
                                    opts=opts, isolate=False, precheck=P.precheck)
    rjobs = routing.make_jobs(routing.grid([64], clusters=(32,), top_ks=(0, 4), modes=("fwd", "fwd+bwd"), G=2,
                                           d=16, e=8))
    rrows, csv_r = harness.run_suite(rjobs, device=device, name="smoke-routing", table_keys=routing.TABLE_KEYS,
                                     plot_keys=routing.PLOT_KEYS, title="smoke: routing", out_dir=out_dir,
                                     opts=opts, isolate=False, plots=False, x="N", precheck=P.precheck)
    return rows + rrows, [csv_a, csv_r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--smoke", action="store_true", help="tiny config of every provider, in-process, < 60 s")
    ap.add_argument("--quick", action="store_true", help="the CPU quick suite even on a GPU machine")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="jobs not started by then are recorded as skipped (default: 240 quick, none full)")
    ap.add_argument("--out", default=None, help="output folder (default bench/results; smoke: a temp folder)")
    a = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        print(f"note: {e.name} missing (plots or progress bar disabled); `make setup` installs it", file=sys.stderr)
    device = harness.detect_device() if a.device == "auto" else a.device
    t0 = time.monotonic()
    if a.smoke:
        out = a.out or tempfile.mkdtemp(prefix="rapkern-smoke-")
        rows, csvs = smoke(device, out)
    elif device == "cpu" or a.quick:
        if device != "cpu":
            print("quick suite on CPU tensors (asked with --quick)", file=sys.stderr)
        rows, csvs = quick_cpu(a.out, a.budget_s or 240)
    else:
        rows, csvs = full_gpu(a.out, a.budget_s)
    counts = Counter(r.get("status") for r in rows)
    # sdpa_nobias ignores the prior by design: it is the speed floor, not the same function
    errs = [(r["provider"], r.get("prior_spec"), r["max_err"]) for r in rows
            if r.get("max_err") is not None and r["provider"] != "sdpa_nobias"]
    if errs:
        worst = max(errs, key=lambda t: t[2])
        print(f"\nmax |out - float64 reference| over {len(errs)} runs with the prior: {worst[2]:.2e} "
              f"({worst[0]}, {worst[1]})")
    print(f"\n{len(rows)} measurements in {time.monotonic() - t0:.0f} s on {device}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print("CSV files (plots and .json machine description beside them):")
    for c in csvs:
        print(f"  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
