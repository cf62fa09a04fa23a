"""Issue 10's CPU benchmark: the seeds' small windows, trained with a learnable lag table and α.

    python -m bench.seed_windows                   # the full grid (~15-20 min on 2 quiet cores)
    python -m bench.seed_windows --quick           # a subset of every section (~3 min): plumbing / a first look
    python -m bench.seed_windows --smoke           # tiny sizes, in-process, with max |out - float64 reference|

fp32, 2 threads (``--threads``), one capped child process per measurement (bench/harness.py), median time.
Sections (``section`` column):

* ``seed_lag``: (B=32, H=4, D=32, L 64/128/256/512, W = L/4) and (B=8, L 512/1024; B=4, L 2048; H=8, D=64,
  W = L/8); fwd and fwd+bwd with a learnable per-head lag table and learnable per-head α; causal and not.
  Every rapkern backend, ``rapkern-auto`` (backend="auto"), eager, sdpa_dense (materialized mask),
  sdpa_nobias.
* ``seed_banded``: the same sizes, banded prior with ``mask_outside=True``, w = W, non-causal: forward vs
  FlexAttention with a block mask; fwd+bwd (learnable values and α) for rapkern, and FlexAttention once (the
  smallest size) to record that it has no CPU backward.
* ``seed_lowrank``: the same sizes, low-rank r = 16, forward, vs sdpa_nobias and sdpa_lowrank_concat.
* ``long_lag_train``: L = 8192, B=1, H=8, D=64, W=128, fwd+bwd with learnable table and α vs sdpa_nobias.
* ``long_lag_fwd``: L = 16384, same shape, forward vs sdpa_nobias.
* ``long_banded``: banded ``mask_outside=True``, w = 256, L 2048/4096/8192, forward vs FlexAttention
  (sdpa_nobias at 4096, the README's reference point).
* ``long_lowrank``: r = 16 at L = 2048, forward, vs sdpa_nobias and sdpa_lowrank_concat.

Writes ``seed_windows-<stamp>.csv`` (+ ``.json``: machine, jobs, options), ``-targets.md`` (every rapkern row
with the ratio to its target baseline and pass / MISS) and plots. ``--quick`` runs a few sizes of every
section, the long cases at shorter lengths (marked in the report).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from . import attention, harness

RUNNER = "bench.seed_windows:measure_job"
CONFIG_KEYS = ["section", "prior_spec", "causal", "B", "H", "D", "L", "W", "w", "r", "mode"]
TABLE_KEYS = ["section", "prior_spec", "causal", "B", "H", "D", "L", "mode"]
PLOT_KEYS = ["section", "prior_spec", "causal", "D", "mode"]
BASE = ["eager", "sdpa_dense", "sdpa_nobias"]

# (B, H, D, L, W): the seeds' two size families
SIZES_A = [(32, 4, 32, L, L // 4) for L in (64, 128, 256, 512)]
SIZES_B = [(8, 8, 64, 512, 64), (8, 8, 64, 1024, 128), (4, 8, 64, 2048, 256)]
SIZES = SIZES_A + SIZES_B
QUICK_SIZES = [SIZES_A[1], SIZES_B[0]]
SMOKE_SIZES = [(2, 2, 16, 32, 8)]

# timing: small calls get many repeats; the long cases (seconds per call) a warm-up and two timed calls
TIMING_SEED = {"cpu_min_reps": 3, "cpu_max_reps": 30, "cpu_min_time_s": 0.3}
TIMING_LONG = {"cpu_min_reps": 2, "cpu_max_reps": 2, "cpu_min_time_s": 0.0}
TIMING_SMOKE = {"cpu_min_reps": 1, "cpu_max_reps": 2, "cpu_min_time_s": 0.0}


def measure_job(params: dict, opts: dict) -> dict:
    """attention.measure_job, plus which backend ``backend="auto"`` picked."""
    from . import providers as P

    row = attention.measure_job(params, opts)
    if params["provider"] == P.AUTO:
        row["auto_backend"] = P.auto_choice(P.make_attention_inputs(params, opts["device"]))
    return row


def cfg(section, prior_spec, B, H, D, L, *, mode="fwd", causal=False, W=128, w=256, r=16) -> dict:
    learn = mode != "fwd"
    c = attention.config(prior_spec, L=L, B=B, H=H, D=D, dtype="float32", causal=causal, mode=mode, W=W, w=w, r=r,
                         learnable=learn)
    return {"section": section, **c, "learn_alpha": learn and prior_spec != "none"}


def plan(sizes, long_lengths, rk: list[str]) -> list[tuple[str, list[dict], list[str], dict]]:
    """[(section, configs, providers, timing)]. ``long_lengths``: (train L, fwd L, banded Ls, low-rank L)."""
    lag, banded_fwd, banded_bwd, lowrank = [], [], [], []
    for B, H, D, L, W in sizes:
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                lag.append(cfg("seed_lag", "lag", B, H, D, L, mode=mode, causal=causal, W=W))
        banded_fwd.append(cfg("seed_banded", "banded_masked", B, H, D, L, w=W))
        banded_bwd.append(cfg("seed_banded", "banded_masked", B, H, D, L, w=W, mode="fwd+bwd"))
        lowrank.append(cfg("seed_lowrank", "lowrank", B, H, D, L, r=16))
    l_train, l_fwd, l_band, l_lowrank = long_lengths
    band_ref = l_band[len(l_band) // 2]
    return [
        ("seed_lag", lag, rk + BASE, TIMING_SEED),
        ("long_lag_train", [cfg("long_lag_train", "lag", 1, 8, 64, l_train, mode="fwd+bwd", W=128)],
         rk + ["sdpa_nobias"], TIMING_LONG),
        ("long_lag_fwd", [cfg("long_lag_fwd", "lag", 1, 8, 64, l_fwd, W=128)], rk + ["sdpa_nobias"], TIMING_LONG),
        ("seed_banded", banded_fwd, rk + ["flex", "sdpa_nobias"], TIMING_SEED),
        ("seed_banded", banded_bwd, rk, TIMING_SEED),
        ("seed_banded", banded_bwd[:1], ["flex"], TIMING_SEED),
        ("long_banded", [cfg("long_banded", "banded_masked", 1, 8, 64, L, w=256) for L in l_band], rk + ["flex"],
         TIMING_LONG),
        ("long_banded", [cfg("long_banded", "banded_masked", 1, 8, 64, band_ref, w=256)], ["sdpa_nobias"],
         TIMING_LONG),
        ("seed_lowrank", lowrank, rk + ["sdpa_nobias", "sdpa_lowrank_concat"], TIMING_SEED),
        ("long_lowrank", [cfg("long_lowrank", "lowrank", 1, 8, 64, l_lowrank, r=16)],
         rk + ["sdpa_nobias", "sdpa_lowrank_concat"], TIMING_LONG),
    ]


def run(kind: str, providers=None, out_dir=None, budget_s=None, threads=2, plots=True):
    from . import providers as P

    rk = P.rapkern_providers(include_auto=True)
    if kind == "smoke":
        sections = plan(SMOKE_SIZES, (64, 64, [32, 64], 32), rk)
        # one flex compile is enough for the smoke (seconds each): its banded forward at the smallest size
        flex_cfg = next(c[0] for s, c, provs, _ in sections if s == "seed_banded" and "flex" in provs)
        sections = [(s, c, [p for p in provs if p != "flex"], TIMING_SMOKE) for s, c, provs, _ in sections]
        sections.append(("seed_banded", [flex_cfg], ["flex"], TIMING_SMOKE))
    elif kind == "quick":
        sections = plan(QUICK_SIZES, (2048, 4096, [2048, 4096], 1024), rk)
    else:
        sections = plan(SIZES, (8192, 16384, [2048, 4096, 8192], 2048), rk)
    if providers:
        sections = [(s, c, [p for p in provs if p in providers], t) for s, c, provs, t in sections]
    jobs_by_section = [(sec, attention.make_jobs(c, provs, timeout_s=900.0) if provs else [], t)
                       for sec, c, provs, t in sections]
    for _, jobs, _ in jobs_by_section:
        for j in jobs:
            j.runner = RUNNER
    all_jobs = [j for _, jobs, _ in jobs_by_section for j in jobs]
    meta = harness.machine_info("cpu")
    name = {"smoke": "smoke-seed_windows", "quick": "quick-seed_windows"}.get(kind, "seed_windows")
    csv_path = harness.results_path(f"{name}-{harness.stamp()}", out_dir)
    harness.write_meta(csv_path.with_suffix(".json"), meta,
                       {"kind": kind, "threads": threads, "jobs": [j.params for j in all_jobs],
                        "timing": {"seed": TIMING_SEED, "long": TIMING_LONG, "smoke": TIMING_SMOKE}})
    deadline = time.monotonic() + budget_s if budget_s else None
    isolate = kind != "smoke"
    opts = {"threads": threads, "check": kind == "smoke"}
    rows = []
    for i, (sec, jobs, timing) in enumerate(jobs_by_section):
        if jobs:
            rows += harness.run_jobs(jobs, {**opts, "timing": timing}, device="cpu", isolate=isolate,
                                     csv_path=csv_path, meta=meta, desc=f"[{i + 1}/{len(jobs_by_section)}] {sec}",
                                     deadline=deadline, precheck=P.precheck)
    harness.finish(rows, meta, csv_path, TABLE_KEYS, PLOT_KEYS, csv_path.with_suffix("") if plots else None,
                   f"issue 10 seed windows ({kind}), CPU fp32, {threads} threads")
    md = csv_path.with_name(csv_path.stem + "-targets.md")
    md.write_text(report(rows, meta, kind, threads))
    print(f"targets: {md}")
    return rows, csv_path, md


# ----------------------------------------------------------------------------------------------------
# The targets report


def _key(r: dict) -> tuple:
    return tuple(str(r.get(k, "")) for k in CONFIG_KEYS)


def _ok(r) -> bool:
    return bool(r) and r.get("status") == harness.STATUS_OK and isinstance(r.get("time_ms"), (int, float))


def _label(r: dict) -> str:
    ext = {"lag": f"W={r.get('W')}", "banded": f"w={r.get('w')}", "lowrank": f"r={r.get('r')}"}.get(r.get("prior"), "")
    return (f"B={r['B']} H={r['H']} L={r['L']} D={r['D']} {ext} {'causal' if r.get('causal') in (True, 'True') else ''}"
            .replace("  ", " ").strip())


def _fail_text(r) -> str:
    if not r:
        return "—"
    return f"{r.get('status')}: {str(r.get('error', ''))[:80]}"


def _verdict(ratio, limit) -> str:
    if ratio is None or math.isnan(ratio):
        return "n/a"
    return "pass" if ratio <= limit else "MISS"


class _Report:
    """Collects target lines: one table row per (rapkern row, target)."""

    def __init__(self):
        self.lines: list[str] = []
        self.tally: dict = {}

    def table(self, title: str, header: list[str]):
        self.lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(self, cells: list, verdicts: list[str], provider: str):
        self.lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        for v in verdicts:
            t = self.tally.setdefault(provider, {"pass": 0, "MISS": 0, "n/a": 0})
            t[v] = t.get(v, 0) + 1


def _ratio(r, base) -> float | None:
    if not (_ok(r) and _ok(base)) or not base["time_ms"]:
        return None
    return r["time_ms"] / base["time_ms"]


def _fmt_ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _ms(r) -> str:
    return f"{harness._num(r['time_ms'])} ms" if _ok(r) else _fail_text(r)


def _mem(r) -> str:
    m = r.get("peak_mem_mb") if r else None
    return f"{harness._num(m)} MB" if isinstance(m, (int, float)) and not math.isnan(m) else "?"


def report(rows: list[dict], meta: dict, kind: str, threads: int) -> str:
    by_cfg: dict = {}
    for r in rows:
        by_cfg.setdefault(_key(r), {})[r["provider"]] = r
    rk_rows = [r for r in rows if str(r["provider"]).startswith("rapkern-") and r.get("status") != "unavailable"]
    skipped = [r for r in rows if str(r["provider"]).startswith("rapkern-") and r.get("status") == "unavailable"]
    rep = _Report()
    section = lambda s: [r for r in rk_rows if r.get("section") == s]  # noqa: E731
    peers = lambda r: by_cfg[_key(r)]  # noqa: E731

    # seed windows, lag prior
    rep.table("Seed windows, lag prior (fwd+bwd: learnable table and α)",
              ["config", "mode", "provider", "time", "eager", "sdpa_dense", "vs min(eager, dense) ≤ 1.0", "",
               "sdpa_nobias", "vs sdpa_nobias (goal ≤ 1.2 fwd / 1.5 fwd+bwd)", ""])
    for r in section("seed_lag"):
        p = peers(r)
        eager, dense, nob = p.get("eager"), p.get("sdpa_dense"), p.get("sdpa_nobias")
        best = min((b for b in (eager, dense) if _ok(b)), key=lambda b: b["time_ms"], default=None)
        t, g = _ratio(r, best), _ratio(r, nob)
        goal = 1.2 if r["mode"] == "fwd" else 1.5
        v1, v2 = _verdict(t, 1.0), _verdict(g, goal)
        rep.row([_label(r), r["mode"], r["provider"], _ms(r), _ms(eager), _ms(dense), _fmt_ratio(t), v1, _ms(nob),
                 _fmt_ratio(g), f"goal {v2}"], [v1], r["provider"])

    # long lag cases
    for sec, limit, what in (("long_lag_train", 2.0, "fwd+bwd, learnable table and α"),
                             ("long_lag_fwd", 1.05, "forward")):
        rep.table(f"Long lag prior ({what}): ≤ {limit}× sdpa_nobias, ≤ 512 MB",
                  ["config", "mode", "provider", "time", "peak extra memory", "sdpa_nobias",
                   f"ratio ≤ {limit}", "", "memory ≤ 512 MB"])
        for r in section(sec):
            nob = peers(r).get("sdpa_nobias")
            x = _ratio(r, nob)
            v = _verdict(x, limit)
            mem = r.get("peak_mem_mb") if _ok(r) else None
            vm = "n/a" if not isinstance(mem, (int, float)) or math.isnan(mem) else ("pass" if mem <= 512 else "MISS")
            rep.row([_label(r), r["mode"], r["provider"], _ms(r), _mem(r), f"{_ms(nob)} · {_mem(nob)}",
                     _fmt_ratio(x), v, vm], [v, vm], r["provider"])

    # banded with mask_outside vs flex; time per band pair
    for sec in ("seed_banded", "long_banded"):
        rep.table(f"Banded, mask_outside=True ({sec}): ≤ FlexAttention with a block mask (forward)",
                  ["config", "mode", "provider", "time", "ns per B·H·pair", "flex", "vs flex ≤ 1.0", "", "sdpa_nobias"])
        for r in section(sec):
            flex, nob = peers(r).get("flex"), peers(r).get("sdpa_nobias")
            x = _ratio(r, flex)
            v = _verdict(x, 1.0)
            rep.row([_label(r), r["mode"], r["provider"], _ms(r), _ns_per_pair(r), _ms(flex), _fmt_ratio(x), v,
                     _ms(nob) if nob else "—"], [v] if r["mode"] == "fwd" else [], r["provider"])
        rep.lines += ["", *_proportionality(section(sec))]

    # low-rank
    for sec in ("seed_lowrank", "long_lowrank"):
        rep.table(f"Low-rank r=16 ({sec}), forward: ≤ 1.2× sdpa_nobias",
                  ["config", "provider", "time", "sdpa_nobias", "ratio ≤ 1.2", "", "sdpa_lowrank_concat", "vs concat"])
        for r in section(sec):
            nob, cat = peers(r).get("sdpa_nobias"), peers(r).get("sdpa_lowrank_concat")
            x = _ratio(r, nob)
            v = _verdict(x, 1.2)
            rep.row([_label(r), r["provider"], _ms(r), _ms(nob), _fmt_ratio(x), v, _ms(cat),
                     _fmt_ratio(_ratio(r, cat))], [v], r["provider"])

    auto = sorted({f"{_label(r)} {r['mode']} → {r.get('auto_backend')}" for r in rk_rows if r.get("auto_backend")})
    head = [f"# Issue 10: seed windows and long cases, CPU ({kind})", "",
            f"Machine: {harness.describe_machine(meta)}", "",
            f"fp32, {threads} threads, one capped child process per measurement; median time "
            f"(seed sizes: ≥ 3 timed calls and ≥ 0.3 s; long cases: 2 timed calls, after one warm-up call). "
            f"Load average at the end: {harness.load_avg()}. Compare ratios within this run, not across runs.", ""]
    if kind != "full":
        head += [f"**{kind} run**: a subset; the long cases ran at shorter L than the issue's targets "
                 "(8192 / 16384): their verdicts are about the plumbing, not the targets.", ""]
    head += ["## Summary (target verdicts per provider; the seed windows' goals vs sdpa_nobias are in their table)",
             "", "| provider | pass | MISS | n/a |", "|---|---|---|---|"]
    head += [f"| {p} | {t['pass']} | {t['MISS']} | {t['n/a']} |" for p, t in rep.tally.items()]
    if skipped:
        head += ["", "Not measured: " + "; ".join(sorted({f"{r['provider']} ({str(r.get('error', ''))[:90]})"
                                                         for r in skipped}))]
    if auto:
        head += ["", "backend='auto' picked: " + "; ".join(auto)]
    tail = ["", "## All measurements", "", "Cells: median time · effective FLOP/s · peak extra memory.", "",
            harness.markdown_table(rows, TABLE_KEYS), ""]
    return "\n".join(head + ["", "## Targets"] + rep.lines + tail)


def _pairs(r) -> float:
    from . import providers as P

    return r["B"] * r["H"] * harness.visible_pairs(r["L"], r["L"], r.get("causal") in (True, "True"), P.band_of(r))


def _ns_per_pair(r) -> str:
    if not _ok(r):
        return "—"
    return f"{r['time_ms'] * 1e6 / _pairs(r):.2f}"


def _proportionality(rows: list[dict]) -> list[str]:
    """Time per (B·H·band pair) across L, per provider, mode and head dim: 'roughly constant' = max/min ≤ 1.5."""
    groups: dict = {}
    for r in rows:
        if _ok(r):
            groups.setdefault((r["provider"], r["mode"], r["D"]), []).append(r)
    out = []
    for (prov, mode, d), rs in groups.items():
        if len(rs) < 2:
            continue
        per = {r["L"]: r["time_ms"] * 1e6 / _pairs(r) for r in rs}
        spread = max(per.values()) / min(per.values())
        out.append(f"- {prov} {mode} D={d}: ns per B·H·pair at L " + ", ".join(f"{L}: {v:.2f}" for L, v in
                                                                              sorted(per.items()))
                   + f" → max/min {spread:.2f} ({'roughly constant' if spread <= 1.5 else 'NOT constant'}, "
                   f"criterion max/min ≤ 1.5; median {statistics.median(per.values()):.2f})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a subset of every section (~3 min on 2 quiet cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, in-process: a plumbing check, not a measurement")
    ap.add_argument("--providers", default="", help="comma list (default: every rapkern backend, rapkern-auto, "
                                                    "and each section's baselines)")
    ap.add_argument("--budget-s", type=float, default=None, help="jobs not started by then are recorded as skipped")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output folder (default bench/results)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    kind = "smoke" if a.smoke else "quick" if a.quick else "full"
    if kind == "smoke":
        import torch

        torch.set_num_threads(a.threads)
    providers = [p.strip() for p in a.providers.split(",") if p.strip()] or None
    t0 = time.monotonic()
    rows, csv_path, md = run(kind, providers, a.out, a.budget_s, a.threads, plots=not a.no_plots and kind != "smoke")
    print(f"\n{len(rows)} measurements in {time.monotonic() - t0:.0f} s; CSV {csv_path}; report {md}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
