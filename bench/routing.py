"""LDA routing benchmark: rapkern backends vs eager (``reference_lda_route`` in the input dtype).

    python -m bench.routing                                   # default grid for this device
    python -m bench.routing --queries 4096,16384 --clusters 1024 --top-k 0,8 --modes fwd,fwd+bwd

``--top-k 0`` is the dense softmax over all clusters. Shapes: q (G, N, d), centroids (G, n, d),
answers (G, n, e). Writes ``bench/results/routing-<stamp>.csv`` (+ ``.json``), a table and plots vs N.

Issue 11's targets, as a new user would try them (one run; compare ratios within it):

    nice python -m bench.routing --preset issue11            # CPU: fp32, 2 threads; GPU: bf16

N = 65,536 queries, n = 4,096 clusters, d = e = 384, forward, dense and top-k (k = 8), against
``eager_plain`` (``F.normalize`` + matmul + softmax + matmul; for top-k ``topk`` + softmax + gather), and
on CPU a target table ``routing-<stamp>-targets.md``: dense >= 1.2x eager (GPU: >= 1.5x and >= 300 TFLOP/s
counting 2·N·n·(d+e)), top-k at least as fast as eager top-k (GPU: no slower than dense) and faster than
dense, and peak memory with no N x n term (within 1.5x the inputs' and output's size + 64 MB).
"""

from __future__ import annotations

import argparse
import itertools

from . import harness
from .harness import Job

RUNNER = "bench.routing:measure_job"
TABLE_KEYS = ["top_k", "dtype", "G", "n", "d", "e", "mode", "N"]
PLOT_KEYS = ["top_k", "dtype", "G", "n", "d", "e", "mode"]


def eager_plain(x: dict):
    """What a user writes without rapkern: the whole (N, n) score matrix, then softmax or topk + gather."""
    import torch
    import torch.nn.functional as F

    q, c, a, k, tau = x["q"], x["c"], x["a"], x["top_k"], x["tau"]

    def dense():
        s = torch.matmul(F.normalize(q, dim=-1), F.normalize(c, dim=-1).transpose(-1, -2)) / tau
        return torch.matmul(torch.softmax(s, dim=-1), a)

    def topk():
        s = torch.matmul(F.normalize(q, dim=-1), F.normalize(c, dim=-1).transpose(-1, -2)) / tau
        v, i = s.topk(k, dim=-1)
        flat = i + (torch.arange(i.shape[0], device=i.device) * a.shape[1]).view(-1, 1, 1)
        sel = a.reshape(-1, a.shape[-1])[flat]  # (G, N, k, e): what a[idx] gives for one table
        return (torch.softmax(v, dim=-1).unsqueeze(-1) * sel).sum(-2)

    return dense if k is None else topk


def measure_job(params: dict, opts: dict) -> dict:
    from . import providers as P

    device = opts["device"]
    x = P.make_route_inputs(params, device)
    if params["provider"] == "eager_plain":
        forward = eager_plain(x)
    else:
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

    names = providers or P.route_providers() + ["eager_plain"]
    return [Job(RUNNER, {**c, "provider": p}, timeout_s) for c in configs for p in names]


def run(configs, *, device, providers=None, out_dir=None, name="routing", opts=None, budget_s=None,
        isolate=None, title="routing", plots=True):
    from . import providers as P

    return harness.run_suite(make_jobs(configs, providers), device=device, name=name, table_keys=TABLE_KEYS,
                             plot_keys=PLOT_KEYS, title=title, out_dir=out_dir, opts=opts, budget_s=budget_s,
                             isolate=isolate, plots=plots, x="N", precheck=P.precheck)


ISSUE11 = dict(N=65536, n=4096, d=384, e=384, G=1)


