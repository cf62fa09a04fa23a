"""Ahead-of-time compilation of the statistics / KL kernels for sm_80 and sm_90 (no GPU needed).

Every entry of ``stats.CONFIGS`` (kernel x dtype class x head-dim bucket x prior kind; the same blocks on
both architectures) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for
sm_80 and sm_90, with causal masking, key padding and every gradient switch on (the most live state; the
other constexpr switches only remove state). The KL forward and both backward kernels are compiled for the
statistics (backward only) and for the KL against the same teacher kind and against a low-rank teacher (the
heaviest teacher tile in every measurement). Plus one bf16 compile per kernel and architecture.

Resource usage is read with the Triton wheel's ``cuobjdump`` (tests/test_triton_compile.py's machinery);
the test fails on any register spill or stack use, or shared memory beyond the architecture's limit.

The gate runs in a subprocess (``python tests/test_triton_stats_compile.py --gate --json out.json``) under each
environment of ``aot_env`` whose Triton is in ``stats.GATED_TRITON`` (3.8 and 3.6; ``CONFIGS`` is the shared table
merged with the version's ``CONFIGS_BY_TRITON`` replacements); under other versions the configs run unverified,
which stats.describe_table() says.

``python tests/test_triton_stats_compile.py`` searches the candidate blocks (large to small, first that is
spill-free for every variant on both architectures) and prints the CONFIGS table.
"""

from __future__ import annotations

import argparse
import json
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


def variants(kernel: str, d_pad: int, fp32: bool, bm: int, bn: int, prior: int) -> list[dict]:
    """Constexprs of every compile of one config (student prior ``prior``): the statistics, and the KL against
    the same teacher kind and against a low-rank teacher; causal + padding + every gradient switch on."""

    def side(p, sfx=""):
        return {f"PRIOR{sfx}": p, f"MASK_OUT{sfx}": p == 2, f"R_PAD{sfx}": 16}

    base = dict(CAUSAL=True, HAS_KPM=True, D_PAD=d_pad, IEEE=fp32, BLOCK_M=bm, BLOCK_N=bn)
    teachers = sorted({prior, LOWRANK})
    kl_side = dict(DT_PAD=d_pad, IEEE_T=fp32)
    if kernel in ("fwd", "mass"):
        return [{**base, **side(prior)}]
    if kernel == "klfwd":
        return [{**base, **kl_side, **side(prior), **side(t, "_T")} for t in teachers]
    extra = dict(NEED_DPRIOR=True, **({"NEED_DALPHA": True} if kernel == "dq" else {"LAG_T": 2 * max(bm, bn)}))
    stats = {**base, **extra, **side(prior), **side(0, "_T"), "DT_PAD": 16, "IEEE_T": False, "KL": False,
             "HAS_GH": True, "HAS_GM": True}
    kl = [{**base, **extra, **kl_side, **side(prior), **side(t, "_T"), "KL": True, "HAS_GH": False, "HAS_GM": False}
          for t in teachers]
    return [stats] + kl


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
        kernel, cls, d, prior = key.split("|")
        fp32 = cls == "32"
        for arch in ARCHS:
            for feats in variants(kernel, int(d), fp32, bm, bn, int(prior)):
                cases.append((arch, kernel, "fp32" if fp32 else "fp16", feats, w, s, mx))
    for kernel in S.KERNELS:  # bf16: one compile per kernel and architecture (lag prior)
        cfg = S.CONFIGS.get(f"{kernel}|16|64|1")
        if cfg:
            for arch in ARCHS:
                cases.append((arch, kernel, "bf16", variants(kernel, 64, False, cfg[0], cfg[1], 1)[-1], *cfg[2:]))
    return cases


