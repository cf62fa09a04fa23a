"""Per-call cost of ``rapkern.attention`` on a tiny input (issue 10: validation + dispatch + autograd ≤ 25 µs).

    python -m bench.overhead              # ~1 min: every provider x {no prior, lag prior} x {fwd, fwd_grad, fwd+bwd}
    python -m bench.overhead --smoke      # in-process, few iterations: a plumbing check, not a measurement

Input: B=1, H=2, L=8, D=16, fp32, 1 thread (``--threads``), non-causal; the lag prior has W=4 and a per-head
α. Modes: ``fwd`` (no input requires grad), ``fwd_grad`` (q, k, v and, with the prior, the table and α
require grad: the forward records the graph; no backward), ``fwd+bwd`` (forward and ``out.backward``).

Providers: ``sdpa`` (SDPA without bias: the floor), every ``rapkern-<backend>`` and ``rapkern-auto``
(``rapkern.attention(..., backend=...)``), and ``raw_op``: ``torch.ops.rapkern.attention_fwd`` (and
``attention_bwd`` in fwd+bwd) on pre-converted arguments, when the C++ extension is loaded. One call is
timed as a loop of n calls (n sized to ~20 ms), median over repeats, divided by n.

overhead = rapkern − raw op in the same mode (``fwd_grad`` against the raw forward: the op has no autograd,
so validation, dispatch and the autograd entry are all in the difference), for ``rapkern-cpp`` and for
``rapkern-auto`` when it picks cpp (the row's ``auto_backend``). Target ≤ 25 µs.
Writes ``overhead-<stamp>.csv`` (+ ``.json``) and ``overhead-<stamp>-targets.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from . import harness
from .harness import Job, Unavailable

RUNNER = "bench.overhead:measure_job"
SHAPE = {"B": 1, "H": 2, "L": 8, "D": 16, "W": 4, "dtype": "float32", "causal": False}
MODES = ("fwd", "fwd_grad", "fwd+bwd")
PRIORS = ("none", "lag")
TARGET_US = 25.0
TABLE_KEYS = ["prior", "mode"]
REP_S = 0.02  # one timed repeat: a loop of calls lasting about this long
PAIRED_REPS = 25  # rounds of (provider loop, raw-op loop) for the paired overhead


def providers() -> list[str]:
    from . import providers as P

    return ["sdpa"] + P.rapkern_providers(include_auto=True) + ["raw_op"]


def raw_op_reason() -> str | None:
    """Why ``torch.ops.rapkern.attention_fwd`` cannot be timed here (None when it can)."""
    import importlib

    import torch

    from rapkern import dispatch

    try:  # the cpp backend loads the extension (lazily or at import); asking it is enough
        dispatch.get("cpp").availability()
    except ValueError:
        pass
    try:
        importlib.import_module("rapkern._C")
    except Exception:  # noqa: BLE001  (not built / not a Python module: the op check below says it)
        pass
    try:
        torch.ops.rapkern.attention_fwd  # noqa: B018
    except (AttributeError, RuntimeError) as e:
        return f"torch.ops.rapkern.attention_fwd not registered (rapkern._C not loaded): {str(e)[:120]}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rapkern::attention_fwd", "CPU"):
        return "rapkern::attention_fwd has no CPU kernel registered"
    return None


def make_inputs(params: dict) -> dict:
    import torch

    from rapkern.priors import RelativeLagPrior

    torch.manual_seed(0)
    b, h, L, d, w = (params[k] for k in ("B", "H", "L", "D", "W"))
    grad = params["mode"] != "fwd"
    q, k, v = (torch.randn(b, h, L, d).requires_grad_(grad) for _ in range(3))
    x = {"q": q, "k": k, "v": v, "causal": params["causal"], "scale": 1.0 / math.sqrt(d), "prior_tensors": [],
         "prior": None, "alpha": 1.0}  # no prior: alpha left at its default, as a user calls it
    if params["prior"] == "lag":
        table = (torch.randn(h, 2 * w + 1) * 0.5).requires_grad_(grad)
        x.update(prior=RelativeLagPrior(table), prior_tensors=[table],
                 alpha=(torch.rand(h) + 0.5).requires_grad_(grad))
    x["leaves"] = [t for t in (q, k, v, *x["prior_tensors"], x["alpha"]) if getattr(t, "requires_grad", False)]
    return x


def _raw_op(x: dict, mode: str):
    """The C++ ops on arguments converted once, outside the timed loop (what the Python layer adds is the rest)."""
    import torch

    why = raw_op_reason()
    if why:
        raise Unavailable(why)
    q, k, v = (t.detach().contiguous() for t in (x["q"], x["k"], x["v"]))
    lag = x["prior"] is not None
    alpha = x["alpha"].detach().float().contiguous() if lag else None
    prior0 = x["prior_tensors"][0].detach().float().unsqueeze(0) if lag else None  # (Bp=1, Hp=H, 2W+1)
    kind = 1 if lag else 0
    common = (None, alpha, 1.0, kind, prior0, None, False, x["causal"], x["scale"], 0.0, 0)
    fwd_op, bwd_op = torch.ops.rapkern.attention_fwd, torch.ops.rapkern.attention_bwd
    if mode != "fwd+bwd":
        return lambda: fwd_op(q, k, v, *common)
    dout = torch.randn_like(q)

    def fwd_bwd():
        out, lse = fwd_op(q, k, v, *common)
        return bwd_op(dout, None, q, k, v, out, lse, *common, True, lag, lag)

    return fwd_bwd


def _call(provider: str, x: dict, mode: str):
    """One call of ``provider`` in ``mode``, as a user makes it."""
    import torch
    import torch.nn.functional as F

    from . import providers as P

    if provider == "raw_op":
        return _raw_op(x, mode)
    if provider == "sdpa":
        forward = lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], scale=x["scale"])  # noqa: E731
    elif provider.startswith("rapkern-"):  # rapkern.attention(q, k, v, prior=, alpha=, scale=, backend=)
        forward = P.build_attention(provider, x, "cpu")  # raises Unavailable with the backend's reasons
    else:
        raise ValueError(f"unknown overhead provider {provider!r}; known: {providers()}")
    if mode != "fwd+bwd":
        return forward
    dout = torch.randn_like(x["q"])

    def fwd_bwd():
        forward().backward(dout)

    return fwd_bwd


def measure_job(params: dict, opts: dict) -> dict:
    import torch

    from . import providers as P

    x = make_inputs(params)
    call = _call(params["provider"], x, params["mode"])
    call()  # warm-up (first-call caches, lazy loads)
    t0 = time.perf_counter()
    for _ in range(10):
        call()
    one = (time.perf_counter() - t0) / 10
    n = int(opts.get("calls") or max(20, min(20000, REP_S / max(one, 1e-7))))

    def loop():
        for _ in range(n):
            call()

    timing = {"cpu_min_reps": 7, "cpu_max_reps": 15, "cpu_min_time_s": 0.3, **opts.get("timing", {})}
    m = harness.measure(loop, "cpu", grad_to_none=x["leaves"], **timing)
    per = lambda ms: ms * 1e3 / n  # noqa: E731  (ms per loop -> µs per call)
    row = {"time_us": per(m.median_ms), "time_us_p20": per(m.p20_ms), "time_us_p80": per(m.p80_ms),
           "time_ms": m.median_ms / n, "calls_per_rep": n, "reps": len(m.times_ms),
           "torch_threads_job": torch.get_num_threads()}
    if params["provider"] == P.AUTO:
        row["auto_backend"] = P.auto_choice(x)
    if params["provider"].startswith("rapkern-") and raw_op_reason() is None:
        row.update(_paired_overhead(call, x, params["mode"], n, opts))
    return row


def _paired_overhead(call, x: dict, mode: str, n: int, opts: dict) -> dict:
    """The provider and the raw op timed in alternating loops of n calls in this process, PAIRED_REPS rounds:
    overhead = median over rounds of (provider − raw op) per call. This VM's speed drifts by up to 2x between
    processes and over seconds; a difference within one round cancels most of that drift, where the difference
    of two separately measured medians does not."""
    import statistics

    raw = _raw_op(x, "fwd" if mode == "fwd_grad" else mode)
    raw()
    reps = int(opts.get("paired_reps") or PAIRED_REPS)

    def per_call(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n * 1e6
        for t in x["leaves"]:
            t.grad = None
        return dt

    diffs, raws = [], []
    for _ in range(reps):
        a, b = per_call(call), per_call(raw)
        diffs.append(a - b)
        raws.append(b)
    return {"overhead_us": statistics.median(diffs), "raw_paired_us": statistics.median(raws),
            "paired_reps": reps}


def make_jobs(provs: list[str]) -> list[Job]:
    jobs = []
    for prior in PRIORS:
        for mode in MODES:
            for prov in provs:
                if prov == "raw_op" and mode == "fwd_grad":
                    continue  # the op has no autograd: fwd_grad rows compare with the raw forward
                jobs.append(Job(RUNNER, {"op": "attention_overhead", **SHAPE, "prior": prior, "mode": mode,
                                         "provider": prov}, timeout_s=300.0))
    return jobs


def precheck(params: dict, device: str) -> str | None:
    from . import providers as P

    if params["provider"] in ("sdpa", "raw_op"):
        return None
    return P.precheck(params, device)


def report(rows: list[dict], meta: dict, threads: int, kind: str) -> str:
    at = {(r["prior"], r["mode"], r["provider"]): r for r in rows}
    ok = lambda r: bool(r) and r.get("status") == harness.STATUS_OK  # noqa: E731
    lines = [f"# Per-call overhead of rapkern.attention (issue 10), CPU ({kind})", "",
             f"Machine: {harness.describe_machine(meta)}", "",
             f"Input B=1, H=2, L=8, D=16, fp32, {threads} thread(s); lag prior W=4 with per-head α. Per call: "
             f"median over repeats of a loop of n calls, divided by n. Load average at the end: {harness.load_avg()}.",
             "", f"overhead = rapkern.attention − raw op (same prior; fwd_grad against the raw forward), the "
                 f"median over {PAIRED_REPS} rounds of alternating loops in one process (raw op µs: its median "
                 f"there). Target ≤ {TARGET_US:.0f} µs. The fwd+bwd rows include the autograd engine's backward "
                 "pass (SDPA pays it too: see − sdpa); the target is about the entry (fwd, fwd_grad).", "",
             "| prior | mode | provider | µs per call | sdpa µs | − sdpa | raw op µs | overhead µs | ≤ 25 µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    unavailable = set()
    for r in rows:
        if not str(r["provider"]).startswith("rapkern-"):
            continue
        if not ok(r):
            unavailable.add(f"{r['provider']}: {r.get('status')}: {str(r.get('error', ''))[:100]}")
            continue
        sdpa = at.get((r["prior"], r["mode"], "sdpa"))
        raw = at.get((r["prior"], "fwd" if r["mode"] == "fwd_grad" else r["mode"], "raw_op"))
        us = r["time_us"]
        s = f"{sdpa['time_us']:.1f}" if ok(sdpa) else "—"
        ds = f"{us - sdpa['time_us']:+.1f}" if ok(sdpa) else "—"
        runs = r.get("auto_backend") or r["provider"][len("rapkern-"):]
        if runs != "cpp":  # the raw op is the C++ kernel: only the cpp path's difference is its overhead
            rr, ovs, verdict = (f"{raw['time_us']:.1f}" if ok(raw) else "—"), f"n/a (runs {runs})", "n/a"
        elif r.get("overhead_us") is not None and not _isnan(r["overhead_us"]):  # paired, same process
            ov = r["overhead_us"]
            rr, ovs, verdict = f"{r['raw_paired_us']:.1f}", f"{ov:.1f}", "pass" if ov <= TARGET_US else "MISS"
        elif ok(raw):
            ov = us - raw["time_us"]
            rr, ovs, verdict = f"{raw['time_us']:.1f}", f"{ov:.1f}", "pass" if ov <= TARGET_US else "MISS"
        else:
            rr, ovs, verdict = (f"{raw.get('status')}" if raw else "—"), "—", "n/a"
        lines.append(f"| {r['prior']} | {r['mode']} | {r['provider']} | {us:.1f} | {s} | {ds} | {rr} | {ovs} | "
                     f"{verdict} |")
    raw_rows = [r for r in rows if r["provider"] == "raw_op" and not ok(r)]
    if raw_rows:
        lines += ["", f"raw op: {raw_rows[0].get('status')}: {raw_rows[0].get('error', '')}"]
    if unavailable:
        lines += ["", "Not measured: " + "; ".join(sorted(unavailable))]
    lines += ["", "## All measurements (µs per call)", "",
              "| prior | mode | " + " | ".join(dict.fromkeys(r["provider"] for r in rows)) + " |"]
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    lines.append("|" + "---|" * (2 + len(provs)))
    for prior in PRIORS:
        for mode in MODES:
            cells = []
            for p in provs:
                r = at.get((prior, mode, p))
                cells.append(f"{r['time_us']:.1f}" if ok(r) else (str(r.get("status")) if r else ""))
            lines.append(f"| {prior} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _isnan(v) -> bool:
    try:
        return math.isnan(float(v))
    except (TypeError, ValueError):
        return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="in-process, few calls: a plumbing check, not a measurement")
    ap.add_argument("--providers", default="", help=f"comma list (default: {', '.join(providers())})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=None, help="jobs not started by then are recorded as skipped")
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    a = ap.parse_args(argv)
    kind = "smoke" if a.smoke else "full"
    provs = [p.strip() for p in a.providers.split(",") if p.strip()] or providers()
    jobs = make_jobs(provs)
    opts = {"threads": a.threads}
    if a.smoke:
        import torch

        torch.set_num_threads(a.threads)
        opts.update(calls=5, paired_reps=2, timing={"cpu_min_reps": 2, "cpu_max_reps": 2, "cpu_min_time_s": 0.0})
    meta = harness.machine_info("cpu")
    name = "smoke-overhead" if a.smoke else "overhead"
    csv_path = harness.results_path(f"{name}-{harness.stamp()}", a.out)
    harness.write_meta(csv_path.with_suffix(".json"), meta, {"jobs": [j.params for j in jobs], "opts": opts})
    t0 = time.monotonic()
    deadline = t0 + a.budget_s if a.budget_s else None
    rows = harness.run_jobs(jobs, opts, device="cpu", isolate=not a.smoke, csv_path=csv_path, meta=meta,
                            desc="per-call overhead", deadline=deadline, precheck=precheck)
    md = csv_path.with_name(csv_path.stem + "-targets.md")
    text = report(rows, meta, a.threads, kind)
    md.write_text(text)
    print(text)
    print(f"{len(rows)} measurements in {time.monotonic() - t0:.0f} s; CSV {csv_path}; report {md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
