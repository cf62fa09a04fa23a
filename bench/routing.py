"""LDA routing benchmark: rapkern backends vs eager (``reference_lda_route`` in the input dtype).

    python -m bench.routing                                   # default grid for this device
    python -m bench.routing --queries 4096,16384 --clusters 1024 --top-k 0,8 --modes fwd,fwd+bwd

``--top-k 0`` is the dense softmax over all clusters. Shapes: q (G, N, d), centroids (G, n, d),
answers (G, n, e). Writes ``bench/results/routing-<stamp>.csv`` (+ ``.json``), a table and plots vs N.
"""

from __future__ import annotations

import argparse
import itertools

from . import harness
from .harness import Job

RUNNER = "bench.routing:measure_job"
TABLE_KEYS = ["top_k", "dtype", "G", "n", "d", "e", "mode", "N"]
PLOT_KEYS = ["top_k", "dtype", "G", "n", "d", "e", "mode"]


def measure_job(params: dict, opts: dict) -> dict:
    from . import providers as P

    device = opts["device"]
    x = P.make_route_inputs(params, device)
    forward = P.build_route(params["provider"], x, device)
    fn = P.with_mode(forward, x, params["mode"])
    m = harness.measure(fn, device, grad_to_none=x["leaves"], **opts.get("timing", {}))
    flops = harness.route_flops(params["G"], params["N"], params["n"], params["d"], params["e"],
                                top_k=params.get("top_k") or None, mode=params["mode"])
    return {"time_ms": m.median_ms, "time_ms_p20": m.p20_ms, "time_ms_p80": m.p80_ms,
            "reps": len(m.times_ms) or "do_bench", "gflop": flops / 1e9,
            "tflops": flops / (m.median_ms * 1e-3) / 1e12, "peak_mem_mb": m.peak_mem_mb, "warmup_s": m.warmup_s}


def grid(queries, *, clusters=(1024,), top_ks=(0, 8), modes=("fwd",), dtypes=("float32",), G=4, d=64, e=64):
    return [{"op": "routing", "G": G, "N": N, "n": n, "d": d, "e": e, "top_k": k, "dtype": dt, "mode": m}
            for k, dt, n, m, N in itertools.product(top_ks, dtypes, clusters, modes, queries)]


def make_jobs(configs, providers=None, timeout_s=600.0):
    from . import providers as P

    names = providers or P.route_providers()
    return [Job(RUNNER, {**c, "provider": p}, timeout_s) for c in configs for p in names]


def run(configs, *, device, providers=None, out_dir=None, name="routing", opts=None, budget_s=None,
        isolate=None, title="routing", plots=True):
    from . import providers as P

    return harness.run_suite(make_jobs(configs, providers), device=device, name=name, table_keys=TABLE_KEYS,
                             plot_keys=PLOT_KEYS, title=title, out_dir=out_dir, opts=opts, budget_s=budget_s,
                             isolate=isolate, plots=plots, x="N", precheck=P.precheck)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--providers", default="")
    ap.add_argument("--queries", default="", help="N values")
    ap.add_argument("--clusters", default="1024", help="n values")
    ap.add_argument("--top-k", default="0,8", help="0 = dense")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--dtypes", default="")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--e", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    device = harness.detect_device() if a.device == "auto" else a.device
    gpu = device == "cuda"
    ints = lambda s: [int(v) for v in s.split(",") if v.strip()]  # noqa: E731
    queries = ints(a.queries) or ([4096, 16384, 65536] if gpu else [1024, 4096])
    dtypes = [v for v in a.dtypes.split(",") if v] or (["bfloat16"] if gpu else ["float32"])
    configs = grid(queries, clusters=ints(a.clusters), top_ks=ints(a.top_k), modes=a.modes.split(","),
                   dtypes=dtypes, G=a.G, d=a.d, e=a.e)
    run(configs, device=device, providers=[p for p in a.providers.split(",") if p] or None, out_dir=a.out,
        budget_s=a.budget_s, plots=not a.no_plots)


if __name__ == "__main__":
    main()
