"""Compare two generated Triton config tables (before / after a kernel change): per launch key of the
backward (or any) kernels, the first config and its registers, and whether the prior variants run at a tile
no smaller than the no-prior kernel's, against the same class's no-prior key (the
same dtype / dropout variant; the plain one for the prior-gradient classes, which have no no-prior key) and
against the plain class's.

    python tools/triton_tile_diff.py BEFORE.py AFTER.py [--kernels dq,dkdv] [--dims 64,128] [--label 3.8]

BEFORE/AFTER are table modules (rapkern/backends/triton_attention/_config_tables/triton_*.py, e.g. a copy
from ``git show REV:path``). Prints markdown: the rows whose entry changed or that stay smaller than a
no-prior tile, then gap counts. Needs no compiler and no GPU.
"""

from __future__ import annotations

import argparse
import runpy

PRIORS = {0: "none", 1: "lag", 2: "banded", 3: "lowrank", 4: "dense"}


def load(path: str) -> tuple[dict, dict]:
    mod = runpy.run_path(path)
    return mod["TABLE"], mod["META"]


def first(table: dict, meta: dict, key: str):
    cfgs = table.get(key) or []
    if not cfgs:
        return None, None
    regs = meta.get(key, (None, [[None]]))[1][0][0]
    return tuple(cfgs[0]), regs


def smaller(cfg, ref) -> bool:
    """A tile smaller than the reference in BLOCK_M or BLOCK_N (no config at all counts as smaller)."""
    if ref is None:
        return False
    return cfg is None or cfg[0] < ref[0] or cfg[1] < ref[1]


def fmt(cfg, regs) -> str:
    return "none" if cfg is None else f"{cfg}: {regs}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--kernels", default="dq,dkdv")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--label", default="", help="e.g. the Triton version, printed in each row")
    args = ap.parse_args()
    (tb, mb), (ta, ma) = load(args.before), load(args.after)
    kernels, dims = args.kernels.split(","), args.dims.split(",")
    print("| triton | kernel | class | arch | D | prior | before: regs | after: regs | class no-prior | "
          "vs class | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    counts = {"before": [0, 0], "after": [0, 0]}  # [gaps vs class, gaps vs plain]
    for key in sorted(set(ta) | set(tb)):
        kernel, cls, arch, d, prior = key.split("|")
        if kernel not in kernels or d not in dims:
            continue
        ref_plain = f"{kernel}|plain|{arch}|{d}|0"
        ref_cls = f"{kernel}|{cls}|{arch}|{d}|0"
        if ref_cls not in ta:  # classes with prior gradients only (grad, lowrank, laggrad): the plain kernel's
            ref_cls = ref_plain
        rows = {}
        for name, (t, m) in (("before", (tb, mb)), ("after", (ta, ma))):
            cfg, regs = first(t, m, key)
            rc, _ = first(t, m, ref_cls)
            rp, _ = first(t, m, ref_plain)
            gc = prior != "0" and smaller(cfg, rc)
            gp = smaller(cfg, rp) if (prior != "0" or cls != "plain") else False
            counts[name][0] += gc
            counts[name][1] += gp
            rows[name] = (cfg, regs, rc, gc, gp)
        b, a = rows["before"], rows["after"]
        if b[:2] == a[:2] and not (a[3] or a[4]):
            continue
        print(f"| {args.label} | {kernel} | {cls} | sm_{arch} | {d} | {PRIORS[int(prior)]} | {fmt(*b[:2])} | "
              f"{fmt(*a[:2])} | {a[2]} | {'gap' if a[3] else '-'} | {'gap' if a[4] else '-'} |")
    print()
    for name in ("before", "after"):
        print(f"- {args.label} {name}: {counts[name][0]} prior keys smaller than their class's no-prior tile, "
              f"{counts[name][1]} keys smaller than the plain no-prior tile")


if __name__ == "__main__":
    main()
