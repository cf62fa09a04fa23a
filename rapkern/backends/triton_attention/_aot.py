"""Ahead-of-time compilation of one attention launch key, and the compiled kernel's registers / spills.

One place for what tools/gen_triton_configs.py (table search), tests/test_triton_compile.py (the CI gate)
and configs.py (first-use check on a GPU under a Triton version without a verified table) compile:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the constexprs of the heaviest
variant of a launch key (causal masking and key padding on, the class's switches on; every other switch
only removes live state), the pointer / stride specializations the JIT makes for typical inputs, and
``num_warps`` / ``num_stages`` of the config.

Resource usage comes from the ``cuobjdump --dump-resource-usage`` shipped in the Triton wheel (no GPU
needed) or, on a GPU, from loading the cubin (``CompiledKernel.n_regs`` / ``n_spills``).
Imports triton lazily: importing this module costs nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory per block (opt-in maximum)
KERNELS = ("fwd", "dq", "dkdv")
FP32_PTRS = {"Lse", "Delta", "Alpha", "DA", "DL", "DPR", "P_ptr", "P2_ptr"}
DATA_PTRS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_"}
FLOAT_ARGS = {"qk_scale", "scale", "dropout_p"}
# What the JIT specializes for typical inputs: 16-divisible pointers, row strides and head dims
# (``tt.divisibility``), and unit column strides of the prior tensors (constant 1).
DIV16 = {"D", "DV", "dpr_r", "dl_bh", "da_bh"}
UNIT = {"sp_c": 1, "sp2_c": 1}


def kernel_fn(kernel: str):
    """The @triton.jit function of ``kernel`` (import with TRITON_INTERPRET=0 for compiling)."""
    if kernel == "fwd":
        from ._fwd_kernel import _attn_fwd_kernel

        return _attn_fwd_kernel
    from ._dkdv_kernel import _attn_bwd_dkdv_kernel
    from ._dq_kernel import _attn_bwd_dq_kernel

    return {"dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}[kernel]


def features(kernel: str, cls: str, prior: int, d_pad: int, bm: int, bn: int) -> dict:
    """Constexprs of the heaviest launch of key (kernel, feature class ``cls``, prior kind, head dim) at
    blocks (bm, bn): causal + key padding, band masking for the banded prior, the class's switches.
    ``cls`` "laggrad" is dk/dv with the lag-table gradient (the fixed square tile)."""
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


def _signature(fn, dtype: str, constexprs: dict) -> dict:
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


def _attrs(fn, sig: dict) -> dict:
    out = {}
    for i, name in enumerate(fn.arg_names):
        if sig[name].startswith("*") or name in DIV16 or (name.startswith("s") and "_" in name and sig[name] == "i32"):
            out[(i,)] = [["tt.divisibility", 16]]
    return out


def _with_defaults(fn, consts: dict) -> dict:
    """Constexpr parameters the key does not set take their declared default (a kernel may grow switches
    without breaking the gate); one without a default is an error that names it."""
    import inspect

    out = dict(consts)
    for p in fn.params:
        if p.is_constexpr and p.name not in out:
            if p._param.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.__name__}: constexpr {p.name} has no default and no value in the AOT key")
            out[p.name] = p._param.default
    return out


def compile_case(arch: int, kernel: str, dtype: str, feats: dict, warps: int, stages: int, target=None):
    """triton.compile of one case; ``target`` defaults to GPUTarget("cuda", arch, 32)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel_fn(kernel)
    consts = _with_defaults(fn, {**feats, **{k: v for k, v in UNIT.items() if k in fn.arg_names}})
    sig = _signature(fn, dtype, consts)
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=_attrs(fn, sig))
    return triton.compile(src, target=target or GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps, "num_stages": stages})


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack, static shared and local (spill) bytes of a cubin, read with cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        txt = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", txt)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource line:\n{txt}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "static_smem": shared, "local": local}


def case_resources(case) -> dict:
    """Compile ``case`` = (arch, kernel, dtype, constexprs, warps, stages) and read its resources (cuobjdump)."""
    arch, kernel, dtype, feats, warps, stages = case
    ck = compile_case(arch, kernel, dtype, feats, warps, stages)
    res = cubin_resources(ck.asm["cubin"])
    res.update(arch=arch, kernel=kernel, dtype=dtype, prior=feats["PRIOR"], d_pad=feats["D_PAD"],
               block=(feats["BLOCK_M"], feats["BLOCK_N"]), warps=warps, stages=stages,
               smem=max(ck.metadata.shared, res["static_smem"]),
               heavy=bool(feats["DROPOUT"]), ieee=bool(feats["IEEE"]))
    return res


def spill_free(res: dict) -> bool:
    return res["local"] == 0 and res["stack"] == 0 and res["smem"] <= SMEM_LIMIT[80 if res["arch"] < 90 else 90]


def loaded_spills(kernel: str, cls: str, prior: int, d_pad: int, cfg: tuple, dtype: str = "fp16") -> tuple[int, int]:
    """(n_regs, n_spills) of the heaviest variant of a launch key, compiled for the current GPU and loaded
    on it (what the driver reports for the kernel a launch would run). Needs CUDA."""
    import triton

    target = triton.runtime.driver.active.get_current_target()
    bm, bn, w, s = cfg
    ck = compile_case(target.arch, kernel, dtype, features(kernel, cls, prior, d_pad, bm, bn), w, s, target=target)
    ck._init_handles()  # loads the module: sets n_regs / n_spills (raises OutOfResources on shared memory)
    return ck.n_regs, ck.n_spills
