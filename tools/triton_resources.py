"""Registers, spills and shared memory of the Triton attention kernels per launch key, compiled ahead of
time (no GPU) for sm_80 / sm_90 with whatever Triton the running Python has.

    TRITON_INTERPRET=0 .venv/bin/python tools/triton_resources.py                # default matrix, one tile
    .venv-triton36/bin/python tools/triton_resources.py --search --md out.md     # first spill-free tile

A launch key is (kernel, prior kind, head dim, dtype, masking). Kernels: ``fwd``, ``dq``, ``dkdv`` (the
backward kernels with the prior / alpha gradients on when a prior is present: the most live state) and
``tutorial``, a forward written after the Triton fused-attention tutorial (no prior, no masks) as the
floor to compare with. Masking ``-`` = none, ``C+P`` = causal + key padding. Every compile uses
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reads the cubin's resource
usage with the ``cuobjdump --dump-resource-usage`` shipped in the Triton wheel. With ``--search`` each
key gets the first spill-free tile of a large-to-small candidate list (what an autotune table would keep).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(os.environ.get("RAPKERN_ROOT") or Path(__file__).resolve().parents[1])  # e.g. a copy of an older tree
sys.path.insert(0, str(ROOT))
os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit reads it at import

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

PRIORS = {"none": (0, False), "lag": (1, False), "banded": (2, False), "banded-masked": (2, True),
          "lowrank": (3, False), "dense": (4, False)}
DEFAULT_TILE = {"fwd": (128, 64, 8, 3), "tutorial": (128, 64, 8, 3), "dq": (128, 64, 8, 2), "dkdv": (32, 64, 8, 2)}
# --search candidates, large to small (BLOCK_M, BLOCK_N, warps, stages)
SEARCH = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2),
            (32, 32, 4, 1)],
    "tutorial": [(128, 64, 8, 3)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    "dkdv": [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
}
SMEM_LIMIT = {80: 166912, 90: 232448}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@triton.jit
def _tutorial_fwd(Q, K, V, Out, Lse, sq_h, sq_m, sk_h, sk_n, sv_h, sv_n, so_h, so_m, Lk, qk_scale,
                  D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The Triton tutorial's forward, reduced to its core (no prior, no masks, Lk % BLOCK_N == 0)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q + off_h.to(tl.int64) * sq_h + offs_m[:, None] * sq_m + offs_d[None, :])
    k_ptrs = K + off_h.to(tl.int64) * sk_h + offs_n[None, :] * sk_n + offs_d[:, None]
    v_ptrs = V + off_h.to(tl.int64) * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    for _ in range(0, Lk, BLOCK_N):
        s = tl.dot(q, tl.load(k_ptrs)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        corr = tl.math.exp2(m_i - m_new)
        l_i = l_i * corr + tl.sum(p, 1)
        acc = acc * corr[:, None] + tl.dot(p.to(q.dtype), tl.load(v_ptrs))
        m_i = m_new
        k_ptrs += BLOCK_N * sk_n
        v_ptrs += BLOCK_N * sv_n
    tl.store(Lse + off_h.to(tl.int64) * 0 + offs_m, m_i + tl.math.log2(l_i))
    tl.store(Out + off_h.to(tl.int64) * so_h + offs_m[:, None] * so_m + offs_d[None, :],
             (acc / l_i[:, None]).to(Out.dtype.element_ty))


def _kernel(name):
    if name == "tutorial":
        return _tutorial_fwd
    from rapkern.backends.triton_attention._dkdv_kernel import _attn_bwd_dkdv_kernel
    from rapkern.backends.triton_attention._dq_kernel import _attn_bwd_dq_kernel
    from rapkern.backends.triton_attention._fwd_kernel import _attn_fwd_kernel

    return {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}[name]


FP32_PTRS = {"Lse", "Delta", "Alpha", "DA", "DL", "DPR", "P_ptr", "P2_ptr"}
DATA_PTRS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_"}
FLOAT_ARGS = {"qk_scale", "scale", "dropout_p"}
DIV16 = {"D", "DV", "dpr_r", "dl_bh", "da_bh"}  # what the JIT specializes for typical inputs
UNIT = {"sp_c": 1, "sp2_c": 1}


def _signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "Kpm":
            sig[name] = "*u8"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in DATA_PTRS:
            sig[name] = f"*{dtype}"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, sig):
    out = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or name in DIV16 or (name.startswith("s") and "_" in name and sig[name] == "i32"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _consts(kernel, prior, d, dtype, masked, tile):
    bm, bn = tile[0], tile[1]
    if kernel == "tutorial":
        return {"D_PAD": d, "BLOCK_M": bm, "BLOCK_N": bn}
    code, mask_out = PRIORS[prior]
    c = dict(PRIOR=code, MASK_OUT=mask_out, R_PAD=16, CAUSAL=masked, HAS_KPM=masked, DROPOUT=False,
             D_PAD=d, DV_PAD=d, IEEE=dtype == "fp32", BLOCK_M=bm, BLOCK_N=bn)
    grads = code != 0
    if kernel != "fwd":
        c["NEED_DPRIOR"] = grads
    if kernel == "dq":
        c["NEED_DALPHA"] = grads
    if kernel == "dkdv":
        c["LAG_T"] = 2 * max(bm, bn)
        if code == 1 and grads:  # the lag-table gradient needs square tiles (launch.py)
            c["BLOCK_N"] = c["BLOCK_M"] = min(bm, bn)
            c["LAG_T"] = 2 * min(bm, bn)
    return {**c, **UNIT}


def _resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    reg, stack, shared, local = map(int, m.groups())
    return reg, stack, shared, local


def compile_one(job):
    """job = (arch, kernel, prior, d, dtype, masked, tile) -> result dict (error text on failure)."""
    arch, kernel, prior, d, dtype, masked, tile = job
    fn = _kernel(kernel)
    consts = _consts(kernel, prior, d, dtype, masked, tile)
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = _signature(fn, dtype, consts)
    row = dict(arch=arch, kernel=kernel, prior=prior, d=d, dtype=dtype, masked=masked,
               tile=(consts["BLOCK_M"], consts["BLOCK_N"], tile[2], tile[3]))
    try:
        src = triton.compiler.ASTSource(fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig))
        ck = triton.compile(src, target=triton.backends.compiler.GPUTarget("cuda", arch, 32),
                            options={"num_warps": tile[2], "num_stages": tile[3]})
        reg, stack, shared, local = _resources(ck.asm["cubin"])
        row.update(regs=reg, spill=max(stack, local), smem=max(ck.metadata.shared, shared))
        row["ok"] = row["spill"] == 0 and row["smem"] <= SMEM_LIMIT[arch]
    except Exception as e:  # recorded, never silently dropped
        row.update(regs=-1, spill=-1, smem=-1, ok=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    return row


def search_one(job):
    """First spill-free tile of SEARCH[kernel] for one key (job's tile ignored); last failure if none."""
    arch, kernel, prior, d, dtype, masked, _ = job
    row = None
    for tile in SEARCH[kernel]:
        row = compile_one((arch, kernel, prior, d, dtype, masked, tile))
        if row["ok"]:
            return row
    row["tile"] = None
    return row


def jobs(args):
    out = []
    for kernel in args.kernels:
        priors = ["none"] if kernel == "tutorial" else args.priors
        masks = [False] if kernel == "tutorial" else args.masks
        for arch in args.arch:
            for prior in priors:
                for d in args.dims:
                    for dtype in args.dtypes:
                        if dtype == "fp32" and kernel in ("dq", "dkdv") and d > 64:
                            continue  # fp32 backward is served at head dim <= 64 only
                        for masked in masks:
                            for tile in args.tiles.get(kernel, [DEFAULT_TILE[kernel]]):
                                out.append((arch, kernel, prior, d, dtype, masked, tile))
    return out


def fmt_table(rows, title):
    lines = [f"### {title}", "",
             "| arch | kernel | prior | D | dtype | mask | tile (M,N,w,s) | regs | spill B | smem |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tile = "none spill-free" if r["tile"] is None else "{}x{} w{} s{}".format(*r["tile"])
        spill = r["spill"] if "error" not in r else "ERR " + r["error"][:60]
        lines.append(f"| sm_{r['arch']} | {r['kernel']} | {r['prior']} | {r['d']} | {r['dtype']} | "
                     f"{'C+P' if r['masked'] else '-'} | {tile} | {r['regs']} | {spill} | {r['smem']} |")
    return "\n".join(lines) + "\n"


def _tile(s):
    return tuple(int(x) for x in s.replace("w", "").replace("s", "").split("x"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="tutorial,fwd,dq,dkdv")
    ap.add_argument("--priors", default=",".join(PRIORS))
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="fp16,fp32")
    ap.add_argument("--arch", default="80,90")
    ap.add_argument("--masks", default="none,causal+padding", help="none and/or causal+padding")
    ap.add_argument("--tile", action="append", default=[],
                    help="kernel=MxNxWARPSxSTAGES[,...], e.g. fwd=128x64x8x3 (repeatable)")
    ap.add_argument("--search", action="store_true", help="first spill-free tile per key instead of fixed tiles")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--md", help="append the table (markdown) to this file")
    ap.add_argument("--title", default="")
    ap.add_argument("--json", help="write rows as JSON")
    a = ap.parse_args()
    a.kernels = a.kernels.split(",")
    a.priors = a.priors.split(",")
    a.dims = [int(x) for x in a.dims.split(",")]
    a.dtypes = a.dtypes.split(",")
    a.arch = [int(x) for x in a.arch.split(",")]
    a.masks = [m != "none" for m in a.masks.split(",")]
    a.tiles = {}
    for spec in a.tile:
        k, v = spec.split("=")
        a.tiles[k] = [_tile(t) for t in v.split(",")]
    todo = jobs(a)
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    rows = []
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx) as pool:
        for row in pool.map(search_one if a.search else compile_one, todo):
            rows.append(row)  # streamed: a long run's partial results survive an interruption
            print(json.dumps(row), file=sys.stderr, flush=True)
    import torch

    title = a.title or (f"triton {triton.__version__}, torch {torch.__version__}"
                        f"{', first spill-free tile' if a.search else ''}")
    table = fmt_table(rows, title)
    print(table)
    print(f"{len(rows)} keys in {time.time() - t0:.0f} s", file=sys.stderr)
    if a.md:
        with open(a.md, "a") as f:
            f.write(table + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
