"""Issue 2's fixed CPU benchmark: the torch backend vs eager, SDPA (dense bias / no bias) and FlexAttention.

    python -m bench.cpu_first                      # B=1, H=8, D=64, lag prior W=128, L 4096, 8192, 16384
    python -m bench.cpu_first --lengths 1024,2048  # a quicker look

Forward, float32, non-causal. Each measurement runs in a capped child process (see bench/harness.py):
a provider whose L x L buffers do not fit under the cap is recorded as skipped / oom, with the size.
Writes ``bench/results/cpu_first-<stamp>.{csv,json,md}`` and a plot; the .md holds the machine, the load
average at the start, the table and the issue's targets checked at the largest L:
peak extra memory of the torch backend <= 512 MB, time no worse than SDPA with the dense mask, and how
far it is from FlexAttention's time.
"""

from __future__ import annotations

import argparse

from . import attention, harness

PROVIDERS_BASE = ["eager", "sdpa_dense", "flex", "sdpa_nobias"]


def targets(rows: list[dict], L: int) -> list[str]:
    at = {r["provider"]: r for r in rows if r.get("L") == L}
    num = harness._num
    out = []
    mine = [p for p in at if p.startswith("rapkern-") and at[p].get("status") == "ok"]
    dense, flex = at.get("sdpa_dense", {}), at.get("flex", {})
    for p in mine:
        r = at[p]
        mem = r.get("peak_mem_mb", float("nan"))
        out.append(f"- {p} at L={L}: peak extra memory {num(mem)} MB "
                   f"({'meets' if mem <= 512 else 'MISSES'} the <= 512 MB target)")
        if dense.get("status") == "ok":
            verdict = "meets" if r["time_ms"] <= dense["time_ms"] else "MISSES"
            out.append(f"- {p} {num(r['time_ms'])} ms vs SDPA dense mask {num(dense['time_ms'])} ms: {verdict} "
                       f"'no worse than SDPA with the dense mask' (dense peak {num(dense.get('peak_mem_mb'))} MB)")
        else:
            out.append(f"- SDPA with the dense mask could not run at L={L} ({dense.get('status')}: "
                       f"{dense.get('error', '')}); {p} ran in {num(r['time_ms'])} ms")
        if flex.get("status") == "ok":
            ratio = r["time_ms"] / flex["time_ms"]
            out.append(f"- {p} / FlexAttention time = {ratio:.2f}x (flex {num(flex['time_ms'])} ms; its compile, "
                       f"{num(flex.get('warmup_s'))} s with warm-up, excluded)")
        else:
            out.append(f"- FlexAttention at L={L}: {flex.get('status')}: {flex.get('error', '')}")
    if not mine:
        out.append(f"- no rapkern backend ran at L={L}")
    return out


def main(argv=None):
    from . import providers as P

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--out", default=None)
    ap.add_argument("--name", default="cpu_first")
    a = ap.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")]
    configs = [attention.config("lag", L=L, B=1, H=8, D=64, W=128, dtype="float32", mode="fwd") for L in lengths]
    providers = [f"rapkern-{b.name}" for b in P.rapkern_backends()] + PROVIDERS_BASE
    rows, csv_path = attention.run(configs, device="cpu", providers=providers, out_dir=a.out, name=a.name,
                                   title="issue 2: CPU, B=1 H=8 D=64, lag prior W=128, forward fp32",
                                   timeout_s=1800.0)
    meta = {k: rows[0][k] for k in ("device_name", "cores", "ram_gb", "torch", "triton", "rapkern", "git",
                                    "python", "load_avg_start", "timestamp")} if rows else {}
    lines = ["# Issue 2 CPU benchmark", "", f"Machine: {harness.describe_machine(meta)}",
             f"Memory cap per measurement: {rows[0].get('mem_cap_gb', '?') if rows else '?'} GB (RLIMIT_AS); "
             f"load average at the end: {harness.load_avg()}", "",
             "Cells: median time · FLOP/s (4·B·H·L²·D) · peak extra memory (peak RSS above the inputs).", "",
             harness.markdown_table(rows, attention.TABLE_KEYS), "", "## Targets", ""]
    lines += targets(rows, max(lengths))
    md = csv_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-(len(targets(rows, max(lengths))) + 2):]))
    print(f"\nreport: {md}")


if __name__ == "__main__":
    main()
