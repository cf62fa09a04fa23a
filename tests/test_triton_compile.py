"""Ahead-of-time compilation of every Triton attention kernel for sm_80 and sm_90 (no GPU needed).

Every config the autotuner may pick (``configs.TABLE``: kernel x feature class x architecture x head
dim 64/128/256) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
for every prior kind of its class, with causal masking and key padding on (the most live state), plus
the fixed lag-gradient dk/dv tile and one bf16 compile per kernel and architecture. Other constexpr
switches (causal off, no padding) only remove state and are not compiled separately.

Each cubin's registers, local memory (spills / stack) and shared memory are read with the
``cuobjdump --dump-resource-usage`` shipped in the Triton wheel and printed as a table (also written as
JSON to $RAPKERN_AOT_REPORT when set). The test fails on any spill/stack use or when shared memory
exceeds the architecture's limit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rapkern.backends.triton_attention import configs as C  # noqa: E402

SMEM_LIMIT = {80: 166912, 90: 232448}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _kernels():
    # imported in the worker, where TRITON_INTERPRET=0 (see _compile_all)
    from rapkern.backends.triton_attention._bwd_kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    from rapkern.backends.triton_attention._fwd_kernel import _attn_fwd_kernel

    return {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}


FP32_PTRS = {"Lse", "Delta", "Alpha", "DA", "DL", "DPR", "P_ptr", "P2_ptr"}
DATA_PTRS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_"}
FLOAT_ARGS = {"qk_scale", "scale", "dropout_p"}


def _signature(fn, dtype: str, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
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


# What the JIT would specialize for typical inputs: 16-divisible pointers, row strides and head dims
# (``tt.divisibility``), and unit column strides of the prior tensors (constant 1).
DIV16 = {"D", "DV", "dpr_r", "dl_bh", "da_bh"}
UNIT = {"sp_c": 1, "sp2_c": 1}


def _attrs(fn, sig):
    out = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or name in DIV16 or (name.startswith("s") and "_" in name and sig[name] == "i32"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _features(kernel: str, cls: str, prior: int, d_pad: int, bm: int, bn: int):
    """Constexprs of one compile in feature class ``cls`` (see configs.TABLE): always causal + key
    padding (the most live masks), band masking for the banded prior, and the class's switches."""
    c = dict(PRIOR=prior, MASK_OUT=prior == 2, R_PAD=16, CAUSAL=True, HAS_KPM=True, DROPOUT=cls == "dropout",
             D_PAD=d_pad, DV_PAD=d_pad, IEEE=cls == "fp32", BLOCK_M=bm, BLOCK_N=bn)
    grads = cls in ("grad", "lowrank", "laggrad")
    if kernel != "fwd":
        c["NEED_DPRIOR"] = grads
    if kernel == "dq":
        c["NEED_DALPHA"] = grads
    if kernel == "dkdv":
        c["LAG_T"] = 2 * max(bm, bn)
    return c


def _cases():
    """(arch, kernel, dtype, constexprs, warps, stages): every entry of configs' spill-free table (each
    launch key: kernel, feature class, arch, head dim, prior kind), the fixed lag-gradient dk/dv tile,
    and one bf16 compile per kernel and arch. All strict."""
    cases = []
    for key, cfgs in sorted(C._config_table.TABLE.items()):
        kernel, cls, arch, d, prior = key.split("|")
        dtype = "fp32" if cls == "fp32" else "fp16"
        for bm, bn, w, s in cfgs:
            cases.append((int(arch), kernel, dtype, _features(kernel, cls, int(prior), int(d), bm, bn), w, s))
    for arch, per_d in C.LAG_GRAD.items():
        for d, (bm, bn, w, s) in per_d.items():
            cases.append((arch, "dkdv", "fp16", _features("dkdv", "laggrad", 1, d, bm, bn), w, s))
    for kernel in ("fwd", "dq", "dkdv"):
        for arch in (80, 90):
            bm, bn, w, s = C.configs_for(kernel, arch, 64, "plain", 1)[0]
            cases.append((arch, kernel, "bf16", _features(kernel, "plain", 1, 64, bm, bn), w, s))
    return cases


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    assert m, txt
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "static_smem": shared, "local": local}


def _compile_one(case) -> dict:
    arch, kernel, dtype, feats, warps, stages = case
    fn = _kernels()[kernel]
    consts = {**feats, **UNIT}
    sig = _signature(fn, dtype, consts)
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig))
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    res = _resources(ck.asm["cubin"])
    res.update(arch=arch, kernel=kernel, dtype=dtype, prior=feats["PRIOR"], d_pad=feats["D_PAD"],
               block=(feats["BLOCK_M"], feats["BLOCK_N"]), warps=warps, stages=stages,
               smem=max(ck.metadata.shared, res["static_smem"]),
               heavy=bool(feats["DROPOUT"]), ieee=bool(feats["IEEE"]))
    return res


def _compile_all(cases):
    """Compile in worker processes (spawned with TRITON_INTERPRET=0: @triton.jit reads it at import)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(8, os.cpu_count() or 1))  # each worker imports torch + triton (~1 GB)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(_compile_one, cases))
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="cuobjdump not shipped with this triton")
def test_aot_compile_sm80_sm90():
    rows = _compile_all(_cases())
    bad = []
    print(f"\n{'arch':>4} {'kernel':>6} {'dtype':>5} {'prior':>5} {'D':>4} {'block':>9} {'w':>2} {'s':>2} "
          f"{'heavy':>5} {'regs':>5} {'local':>6} {'stack':>6} {'smem':>7}")
    for r in rows:
        print(f"{r['arch']:>4} {r['kernel']:>6} {r['dtype']:>5} {r['prior']:>5} {r['d_pad']:>4} "
              f"{str(tuple(r['block'])):>9} {r['warps']:>2} {r['stages']:>2} {str(r['heavy']):>5} {r['regs']:>5} "
              f"{r['local']:>6} {r['stack']:>6} {r['smem']:>7}")
        if r["local"] > 0 or r["stack"] > 0:
            bad.append(f"spill: {r}")
        if r["smem"] > SMEM_LIMIT[r["arch"]]:
            bad.append(f"shared memory {r['smem']} > {SMEM_LIMIT[r['arch']]}: {r}")
    if os.environ.get("RAPKERN_AOT_REPORT"):
        with open(os.environ["RAPKERN_AOT_REPORT"], "w") as f:
            json.dump(rows, f, indent=1)
    assert not bad, "\n".join(bad)
