"""Ahead-of-time compilation of every Triton routing kernel for sm_80 and sm_90 (no GPU needed).

Each kernel is compiled with the one config ``triton_routing.configs.config`` gives it per architecture,
with the most live state (normalize and cluster_mask on; top-k at k = 64, the largest padding), in fp16
and fp32 (3xTF32 dots), plus one bf16 compile per architecture (bf16 tiles are laid out like fp16 ones).
Registers, spills/stack and shared memory come from ``cuobjdump`` through tests/test_triton_compile.py's
machinery; any spill or a shared-memory use above the architecture's limit fails the test. Feature dims
and row strides are compiled as multiples of 16, as the JIT specializes them for what the backend runs
on a GPU (it declines other d, e there).

The gate runs under every environment of ``aot_env`` (this one and the triton 3.6 side environment) in a
subprocess: ``python tests/test_triton_routing_compile.py --json out.json``. The configs are one table for all
versions, so each version must compile every entry spill-free (26 compiles, about two to three minutes on two
cores per environment).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

from test_triton_compile import SMEM_LIMIT, _resources  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rapkern.backends.triton_routing import configs as C  # noqa: E402

DATA = {"Q", "C", "A", "Out", "DO", "Src"}
FP32 = {"RC", "Lse", "RQ", "Delta", "U", "V", "DA", "W", "DX", "Wt", "Dst"}
I64 = {"Idx", "Rows", "Offs"}
FLOATS = {"qk_scale", "inv_tau"}
# What the JIT specializes for d, e multiples of 16 with contiguous rows (384 in the issue): 16-divisible
# feature dims and row strides, so tiles load as vectors.
DIV16_ARGS = {"D", "E", "WIDTH", "s_src"} | {f"s{x}_{y}" for x in ("q", "c", "a", "o", "do", "m") for y in ("g", "n")}
DIV16 = True
KERNELS = {  # name -> (module attribute, configs key, constexpr names of the config)
    "fwd": ("_fwd_kernels", "_route_fwd_kernel", "fwd", ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E")),
    "topk_fwd": ("_fwd_kernels", "_route_topk_fwd_kernel", "topk_fwd", ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E")),
    "dq": ("_bwd_kernels", "_route_bwd_dq_kernel", "dq", ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E", "BLOCK_W")),
    "dc": ("_bwd_kernels", "_route_bwd_dc_kernel", "dc", ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_E", "BLOCK_W")),
    "topk_rows": ("_bwd_kernels", "_route_topk_bwd_rows_kernel", "topk_rows", ("BLOCK_M", "BLOCK_W")),
    "segment": ("_bwd_kernels", "_segment_sum_kernel", "segment", ("BLOCK_W",)),
}


def _kernel(name):
    import importlib

    mod, attr, _, _ = KERNELS[name]
    return getattr(importlib.import_module(f"rapkern.backends.triton_routing.{mod}"), attr)


def _constexprs(name: str, dtype: str, arch: int) -> dict:
    _, _, key, names = KERNELS[name]
    cfg = C.config(key, interpreter=False, fp32=dtype == "fp32", arch=arch)
    out = {n: cfg[n] for n in names}
    if name == "segment":
        out["BLOCK_T"] = cfg["BLOCK_M"]
    if name in ("fwd", "topk_fwd", "dq", "dc"):
        out.update(HAS_MASK=True, IEEE=dtype == "fp32")
    if name != "segment":
        out["NORMALIZE"] = True
    if name in ("topk_fwd", "topk_rows"):
        out.update(K=C.MAX_TOP_K, K_PAD=C.k_pad(C.MAX_TOP_K))
    return out


def _signature(fn, dtype, consts):
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in DATA:
            sig[a] = f"*{dtype}"
        elif a in FP32:
            sig[a] = "*fp32"
        elif a in I64:
            sig[a] = "*i64"
        elif a == "Mask":
            sig[a] = "*u8"
        elif a in FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    return sig


def _compile_one(case) -> dict:
    arch, name, dtype = case
    fn = _kernel(name)
    consts = _constexprs(name, dtype, arch)
    sig = _signature(fn, dtype, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a].startswith("*") or (DIV16 and a in DIV16_ARGS)}
    cfg = C.config(KERNELS[name][2], interpreter=False, fp32=dtype == "fp32", arch=arch)
    ck = triton.compile(ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    res = _resources(ck.asm["cubin"])
    res.update(arch=arch, kernel=name, dtype=dtype, smem=max(ck.metadata.shared, res["static_smem"]))
    return res


def _cases():
    cases = [(arch, name, dt) for arch in (80, 90) for name in KERNELS for dt in ("fp16", "fp32")]
    cases += [(arch, "fwd", "bf16") for arch in (80, 90)]  # bf16 compiles like fp16 (checked once per arch)
    return cases


def _compile_all(cases):
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit reads it at import: workers are spawned
    try:
        ctx = multiprocessing.get_context("spawn")
        import side_env

        with ProcessPoolExecutor(max_workers=side_env.aot_workers(4), mp_context=ctx) as pool:
            return list(pool.map(_compile_one, cases))
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def gate() -> dict:
    rows = _compile_all(_cases())
    problems = []
    for r in rows:
        if r["local"] > 0 or r["stack"] > 0:
            problems.append(f"spill: {r}")
        if r["smem"] > SMEM_LIMIT[r["arch"]]:
            problems.append(f"shared memory {r['smem']} > {SMEM_LIMIT[r['arch']]}: {r}")
    return {"triton": triton.__version__, "table": C.describe_table(), "rows": rows, "problems": problems}


def test_routing_aot_compile_sm80_sm90(aot_env):
    import side_env

    report = side_env.run_json(aot_env, ["tests/test_triton_routing_compile.py"])
    print(f"\n[{aot_env.name}] triton {report['triton']}")
    print(f"{'arch':>4} {'kernel':>10} {'dtype':>5} {'regs':>5} {'local':>6} {'stack':>6} {'smem':>7}")
    for r in report["rows"]:
        print(f"{r['arch']:>4} {r['kernel']:>10} {r['dtype']:>5} {r['regs']:>5} {r['local']:>6} {r['stack']:>6} "
              f"{r['smem']:>7}")
    if os.environ.get("RAPKERN_AOT_REPORT"):
        with open(f"{os.environ['RAPKERN_AOT_REPORT']}.routing.{aot_env.name}.json", "w") as f:
            json.dump(report, f, indent=1)
    assert not report["problems"], f"[{aot_env.name}, triton {report['triton']}]\n" + "\n".join(report["problems"])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    with open(a.json, "w") as f:
        json.dump(gate(), f, indent=1, default=list)
