"""Ahead-of-time compilation of the statistics / KL kernels for sm_80 and sm_90 (no GPU needed).

Every entry of ``stats.CONFIGS`` (kernel x dtype class x head-dim bucket; the same blocks on both
architectures) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
sm_80 and sm_90 and for every prior kind, with causal masking, key padding and every gradient switch on (the
most live state; the other constexpr switches only remove state). KL launches are compiled for each student
prior kind against the same teacher kind and against a low-rank teacher (the heaviest teacher tile), in the
KL forward and in both backward kernels. Plus one bf16 compile per kernel and architecture.

Resource usage is read with the Triton wheel's ``cuobjdump`` (tests/test_triton_compile.py's machinery);
the test fails on any register spill or stack use, or shared memory beyond the architecture's limit.

``python tests/test_triton_stats_compile.py`` searches the candidate blocks (large to small, first that is
spill-free for every variant on both architectures) and prints the CONFIGS table.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")

import test_triton_compile as T  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rapkern.backends.triton_attention import stats as S  # noqa: E402

ARCHS = (80, 90)
DATA_PTRS = {"Q", "K", "DQ", "DK"}  # the student's (or the statistics') input dtype
TEACHER_PTRS = {"Qt", "Kt"}
FP32_PTRS = {"Lse", "Ent", "Mass", "KLrow", "LseT", "Alpha", "AlphaT", "GR", "Mu", "GM", "C", "DPR", "DA", "DL",
             "P_ptr", "P2_ptr", "Pt_ptr", "Pt2_ptr"}
FLOAT_ARGS = {"qk_scale", "qk_scale_t", "inv_t", "scale"}
DIV16 = {"D", "DT", "dpr_r", "dl_bh", "da_bh"}
UNIT = {"sp_c", "sp2_c", "spt_c", "spt2_c"}  # unit column strides of the prior tensors (constant 1)
LOWRANK = 3


def _kernels():
    # imported in the worker, where TRITON_INTERPRET=0 (see _compile_all)
    from rapkern.backends.triton_attention import _stats_kernels as K

    return {"fwd": K._stats_fwd_kernel, "mass": K._stats_mass_kernel, "klfwd": K._kl_fwd_kernel,
            "dq": K._score_bwd_dq_kernel, "dk": K._score_bwd_dk_kernel}


def _signature(fn, dtype: str, dtype_t: str, constexprs: dict):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "Kpm":
            sig[name] = "*u8"
        elif name in DATA_PTRS:
            sig[name] = f"*{dtype}"
        elif name in TEACHER_PTRS:
            sig[name] = f"*{dtype_t}"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, sig):
    """What the JIT would specialize for typical inputs: 16-divisible pointers, strides and head dims."""
    out = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or name in DIV16 or (name.startswith("s") and "_" in name and sig[name] == "i32"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def variants(kernel: str, d_pad: int, fp32: bool, bm: int, bn: int) -> list[dict]:
    """Constexprs of every compile of one config: each prior kind (KL: against the same teacher kind and
    against a low-rank teacher), causal + padding + every gradient switch on."""

    def side(p, sfx=""):
        return {f"PRIOR{sfx}": p, f"MASK_OUT{sfx}": p == 2, f"R_PAD{sfx}": 16}

    base = dict(CAUSAL=True, HAS_KPM=True, D_PAD=d_pad, IEEE=fp32, BLOCK_M=bm, BLOCK_N=bn)
    kl_pairs = [(p, p) for p in range(5)] + [(p, LOWRANK) for p in range(5) if p != LOWRANK]
    teacher = dict(DT_PAD=d_pad, IEEE_T=fp32)
    if kernel in ("fwd", "mass"):
        return [{**base, **side(p)} for p in range(5)]
    if kernel == "klfwd":
        return [{**base, **teacher, **side(s), **side(t, "_T")} for s, t in kl_pairs]
    extra = dict(NEED_DPRIOR=True, **({"NEED_DALPHA": True} if kernel == "dq" else {"LAG_T": 2 * max(bm, bn)}))
    stats = [{**base, **extra, **side(p), **side(0, "_T"), "DT_PAD": 16, "IEEE_T": False, "KL": False,
              "HAS_GH": True, "HAS_GM": True} for p in range(5)]
    kl = [{**base, **extra, **teacher, **side(s), **side(t, "_T"), "KL": True, "HAS_GH": False, "HAS_GM": False}
          for s, t in kl_pairs]
    return stats + kl


def _compile_one(case) -> dict:
    arch, kernel, dtype, feats, warps, stages, maxnreg = case
    fn = _kernels()[kernel]
    consts = {**feats, **{u: 1 for u in UNIT if u in fn.arg_names}}
    sig = _signature(fn, dtype, dtype, consts)
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig))
    opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    res = T._resources(ck.asm["cubin"])
    res.update(arch=arch, kernel=kernel, dtype=dtype, prior=(feats["PRIOR"], feats.get("PRIOR_T")),
               kl=feats.get("KL", kernel == "klfwd"), d_pad=feats["D_PAD"], block=(feats["BLOCK_M"], feats["BLOCK_N"]),
               warps=warps, stages=stages, maxnreg=maxnreg, smem=max(ck.metadata.shared, res["static_smem"]))
    return res


def _ok(r) -> bool:
    return r["local"] == 0 and r["stack"] == 0 and r["smem"] <= T.SMEM_LIMIT[r["arch"]]


def _cases():
    cases = []
    for key, (bm, bn, w, s, mx) in sorted(S.CONFIGS.items()):
        kernel, cls, d = key.split("|")
        fp32 = cls == "32"
        for arch in ARCHS:
            for feats in variants(kernel, int(d), fp32, bm, bn):
                cases.append((arch, kernel, "fp32" if fp32 else "fp16", feats, w, s, mx))
    for kernel in S.KERNELS:
        cfg = S.CONFIGS.get(f"{kernel}|16|64")
        if cfg:
            for arch in ARCHS:
                feats = variants(kernel, 64, False, cfg[0], cfg[1])[1]  # lag prior
                cases.append((arch, kernel, "bf16", feats, *cfg[2:]))
    return cases


def _pool(fn, items):
    """Worker processes spawned with TRITON_INTERPRET=0 (@triton.jit reads it when the kernels are imported)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        ctx = multiprocessing.get_context("spawn")
        workers = max(1, min(8, os.cpu_count() or 1))
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(fn, items))
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_configs_shape():
    """dk tiles are square (the lag-table partials' layout); every kernel has a 16-bit config at every head dim."""
    for key, (bm, bn, *_) in S.CONFIGS.items():
        if key.startswith("dk|"):
            assert bm == bn, key
    for kernel in S.KERNELS:
        for d in (64, 128, 256):
            assert f"{kernel}|16|{d}" in S.CONFIGS, (kernel, d)