def _pool(fn, items):
    """Results of ``fn`` over ``items``, in order, as they come, from worker processes spawned with
    TRITON_INTERPRET=0 (@triton.jit reads it when the kernels are imported)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        ctx = multiprocessing.get_context("spawn")
        import side_env

        workers = side_env.aot_workers()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            yield from pool.map(fn, items)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def test_configs_shape():
    """Lag-prior dk tiles are square (the lag-table partials' layout); 16-bit inputs at head dim <= 64 are served
    for every kernel and prior kind."""
    for key, (bm, bn, *_) in S.CONFIGS.items():
        if key.startswith("dk|") and key.endswith("|1"):
            assert bm == bn, key
    for kernel in S.KERNELS:
        for prior in range(5):
            assert f"{kernel}|16|64|{prior}" in S.CONFIGS, (kernel, prior)
    for version, repl in S.CONFIGS_BY_TRITON.items():  # replacements only swap existing keys' blocks
        for key, (bm, bn, *_rest) in repl.items():
            assert key in S.CONFIGS, (version, key)
            assert not (key.startswith("dk|") and key.endswith("|1")) or bm == bn, (version, key)


def gate() -> dict:
    rows = list(_pool(_compile_one, _cases()))
    problems = [f"spill / stack / shared memory over the limit: {r}" for r in rows if not _ok(r)]
    return {"triton": triton.__version__, "rows": rows, "problems": problems}


def test_aot_compile_stats_sm80_sm90(aot_env):
    """The gate under each environment whose Triton ``stats.GATED_TRITON`` lists; under another version the
    configs are used unverified and stats.describe_table() (python -m rapkern.info) says so."""
    import side_env

    from rapkern.backends.triton_attention import _config_tables as V

    if V.parse_version(aot_env.triton) not in S.GATED_TRITON:
        pytest.skip(f"statistics configs are gated under triton {S.GATED_TRITON} only, not {aot_env.triton} "
                    f"(used unverified there; see stats.describe_table())")
    report = side_env.run_json(aot_env, ["tests/test_triton_stats_compile.py", "--gate"], timeout=3600)
    print(f"\n[{aot_env.name}] triton {report['triton']}")
    print(f"{'arch':>4} {'kernel':>6} {'dtype':>5} {'prior':>7} {'kl':>5} {'D':>4} {'block':>9} {'w':>2} {'s':>2} "
          f"{'regs':>5} {'local':>6} {'stack':>6} {'smem':>7}")
    for r in report["rows"]:
        print(f"{r['arch']:>4} {r['kernel']:>6} {r['dtype']:>5} {str(r['prior']):>7} {str(r['kl']):>5} {r['d_pad']:>4} "
              f"{str(tuple(r['block'])):>9} {r['warps']:>2} {r['stages']:>2} {r['regs']:>5} {r['local']:>6} "
              f"{r['stack']:>6} {r['smem']:>7}")
    if os.environ.get("RAPKERN_AOT_REPORT"):
        with open(f"{os.environ['RAPKERN_AOT_REPORT']}.stats.{aot_env.name}.json", "w") as f:
            json.dump(report, f, indent=1)
    assert not report["problems"], f"[{aot_env.name}, triton {report['triton']}]\n" + "\n".join(report["problems"])


# ---------------------------------------------------------------------------------------------- search

# (BLOCK_M, BLOCK_N, warps, stages, maxnreg), large to small (the shapes that passed for the attention kernels
# first); maxnreg 255 lifts ptxas' occupancy target on the backward kernels (see stats.CONFIGS)
_ROW = [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 8, 2), (32, 32, 4, 1), (16, 32, 4, 1),
        (16, 16, 4, 1)]
_KEY = [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2), (32, 32, 4, 1), (16, 32, 4, 1),
        (16, 16, 4, 1)]
_SQUARE = [(64, 64, 8, 2), (64, 64, 4, 2), (32, 32, 8, 1), (32, 32, 4, 1), (16, 16, 4, 1)]
CANDIDATES = {
    "fwd": [(*c, 0) for c in _ROW],
    "mass": [(*c, 0) for c in _KEY],
    "klfwd": [(*c, 0) for c in _ROW],
    "dq": [(*c, 255) for c in _ROW],
    "dk": [(*c, 255) for c in _KEY],
}


def _search_key(key):
    """The first candidate (large to small) that is spill-free for every variant on both architectures."""
    kernel, cls, d, prior = key
    fp32 = cls == "32"
    cands = [(*c, 255) for c in _SQUARE] if (kernel, prior) == ("dk", 1) else CANDIDATES[kernel]
    for bm, bn, w, s, mx in cands:
        # heaviest first (KL with a low-rank teacher), so a spilling candidate is rejected after few compiles
        vs = variants(kernel, d, fp32, bm, bn, prior)[::-1]
        if all(_ok(_compile_one((a, kernel, "fp32" if fp32 else "fp16", f, w, s, mx))) for f in vs for a in ARCHS):
            return key, (bm, bn, w, s, mx)
    return key, None


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if "--gate" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--gate", action="store_true")
        ap.add_argument("--json", required=True)
        a = ap.parse_args()
        with open(a.json, "w") as f:
            json.dump(gate(), f, indent=1, default=list)
        sys.exit(0)
    keys = [(k, c, d, p) for k in S.KERNELS for c, ds in (("16", (64, 128, 256)), ("32", (64,))) for d in ds
            for p in range(5)]
    if len(sys.argv) > 1:
        keys = [k for k in keys if k[0] in sys.argv[1:]]
    for (kernel, cls, d, prior), cfg in _pool(_search_key, keys):
        if cfg:
            print(f'    "{kernel}|{cls}|{d}|{prior}": {cfg},', flush=True)
        else:
            print(f"    # {kernel}|{cls}|{d}|{prior}: none", flush=True)