def issue11(device: str, out_dir=None, threads: int = 2):
    """Issue 11's shape: dense and top-k (k = 8) forward vs eager_plain, then the target table."""
    from . import providers as P

    gpu = device == "cuda"
    configs = grid([ISSUE11["N"]], clusters=(ISSUE11["n"],), top_ks=(0, 8), modes=("fwd",),
                   dtypes=("bfloat16",) if gpu else ("float32",), G=ISSUE11["G"], d=ISSUE11["d"], e=ISSUE11["e"])
    providers = ["rapkern-torch", "eager_plain"] + (["rapkern-triton_routing"] if gpu else [])
    providers = [p for p in providers if p in P.route_providers() + ["eager_plain"]]
    opts = {"timing": {"cpu_min_reps": 3, "cpu_min_time_s": 0.0}} if not gpu else {}
    if not gpu:
        opts["threads"] = threads
    rows, csv_path = run(configs, device=device, providers=providers, out_dir=out_dir, name="routing-issue11",
                         opts=opts, isolate=not gpu, title=f"routing, issue 11 shape ({device})", plots=False)
    text = targets(rows, gpu)
    path = csv_path.with_name(csv_path.stem + "-targets.md")
    path.write_text(text)
    print(text)
    print(f"targets: {path}")
    return rows, path


def targets(rows: list[dict], gpu: bool) -> str:
    """Markdown: each of issue 11's targets with the measured ratio and met / not met."""
    t = {}
    for r in rows:
        if r.get("status") == "ok":
            t[(r["provider"], int(r.get("top_k") or 0))] = r
    ours = "rapkern-triton_routing" if gpu and ("rapkern-triton_routing", 0) in t else "rapkern-torch"
    lines = ["| target | measured | met |", "| --- | --- | --- |"]

    def line(name, value, ok):
        lines.append(f"| {name} | {value} | {'yes' if ok else 'no'} |")

    def ms(p, k):
        return t[(p, k)]["time_ms"] if (p, k) in t else None

    d, e, dk, ek = ms(ours, 0), ms("eager_plain", 0), ms(ours, 8), ms("eager_plain", 8)
    want = 1.5 if gpu else 1.2
    if d and e:
        line(f"dense ≥ {want}× eager ({ours})", f"{e / d:.2f}× ({d:.0f} ms vs {e:.0f} ms)", e / d >= want)
    if gpu and d:
        tf = t[(ours, 0)]["tflops"]
        line("dense ≥ 300 TFLOP/s (2·N·n·(d+e))", f"{tf:.0f} TFLOP/s", tf >= 300)
    if dk and ek and not gpu:
        line("top-k (k=8) at least as fast as eager top-k", f"{ek / dk:.2f}× ({dk:.0f} ms vs {ek:.0f} ms)", dk <= ek)
    if dk and d:
        line("top-k faster than dense" if not gpu else "top-k no slower than dense",
             f"{d / dk:.2f}× ({dk:.0f} ms vs {d:.0f} ms)", dk < d if not gpu else dk <= d)
    # "no N×n term": peak within 1.5x the inputs' and output's O(N·(d+e)) size plus a 64 MB tile budget
    esize = 2 if gpu else 4
    nxn_mb = ISSUE11["N"] * ISSUE11["n"] * esize / 2**20
    lin_mb = 1.5 * ISSUE11["N"] * (ISSUE11["d"] + ISSUE11["e"]) * esize / 2**20 + 64
    for k in (0, 8):
        if (ours, k) in t:
            mb = t[(ours, k)]["peak_mem_mb"]
            eager_mb = t.get(("eager_plain", k), {}).get("peak_mem_mb", float("nan"))
            line(f"{'dense' if k == 0 else 'top-k'} peak memory without an N×n term (≤ {lin_mb:.0f} MB; "
                 f"one N×n matrix is {nxn_mb:.0f} MB)", f"{mb:.0f} MB (eager: {eager_mb:.0f} MB)", mb <= lin_mb)
    load = ", ".join(f"{r.get('load_avg')}" for r in rows[:1])
    return "\n".join([f"# routing targets (issue 11), {'GPU' if gpu else 'CPU'}", "",
                      f"load average at the first job: {load}", ""] + lines) + "\n"


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
    ap.add_argument("--preset", default="", choices=["", "issue11"], help="issue11: the issue's shape and targets")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for --preset issue11")
    a = ap.parse_args(argv)
    device = harness.detect_device() if a.device == "auto" else a.device
    if a.preset == "issue11":
        issue11(device, out_dir=a.out, threads=a.threads)
        return
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