@pytest.mark.skipif(not os.path.exists(T.CUOBJDUMP), reason="cuobjdump not shipped with this triton")
def test_aot_compile_stats_sm80_sm90():
    rows = _pool(_compile_one, _cases())
    print(f"\n{'arch':>4} {'kernel':>6} {'dtype':>5} {'prior':>7} {'kl':>5} {'D':>4} {'block':>9} {'w':>2} {'s':>2} "
          f"{'regs':>5} {'local':>6} {'stack':>6} {'smem':>7}")
    bad = []
    for r in rows:
        print(f"{r['arch']:>4} {r['kernel']:>6} {r['dtype']:>5} {str(r['prior']):>7} {str(r['kl']):>5} {r['d_pad']:>4} "
              f"{str(tuple(r['block'])):>9} {r['warps']:>2} {r['stages']:>2} {r['regs']:>5} {r['local']:>6} "
              f"{r['stack']:>6} {r['smem']:>7}")
        if not _ok(r):
            bad.append(str(r))
    assert not bad, "spill / stack / shared memory over the limit:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------------------------- search

# (BLOCK_M, BLOCK_N, warps, stages, maxnreg), large to small; maxnreg 255 lifts ptxas' occupancy target on
# the backward kernels (see stats.CONFIGS)
CANDIDATES = {
    "fwd": [(64, 64, 4, 2, 0), (64, 32, 4, 2, 0), (32, 32, 4, 1, 0), (16, 32, 4, 1, 0), (16, 16, 4, 1, 0)],
    "mass": [(64, 64, 4, 2, 0), (32, 64, 4, 2, 0), (32, 32, 4, 1, 0), (32, 16, 4, 1, 0), (16, 16, 4, 1, 0)],
    "klfwd": [(64, 32, 4, 2, 0), (32, 32, 4, 1, 0), (32, 32, 8, 1, 0), (16, 32, 4, 1, 0), (16, 16, 4, 1, 0),
              (16, 16, 2, 1, 0)],
    "dq": [(32, 32, 4, 1, 255), (32, 32, 8, 1, 255), (16, 32, 4, 1, 255), (16, 16, 4, 1, 255), (16, 16, 2, 1, 255)],
    "dk": [(32, 32, 4, 1, 255), (32, 32, 8, 1, 255), (16, 16, 4, 1, 255), (16, 16, 2, 1, 255)],
}


def _search_key(key):
    """The first candidate (large to small) that is spill-free for every variant on both architectures."""
    kernel, cls, d = key
    fp32 = cls == "32"
    for bm, bn, w, s, mx in CANDIDATES[kernel]:
        # heaviest first (low-rank, KL), so a spilling candidate is rejected after few compiles
        vs = sorted(variants(kernel, d, fp32, bm, bn), key=lambda f: (f["PRIOR"] != LOWRANK, not f.get("KL", True)))
        if all(_ok(_compile_one((a, kernel, "fp32" if fp32 else "fp16", f, w, s, mx))) for f in vs for a in ARCHS):
            return key, (bm, bn, w, s, mx)
    return key, None


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    keys = [(k, "16", d) for k in S.KERNELS for d in (64, 128, 256)] + [(k, "32", 64) for k in S.KERNELS]
    if len(sys.argv) > 1:
        keys = [k for k in keys if k[0] in sys.argv[1:]]
    for (kernel, cls, d), cfg in _pool(_search_key, keys):
        print(f"    '{kernel}|{cls}|{d}': {cfg},", flush=True)
