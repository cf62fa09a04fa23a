"""Attention benchmark: every provider (bench/providers.py) over a grid of configs.

    python -m bench.attention                       # a default grid for this device
    python -m bench.attention --priors lag,banded_masked --modes fwd,fwd+bwd --lengths 1024,4096 \
        --dtypes bf16 --head-dims 128 --causal 0,1 --providers rapkern-torch,flex,sdpa_nobias

Priors: none, lag (window W), banded (half width w, zero outside), banded_masked (mask_outside=True),
lowrank (rank r), dense. Modes: fwd, bwd, fwd+bwd. ``--learnable`` makes the prior tensors require grad.
Writes ``bench/results/attention-<stamp>.csv`` (+ ``.json`` with the machine), prints a markdown table,
and plots time / TFLOP/s / memory vs L per config group.
"""

from __future__ import annotations

import argparse
import itertools

from . import harness
from .harness import Job, Skipped

RUNNER = "bench.attention:measure_job"
TABLE_KEYS = ["prior_spec", "causal", "dtype", "D", "mode", "L"]
PLOT_KEYS = ["prior_spec", "causal", "dtype", "D", "mode"]
PRIOR_SPECS = ("none", "lag", "banded", "banded_masked", "lowrank", "dense")


def measure_job(params: dict, opts: dict) -> dict:
    """Runner for one (provider, config): build inputs and the callable, measure, add FLOP/s."""
    from . import providers as P

    device = opts["device"]
    cap = opts.get("cap_bytes")
    if device == "cuda" and not cap:
        import torch

        cap = int(0.9 * torch.cuda.get_device_properties(0).total_memory)
    if cap:
        need = P.predicted_bytes(params["provider"], params)
        if need > cap:
            raise Skipped(f"would need ~{need / 2**30:.2f} GB > cap {cap / 2**30:.2f} GB (predicted)")
    x = P.make_attention_inputs(params, device)
    forward = P.build_attention(params["provider"], x, device, flex_dynamic=opts.get("flex_dynamic", False))
    fn = P.with_mode(forward, x, params["mode"])
    m = harness.measure(fn, device, grad_to_none=x["leaves"], **opts.get("timing", {}))
    err = {}
    if opts.get("check") or params.get("check"):  # max |out - float64 reference|: the same function?
        import torch

        from rapkern.testing import max_error, reference_attention

        with torch.no_grad():
            ref = reference_attention(x["q"], x["k"], x["v"], prior=x["prior"], alpha=x["alpha"], causal=x["causal"],
                                      scale=x["scale"])
            err = {"max_err": max_error(forward(), ref)}
    L = params["L"]
    flops = harness.attention_flops(params["B"], params["H"], L, L, params["D"], causal=params["causal"],
                                    band=P.band_of(params), mode=params["mode"])
    return {"time_ms": m.median_ms, "time_ms_p20": m.p20_ms, "time_ms_p80": m.p80_ms,
            "reps": len(m.times_ms) or "do_bench", "gflop": flops / 1e9,
            "tflops": flops / (m.median_ms * 1e-3) / 1e12, "peak_mem_mb": m.peak_mem_mb, "warmup_s": m.warmup_s,
            **err}


def config(prior_spec: str, *, L: int, B=1, H=8, D=64, dtype="float32", causal=False, mode="fwd",
           W=128, w=256, r=16, learnable=False) -> dict:
    if prior_spec not in PRIOR_SPECS:
        raise ValueError(f"prior must be one of {PRIOR_SPECS}, got {prior_spec!r}")
    kind = "banded" if prior_spec.startswith("banded") else prior_spec
    p = {"op": "attention", "prior_spec": prior_spec, "prior": kind, "mask_outside": prior_spec == "banded_masked",
         "causal": bool(causal), "dtype": dtype, "B": B, "H": H, "L": L, "D": D, "mode": mode,
         "learnable": bool(learnable and mode != "fwd" and kind != "none")}
    if kind == "lag":
        p["W"] = W
    elif kind == "banded":
        p["w"] = w
    elif kind == "lowrank":
        p["r"] = r
    return p


def make_jobs(configs: list[dict], providers: list[str] | None = None, timeout_s: float = 900.0) -> list[Job]:
    from . import providers as P

    names = providers or P.attention_providers()
    return [Job(RUNNER, {**c, "provider": prov}, timeout_s) for c in configs for prov in names
            if P.applicable(prov, c)]


def grid(priors, lengths, *, modes=("fwd",), causal=(False,), dtypes=("float32",), head_dims=(64,), **kw):
    return [config(p, L=L, mode=m, causal=c, dtype=dt, D=d, **kw)
            for p, c, dt, d, m, L in itertools.product(priors, causal, dtypes, head_dims, modes, lengths)]


def run(configs: list[dict], *, device: str, providers=None, out_dir=None, name="attention", opts=None,
        budget_s=None, isolate=None, title="attention", plots=True, timeout_s=900.0):
    """Run every provider on every config; CSV + JSON + table + plots. Returns (rows, csv_path)."""
    from . import providers as P

    return harness.run_suite(make_jobs(configs, providers, timeout_s), device=device, name=name,
                             table_keys=TABLE_KEYS, plot_keys=PLOT_KEYS, title=title, out_dir=out_dir,
                             opts=opts, budget_s=budget_s, isolate=isolate, plots=plots, precheck=P.precheck)


def _csv_list(s: str, typ=str):
    return [typ(x) for x in s.split(",") if x.strip()]


def _bool(s: str) -> bool:
    return s.strip().lower() in ("1", "true", "yes", "on")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--providers", default="", help="comma list (default: all; see bench/providers.py)")
    ap.add_argument("--priors", default="lag,banded,banded_masked,lowrank,dense")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--dtypes", default="")
    ap.add_argument("--head-dims", default="")
    ap.add_argument("--lengths", default="")
    ap.add_argument("--B", type=int, default=None)
    ap.add_argument("--H", type=int, default=None)
    ap.add_argument("--W", type=int, default=128, help="lag prior window")
    ap.add_argument("--w", type=int, default=256, help="banded prior half width")
    ap.add_argument("--r", type=int, default=16, help="low-rank prior rank")
    ap.add_argument("--learnable", action="store_true", help="prior tensors require grad in bwd modes")
    ap.add_argument("--budget-s", type=float, default=None, help="skip jobs not started after this many seconds")
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    device = harness.detect_device() if a.device == "auto" else a.device
    gpu = device == "cuda"
    dtypes = _csv_list(a.dtypes) or (["bfloat16"] if gpu else ["float32"])
    head_dims = _csv_list(a.head_dims, int) or ([64, 128] if gpu else [64])
    lengths = _csv_list(a.lengths, int) or ([1024, 2048, 4096, 8192, 16384] if gpu else [512, 1024, 2048])
    B = a.B or (max(1, 16384 // max(lengths)) * 2 if gpu else 1)
    H = a.H or (16 if gpu else 8)
    causal = [_bool(c) for c in _csv_list(a.causal)]
    configs = grid(_csv_list(a.priors), lengths, modes=_csv_list(a.modes), causal=causal,
                   dtypes=dtypes, head_dims=head_dims, B=B, H=H, W=a.W, w=a.w, r=a.r, learnable=a.learnable)
    run(configs, device=device, providers=_csv_list(a.providers) or None, out_dir=a.out,
        opts={"verbose": a.verbose}, budget_s=a.budget_s, plots=not a.no_plots)


if __name__ == "__main__":
    main()
