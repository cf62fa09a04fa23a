"""The GPU check's benchmark (driven by bench/gpu_check.sh): a short run of every provider, sized for
about 5 minutes on an H100, with the Triton targets in one go:

1. ``lag_fwd``: lag prior forward, bf16, D=128, L 1k..16k, B·L = 32k tokens x 16 heads (fills an H100):
   every rapkern backend vs FlexAttention vs SDPA flash without bias (+ SDPA dense mask, eager).
2. ``lag_fwdbwd``: fwd+bwd with a learnable lag table (and alpha fixed) vs Flex with the table as a
   learnable captured tensor; SDPA flash fwd+bwd without bias as the floor.
3. ``band32k``: banded prior w=256 at L=32k, mask_outside=True vs the same call without the mask.
4. ``routing``: lda_route dense and top-k, rapkern vs eager.
5. ``other_priors``: low-rank (with the exact concat-into-SDPA route) and dense priors at L=4k.
6. peak memory vs L: from sections 1 and 2 (log-log plot, growth exponents in the summary).

Sections run in this order under a time budget (jobs not started in time are recorded as skipped);
gpu_check.sh runs each in its own process, so a kernel that breaks the CUDA context costs one section.
Everything goes to OUT: results.csv (appended), summary.md (printed last), env.json, lag_fwd.png,
lag_fwdbwd.png, memory.png.

    python -m bench.gpu_check --out OUT [--sections lag_fwd,band32k] [--budget-s 300 | --until EPOCH]
    python -m bench.gpu_check --out OUT --finish                   # plots + summary.md from results.csv
    python -m bench.gpu_check --out /tmp/x --device cpu --tiny     # plumbing check without a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import attention, harness, memory, routing


def sections(tiny: bool) -> list[tuple[str, list[harness.Job]]]:
    from . import providers as P

    rk = [f"rapkern-{b.name}" for b in P.rapkern_backends()]
    # the comparisons the Triton targets name come first in each section
    order = [p for p in rk if p != "rapkern-torch"] + ["flex", "sdpa_nobias"] + \
            [p for p in rk if p == "rapkern-torch"] + ["sdpa_dense", "eager", "sdpa_lowrank_concat"]
    if tiny:
        dt, D, H, tokens = "float32", 16, 2, 512
        fwd_L, bwd_L, band_L, band_w, other_L = (128, 256), (128,), 512, 16, 128
    else:
        dt, D, H, tokens = "bfloat16", 128, 16, 32768
        fwd_L, bwd_L, band_L, band_w, other_L = (1024, 2048, 4096, 8192, 16384), (2048, 8192), 32768, 256, 4096
    B = lambda L: max(1, tokens // L)  # noqa: E731
    key = set(order[: order.index("sdpa_nobias") + 1])  # what the Triton targets compare: first, at every L
    first = lambda jobs: sorted(jobs, key=lambda j: j.params["provider"] not in key)  # noqa: E731  (stable)
    out = []
    cfgs = [attention.config("lag", L=L, B=B(L), H=H, D=D, dtype=dt, W=128) for L in fwd_L]
    out.append(("lag_fwd", first(attention.make_jobs(cfgs, order, timeout_s=600))))
    cfgs = [attention.config("lag", L=L, B=B(L), H=H, D=D, dtype=dt, W=128, mode="fwd+bwd", learnable=True)
            for L in bwd_L]
    out.append(("lag_fwdbwd", first(attention.make_jobs(cfgs, order, timeout_s=600))))
    cfgs = [attention.config(spec, L=band_L, B=1, H=H, D=D, dtype=dt, w=band_w) for spec in ("banded_masked", "banded")]
    out.append(("band32k", attention.make_jobs(cfgs, rk + ["flex", "sdpa_nobias"], timeout_s=600)))
    rcfg = routing.grid([256 if tiny else 16384], clusters=(64 if tiny else 4096,), top_ks=(0, 8),
                        modes=("fwd", "fwd+bwd"), dtypes=(dt,), G=2 if tiny else 4, d=D, e=D)
    out.append(("routing", routing.make_jobs(rcfg)))
    cfgs = [attention.config(p, L=other_L, B=B(other_L), H=H, D=D, dtype=dt, r=16) for p in ("lowrank", "dense")]
    out.append(("other_priors", attention.make_jobs(cfgs, order, timeout_s=600)))
    return out


def _ratio_lines(rows: list[dict]) -> list[str]:
    """The Triton targets as ratios (time of a rapkern backend over each baseline, per L)."""
    lines = []
    ok = {(r["section"], r["provider"], r.get("prior_spec"), r.get("L")): r for r in rows if r.get("status") == "ok"}
    rk = sorted({r["provider"] for r in rows if str(r.get("provider", "")).startswith("rapkern-")})
    for sec, base in (("lag_fwd", "flex"), ("lag_fwd", "sdpa_nobias"), ("lag_fwdbwd", "flex"),
                      ("lag_fwdbwd", "sdpa_nobias")):
        for p in rk:
            parts = []
            for L in sorted({r["L"] for r in rows if r.get("section") == sec}):
                a, b = ok.get((sec, p, "lag", L)), ok.get((sec, base, "lag", L))
                if a and b:
                    parts.append(f"L={L}: {a['time_ms'] / b['time_ms']:.2f}x")
            if parts:
                lines.append(f"- {sec}: {p} time / {base} time: " + ", ".join(parts))
    for p in rk + ["flex"]:
        a = next((r for k, r in ok.items() if k[0] == "band32k" and k[1] == p and k[2] == "banded_masked"), None)
        b = next((r for k, r in ok.items() if k[0] == "band32k" and k[1] == p and k[2] == "banded"), None)
        if a and b:
            lines.append(f"- band32k: {p} mask_outside {harness._num(a['time_ms'])} ms vs no mask "
                         f"{harness._num(b['time_ms'])} ms: {b['time_ms'] / a['time_ms']:.1f}x faster with the mask")
    return lines


def summarize(out: Path) -> str:
    rows = harness.read_csv(out / "results.csv")
    meta = {}
    if (out / "env.json").exists():
        meta = json.loads((out / "env.json").read_text()).get("machine", {})
    parts = [f"# GPU check summary\n\nMachine: {harness.describe_machine(meta)}\n",
             "Cells: median ms · TFLOP/s (4·B·H·L²·D, causal ½, band only, bwd 2.5x) · peak extra MB.\n"]
    for sec in dict.fromkeys(r["section"] for r in rows):
        srows = [r for r in rows if r["section"] == sec]
        keys = routing.TABLE_KEYS if sec == "routing" else ["prior_spec", "mode", "B", "L"]
        parts.append(f"## {sec}\n\n" + harness.markdown_table(srows, keys) + "\n")
    mem_rows = [dict(r, prior_spec=f"{r['prior_spec']} {r['mode']}") for r in rows
                if r["section"] in ("lag_fwd", "lag_fwdbwd")]
    fr = memory.fits(mem_rows) if mem_rows else []
    if fr:
        parts.append("## peak memory growth (exponent of L)\n\n" + memory.fit_table(fr) + "\n")
    checked = [r for r in rows if isinstance(r.get("max_err"), float)]
    if checked:
        parts.append("## max |out - float64 reference| (lag fwd, smallest L; sdpa_nobias has no prior)\n\n"
                     + ", ".join(f"{r['provider']} {r['max_err']:.2e}" for r in checked) + "\n")
    ratios = _ratio_lines(rows)
    if ratios:
        parts.append("## Triton targets\n\n" + "\n".join(ratios) + "\n")
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    parts.append("statuses: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    text = "\n".join(parts)
    (out / "summary.md").write_text(text + "\n")
    return text


def plots(out: Path, rows: list[dict]) -> None:
    for sec in ("lag_fwd", "lag_fwdbwd"):
        srows = [r for r in rows if r.get("section") == sec]
        for p in harness.plot_vs_length(srows, ["section"], out / "tmp", title=sec):
            p.replace(out / f"{sec}.png")
    mem_rows = [dict(r, prior_spec=f"{r['prior_spec']} {r['mode']}") for r in rows
                if r.get("section") in ("lag_fwd", "lag_fwdbwd")]
    if mem_rows:
        memory.plot_memory(mem_rows, out / "memory.png", "peak extra memory vs L (GPU check)")


SECTIONS = ("lag_fwd", "lag_fwdbwd", "band32k", "routing", "other_priors")


def run_sections(out: Path, names, device: str, tiny: bool, until: float) -> None:
    """Run the named sections in this process, appending to OUT/results.csv until wall-clock ``until``."""
    from . import providers as P

    meta = harness.machine_info(device)
    if not (out / "env.json").exists():
        harness.write_meta(out / "env.json", meta, {"until": until, "tiny": tiny})
    opts = {"flex_dynamic": None,  # automatic dynamic shapes: one recompile covers every L (compile budget)
            "timing": {"gpu_warmup_ms": 10, "gpu_rep_ms": 60, "cpu_min_reps": 1, "cpu_min_time_s": 0.0}}
    deadline = time.monotonic() + max(until - time.time(), 0)
    for name, jobs in sections(tiny):
        if name not in names:
            continue
        for j in jobs:
            j.params["section"] = name
            if name == "lag_fwd" and j.params["L"] == min(x.params["L"] for x in jobs):
                j.params["check"] = True  # max |out - float64 reference| at the smallest L
            j.params["note"] = "flex: torch.compile(dynamic=None)" if j.params["provider"] == "flex" else ""
        harness.run_jobs(jobs, opts, device=device, isolate=False, csv_path=out / "results.csv", meta=meta,
                         desc=name, deadline=deadline, precheck=P.precheck)


def finish(out: Path) -> str:
    rows = harness.read_csv(out / "results.csv") if (out / "results.csv").exists() else []
    try:
        plots(out, rows)
    except Exception as e:  # noqa: BLE001  (plots are a nicety; the CSV and summary are the result)
        print(f"plots failed: {harness.short_error(e)}")
    return summarize(out) if rows else "no results.csv"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=300, help="jobs not started by then are skipped")
    ap.add_argument("--until", type=float, default=None, help="absolute deadline (time.time()); beats --budget-s")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (to check the plumbing on a CPU)")
    ap.add_argument("--finish", action="store_true", help="only make the plots and summary.md from OUT/results.csv")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.finish:
        print(finish(out))
        return 0
    device = harness.detect_device() if a.device == "auto" else a.device
    until = a.until if a.until is not None else time.time() + a.budget_s
    run_sections(out, [x for x in a.sections.split(",") if x], device, a.tiny, until)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
