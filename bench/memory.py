"""Long-sequence memory profiler: peak extra memory vs L for every attention provider and prior.

    python -m bench.memory                                  # CPU: L 1k..16k; GPU: L 1k..64k (doubling)
    python -m bench.memory --priors lag,banded_masked --min-len 1024 --max-len 65536 --mode fwd+bwd

For each (provider, prior) the sweep doubles L, measuring one call after warm-up (peak RSS of a capped
child process on CPU, ``torch.cuda.max_memory_allocated`` on GPU, both above the memory held before the
call: inputs, compiled code and the autograd graph of a ``bwd`` run are not counted). After a provider's
first out-of-memory the larger L are recorded as skipped. The growth exponent is the least-squares slope
of log(memory) vs log(L) over the largest (up to 4) successful L: ~1 for O(L), ~2 for O(L²).
Writes ``bench/results/memory-<stamp>.csv`` (points), ``memory-<stamp>-fit.csv`` (exponents), a plot.
"""

from __future__ import annotations

import argparse
import math

from . import attention, harness


def sweep_lengths(lo: int, hi: int) -> list[int]:
    out, L = [], lo
    while L <= hi:
        out.append(L)
        L *= 2
    return out


def fits(rows: list[dict], last: int = 4) -> list[dict]:
    out = []
    keys = dict.fromkeys((r["provider"], r["prior_spec"], r["mode"]) for r in rows)
    for prov, prior, mode in keys:
        rs = sorted((r for r in rows if (r["provider"], r["prior_spec"], r["mode"]) == (prov, prior, mode)),
                    key=lambda r: r["L"])
        ok = [r for r in rs if r.get("status") == "ok" and isinstance(r.get("peak_mem_mb"), (int, float))
              and not math.isnan(r["peak_mem_mb"])]
        pts = ok[-last:]
        first_bad = next((r for r in rs if r.get("status") != "ok"), None)
        out.append({
            "provider": prov, "prior_spec": prior, "mode": mode,
            "exponent": harness.fit_exponent([r["L"] for r in pts], [r["peak_mem_mb"] for r in pts]),
            "fit_L": f"{pts[0]['L']}..{pts[-1]['L']}" if pts else "",
            "max_ok_L": ok[-1]["L"] if ok else "", "peak_mb_at_max": ok[-1]["peak_mem_mb"] if ok else "",
            "first_failure": f"{first_bad['status']} at L={first_bad['L']}" if first_bad else "",
        })
    return out


def fit_table(fr: list[dict]) -> str:
    head = "| provider | prior | mode | exponent | fit over L | max L ok | peak MB there | first failure |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for f in fr:
        e = f["exponent"]
        lines.append(f"| {f['provider']} | {f['prior_spec']} | {f['mode']} | {'' if math.isnan(e) else f'{e:.2f}'} | "
                     f"{f['fit_L']} | {f['max_ok_L']} | {harness._num(f['peak_mb_at_max'])} | {f['first_failure']} |")
    return "\n".join(lines)


def plot_memory(rows, out_png, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    priors = list(dict.fromkeys(r["prior_spec"] for r in rows))
    fig, axes = plt.subplots(1, len(priors), figsize=(5.5 * len(priors), 4.5), squeeze=False)
    for ax, prior in zip(axes[0], priors):
        for prov in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["L"], r["peak_mem_mb"]) for r in rows if r["prior_spec"] == prior
                         and r["provider"] == prov and r.get("status") == "ok"
                         and isinstance(r.get("peak_mem_mb"), (int, float)) and r["peak_mem_mb"] > 0)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov, color=harness.color(prov))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("peak extra memory (MB)")
        ax.set_title(f"prior={prior}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def run(priors, lengths, *, device, providers=None, mode="fwd", out_dir=None, name="memory", B=1, H=8, D=64,
        dtype=None, W=128, w=256, r=16, budget_s=None):
    import time

    from . import providers as P

    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    names = providers or P.attention_providers()
    # provider-major, L ascending: a provider stops after its first OOM
    jobs = [harness.Job(attention.RUNNER, {**attention.config(pr, L=L, B=B, H=H, D=D, dtype=dtype, mode=mode,
                                                              W=W, w=w, r=r, learnable=mode != "fwd"),
                                           "provider": prov}, 1800.0)
            for pr in priors for prov in names for L in lengths
            if P.applicable(prov, attention.config(pr, L=lengths[0]))]
    meta = harness.machine_info(device)
    csv_path = harness.results_path(f"{name}-{harness.stamp()}", out_dir)
    harness.write_meta(csv_path.with_suffix(".json"), meta, {"priors": priors, "lengths": lengths, "mode": mode})
    rows = harness.run_jobs(
        jobs, {"timing": {"memory_only": True}}, device=device, csv_path=csv_path, meta=meta, desc="memory",
        deadline=time.monotonic() + budget_s if budget_s else None, precheck=P.precheck,
        stop_after_oom_key=lambda p: (p["provider"], p["prior_spec"], p["mode"]),
    )
    fr = fits(rows)
    fit_path = csv_path.with_name(csv_path.stem + "-fit.csv")
    for f in fr:
        harness.append_csv(fit_path, {**meta, **f})
    title = f"peak extra memory vs L ({mode}, {dtype}, B={B} H={H} D={D})"
    png = plot_memory(rows, csv_path.with_suffix(".png"), title)
    print(f"\n## memory vs L\n\nMachine: {harness.describe_machine(meta)}\n")
    print(harness.markdown_table(rows, ["prior_spec", "mode", "L"]))
    print()
    print(fit_table(fr))
    print(f"\nCSV: {csv_path}\nfits: {fit_path}" + (f"\nplot: {png}" if png else ""))
    return rows, fr, csv_path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--providers", default="")
    ap.add_argument("--priors", default="")
    ap.add_argument("--mode", default="fwd", choices=["fwd", "bwd", "fwd+bwd"])
    ap.add_argument("--min-len", type=int, default=1024)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = harness.detect_device() if a.device == "auto" else a.device
    gpu = device == "cuda"
    priors = [p for p in a.priors.split(",") if p] or (
        ["lag", "banded_masked", "lowrank", "dense"] if gpu else ["lag", "banded_masked"])
    lengths = sweep_lengths(a.min_len, a.max_len or (65536 if gpu else 16384))
    run(priors, lengths, device=device, providers=[p for p in a.providers.split(",") if p] or None, mode=a.mode,
        out_dir=a.out, B=a.B, H=a.H, D=a.D, dtype=a.dtype, budget_s=a.budget_s)


if __name__ == "__main__":
    main()
