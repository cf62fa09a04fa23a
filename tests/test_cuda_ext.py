"""The CUDA extension (rapkern._C_cuda, csrc/cuda/, issue 15) on this CPU-only machine, plus its GPU checks.

CPU-only (run everywhere nvcc, a CUDA toolkit and a CUDA build of torch are present, else skipped with the
reason): the sources compile and link for sm_80 and sm_90a against torch (a private build cached under /tmp by
source hash, the flags of setup.py), the library loads without a GPU and registers ``rapkern::attention_fwd``
for the CUDA dispatch key, ``cuobjdump --dump-resource-usage`` shows no kernel spilling and static shared memory
within the 48 KB per-block limit, and the op's fake implementation gives the right shapes and dtypes for CUDA
tensors under FakeTensorMode. The "cuda" backend's reasons and its "not built" message are checked too.

Emulated (CPU-only, needs only the toolkit's headers): the forward kernel's own code (attention_fwd_kernel.cuh)
and the op's host side (fwd_problem.h) compiled by g++ under csrc/cuda/host_emulation.h (one std::thread per CUDA
thread, barriers, shuffles) and compared with the float64 reference (2x rule) and, for dropout, with the C++ CPU
kernels. It checks the kernel's arithmetic and indexing, not what only a GPU shows (races, SASS, speed).

``@pytest.mark.gpu`` (skipped without CUDA): numerics of the forward against the float64 reference with the 2x
rule, for every prior kind, dtype, head dim 64/128, causal, padding, GQA and odd lengths.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rapkern
from rapkern import _ext
from rapkern.backends.cuda import CudaBackend, _load
from rapkern.validate import AttentionProblem

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAPKERN_TEST_BUILD_DIR", "/tmp/rapkern-test-builds"))
ARCHS = ("sm_80", "sm_90a")
KERNELS_PER_ARCH = 6  # attention_fwd_kernel<{float, half, bf16}, {64, 128}>
STATIC_SMEM_LIMIT = 48 * 1024  # static __shared__ per block, every architecture
HAVE_CUDA = torch.cuda.is_available()


def _toolkit() -> str | None:
    """A CUDA toolkit folder with bin/nvcc and lib64/libcudart.so (torch's guess from nvcc's location can be
    wrong: /usr/local/bin/nvcc is a wrapper script here)."""
    guesses = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
               *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for d in guesses:
        has_rt = bool(d) and glob.glob(os.path.join(d, "lib64", "libcudart.so*"))
        if has_rt and os.path.isfile(os.path.join(d, "bin", "nvcc")):
            return d
    return None


def _cuobjdump(home: str | None) -> str | None:
    cands = [os.path.join(home, "bin", "cuobjdump")] if home else []
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except Exception:  # noqa: BLE001 - no triton: only the toolkit's
        pass
    cands.append(shutil.which("cuobjdump") or "")
    return next((c for c in cands if c and os.path.isfile(c)), None)


@pytest.fixture(scope="module")
def cuda_lib() -> Path:
    """Builds csrc/cuda/*.cu|*.cpp (less module.cpp) as a torch extension, loads it, returns the .so path."""
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build: the CUDA extension cannot be built")
    home = _toolkit()
    if home is None:
        pytest.skip("no CUDA toolkit (a folder with bin/nvcc and lib64/libcudart.so; set CUDA_HOME)")
    assert _ext.load() is None, _ext.load()  # the schemas (and fake implementations) come from rapkern._C
    sources = sorted(p for p in (ROOT / "csrc" / "cuda").glob("*") if p.suffix in (".cu", ".cpp", ".h"))
    key = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources)).hexdigest()[:12]
    build = CACHE / f"cuda_ext_{key}"
    build.mkdir(parents=True, exist_ok=True)
    name = f"rapkern_cuda_test_{key}"
    so = build / f"{name}.so"
    if so.exists() and not (build / "lock").exists():  # built (no build in flight): load without asking ninja
        torch.ops.load_library(str(so))
        return so
    os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = home
    compiled = [str(p) for p in sources if p.suffix in (".cu", ".cpp") and p.name != "module.cpp"]
    cpp_extension.load(
        name=name, sources=compiled, build_directory=str(build), extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O3", "-g0"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", "-gencode", "arch=compute_80,code=sm_80",
                           "-gencode", "arch=compute_90a,code=sm_90a"],
        is_python_module=False, verbose=False)
    return so


# ------------------------------------------------------------------------------------------- build and load


def test_registers_the_cuda_attention_ops_without_a_gpu(cuda_lib):
    for op in ("attention_fwd", "attention_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rapkern::{op}", "CUDA"), op


def _resource_usage(so: Path) -> dict[str, list[dict[str, int]]]:
    tool = _cuobjdump(_toolkit())
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or the triton wheel's copy)")
    res = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    usage: dict[str, list[dict[str, int]]] = {}
    arch = None
    func = None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            usage.setdefault(arch, [])
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if "REG:" in line and arch is not None:
            fields = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            fields["name"] = func
            usage[arch].append(fields)
    return usage


def test_kernels_do_not_spill_and_fit_shared_memory(cuda_lib):
    usage = _resource_usage(cuda_lib)
    assert set(ARCHS) <= set(usage), f"architectures in the module: {sorted(usage)}"
    for arch in ARCHS:
        kernels = [k for k in usage[arch] if "attention_fwd_kernel" in str(k["name"])]
        assert len(kernels) == KERNELS_PER_ARCH, (arch, [k["name"] for k in usage[arch]])
        for k in usage[arch]:  # every kernel of the module (forward, backward, routing)
            what = f"{arch} {k['name']}: {k}"
            assert k["LOCAL"] == 0 and k["STACK"] == 0, f"register spill / local memory: {what}"
            assert k["SHARED"] <= STATIC_SMEM_LIMIT, f"static shared memory above 48 KB: {what}"
            assert k["REG"] <= 255, what


# ------------------------------------------------------------------------------------------- fake tensors

KINDS = {"none": 0, "lag": 1, "banded": 2, "banded_masked": 2, "lowrank": 3, "dense": 4}


def _prior_args(kind, lead, lq, lk, dev):
    f = dict(device=dev, dtype=torch.float32)
    if kind == "none":
        return None, None
    if kind == "lag":
        return torch.empty(*lead, 7, **f), None
    if kind.startswith("banded"):
        return torch.empty(*lead, lq, 5, **f), None
    if kind == "lowrank":
        return torch.empty(*lead, lq, 4, **f), torch.empty(*lead, lk, 4, **f)
    return torch.empty(*lead, lq, lk, **f), None


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_tensor_mode_shapes_on_cuda(kind, dtype):
    """The op traced with fake CUDA tensors (what torch.compile sees): out (B, Hq, Lq, Dv) in q's dtype, lse
    (B, Hq, Lq) float32, both on q's CUDA device; GQA, Lq != Lk, broadcast prior leading dims."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert _ext.load() is None, _ext.load()
    B, Hq, Hkv, lq, lk, d = 2, 4, 2, 37, 53, 64
    with FakeTensorMode(allow_non_fake_inputs=False):
        dev = torch.device("cuda", 0)
        q = torch.empty(B, Hq, lq, d, device=dev, dtype=dtype)
        k = torch.empty(B, Hkv, lk, d, device=dev, dtype=dtype)
        v = torch.empty(B, Hkv, lk, d, device=dev, dtype=dtype)
        kpm = torch.zeros(B, lk, device=dev, dtype=torch.bool)
        alpha = torch.empty(Hq, device=dev, dtype=torch.float32)
        p0, p1 = _prior_args(kind, (1, Hq), lq, lk, dev)
        out, lse = torch.ops.rapkern.attention_fwd(q, k, v, kpm, alpha, 1.0, KINDS[kind], p0, p1,
                                                   kind == "banded_masked", True, 0.125, 0.0, 0)
        assert out.shape == (B, Hq, lq, d) and out.dtype == dtype and out.device.type == "cuda"
        assert lse.shape == (B, Hq, lq) and lse.dtype == torch.float32 and lse.device.type == "cuda"


# ------------------------------------------------------------------------------------------- the backend


def _problem(device="meta", dtype=torch.float16, d=64, dv=None, grad=False, prior=None):
    dv = d if dv is None else dv
    q = torch.empty(1, 2, 8, d, device=device, dtype=dtype, requires_grad=grad)
    k = torch.empty(1, 2, 8, d, device=device, dtype=dtype)
    v = torch.empty(1, 2, 8, dv, device=device, dtype=dtype)
    return AttentionProblem(q=q, k=k, v=v, prior=prior, alpha=1.0, causal=False, key_padding_mask=None,
                            scale=d ** -0.5, dropout_p=0.0)


def test_backend_reasons():
    be = CudaBackend()
    assert be.auto_devices == () and be.name == "cuda"  # explicit only until a GPU run has checked it
    assert "unverified" in be.status and not be.verified_on_gpu
    assert any("device type 'cpu'" in r for r in be.attention_reasons(_problem("cpu")))
    assert any("float64" in r for r in be.attention_reasons(_problem(dtype=torch.float64)))
    assert any("head dims D = 80" in r for r in be.attention_reasons(_problem(d=80)))
    assert any("Dv = 128" in r for r in be.attention_reasons(_problem(d=64, dv=128)))
    assert not any("grad" in r for r in be.attention_reasons(_problem(d=128, grad=True)))  # backward served
    meta_ok = [r for r in be.attention_reasons(_problem(d=128)) if "device type" not in r]
    assert meta_ok == []  # only the device stands between a meta problem and the kernel


def test_backend_not_built_reason(monkeypatch, tmp_path):
    """Without the module the backend says "rapkern._C_cuda not built: <reason>", with the build note's first
    line when setup.py left one."""
    monkeypatch.setattr(_ext.importlib, "import_module", _raise_missing)
    monkeypatch.setattr(_ext, "_HERE", tmp_path)
    monkeypatch.setattr(_load, "_STATE", {})
    if torch.version.cuda is None or _ext.load() is not None:
        assert _load.load().startswith("rapkern._C_cuda not built: ")
        return
    assert _load.load().startswith("rapkern._C_cuda not built: the module is not in the installed package")
    (tmp_path / "_C_cuda_build.txt").write_text("the build failed: nvcc error X\ncompiler output ...\n")
    monkeypatch.setattr(_load, "_STATE", {})
    assert _load.load() == ("rapkern._C_cuda not built: the build failed: nvcc error X; "
                            "rapkern/_C_cuda_build.txt has the rest")


def _raise_missing(name):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_auto_never_picks_cuda_backend():
    from rapkern import dispatch

    assert "cuda" in [b.name for b in dispatch.backends()]
    assert "cuda" not in [b.name for b in dispatch._auto_candidates("cuda")]


# ------------------------------------------------------------------------------------------- emulated kernel

EMU_SOURCE = r"""
#include "cuda/host_emulation.h"
#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/fwd_problem.h"
#include <torch/library.h>

namespace {
using namespace rapkern::cuda;

template <typename T>
void run(const FwdParams& p) {
  const emu::Dim grid{static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>(cdiv(p.Lq, fwd::BM)), 1};
  if (p.D == 64) emu::launch(fwd::attention_fwd_kernel<T, 64>, grid, fwd::NT, p);
  else emu::launch(fwd::attention_fwd_kernel<T, 128>, grid, fwd::NT, p);
}

// The CUDA op's host side (make_fwd_params) and kernel, run on CPU tensors through the emulation.
std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kpm,
    const std::optional<at::Tensor>& alpha, double alpha_value, int64_t prior_kind,
    const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1, bool mask_outside,
    bool causal, double scale, double dropout_p, int64_t seed) {
  std::vector<at::Tensor> held;
  FwdParams p = host::make_fwd_params(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside,
                                      causal, scale, dropout_p, seed, false, held);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (p.B * p.Hq * p.Lq == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(p); break;
    case at::kHalf: run<__half>(p); break;
    default: run<__nv_bfloat16>(p); break;
  }
  return {out, lse};
}
}  // namespace

TORCH_LIBRARY(rapkern_cuda_emu, m) { m.def("attention_fwd", &attention_fwd); }
"""


def load_emulation(source: str, namespace: str, op: str, tag: str):
    """Compiles ``source`` (C++ that includes csrc/cuda/host_emulation.h and kernel headers, defining ``op``
    among others in ``namespace``) with g++, cached under CACHE by the hash of csrc/cuda's headers and the
    source; returns ``torch.ops.<namespace>``. Skips without the toolkit's headers."""
    home = _toolkit()
    if home is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h, cuda_bf16.h; set CUDA_HOME)")
    from torch.utils import cpp_extension

    ops = getattr(torch.ops, namespace)
    files = sorted((ROOT / "csrc" / "cuda").glob("*.h")) + sorted((ROOT / "csrc" / "cuda").glob("*.cuh"))
    key = hashlib.sha256(b"".join(p.read_bytes() for p in files) + source.encode()).hexdigest()[:12]
    build = CACHE / f"{tag}_{key}"
    build.mkdir(parents=True, exist_ok=True)
    name = f"rapkern_{tag}_{key}"
    so = build / f"{name}.so"
    if not hasattr(ops, op):  # not loaded in this process yet
        if so.exists() and not (build / "lock").exists():
            torch.ops.load_library(str(so))
        else:
            src = build / "emu.cpp"
            src.write_text(source)
            cpp_extension.load(name=name, sources=[str(src)], build_directory=str(build),
                               extra_include_paths=[str(ROOT / "csrc"), os.path.join(home, "include")],
                               extra_cflags=["-O2", "-g0", "-std=c++20", "-pthread"], extra_ldflags=["-pthread"],
                               is_python_module=False, verbose=False)
    return ops


@pytest.fixture(scope="module")
def emulated():
    """The CUDA forward kernel's own code (attention_fwd_kernel.cuh) with the CUDA op's host side
    (fwd_problem.h), compiled by g++ under csrc/cuda/host_emulation.h; torch.ops.rapkern_cuda_emu.attention_fwd."""
    return load_emulation(EMU_SOURCE, "rapkern_cuda_emu", "attention_fwd", "cuda_emu").attention_fwd


EMU_CASES = [
    # kind, dtype, d, causal, padding, (B, Hq, Hkv, Lq, Lk), lead, alpha
    ("none", torch.float32, 64, False, False, (1, 2, 1, 70, 45), (), 1.0),
    ("lag", torch.float32, 64, True, True, (2, 2, 1, 70, 45), (2,), "heads"),
    ("lag", torch.bfloat16, 128, False, False, (1, 1, 1, 9, 100), (), 0.5),
    ("banded", torch.float16, 64, True, False, (1, 2, 2, 66, 66), (1, 2), "heads"),
    ("banded_masked", torch.float32, 64, False, True, (1, 2, 1, 130, 97), (2,), 0.0),
    ("banded_masked", torch.float32, 64, True, False, (1, 1, 1, 100, 100), (), 1.5),
    ("lowrank", torch.float32, 128, True, True, (2, 2, 2, 33, 65), (2, 1), "heads"),
    ("dense", torch.float32, 64, True, True, (2, 2, 1, 40, 37), (1, 2), "heads"),
    ("dense", torch.float16, 64, False, False, (1, 2, 1, 64, 64), (), 0.0),
]


@pytest.mark.parametrize("kind,dtype,d,causal,padding,shape,lead,alpha", EMU_CASES)
def test_emulated_kernel_matches_reference(emulated, kind, dtype, d, causal, padding, shape, lead, alpha):
    """The kernel's numerics on the CPU (through the emulation) against the float64 reference, 2x rule: every
    prior kind, broadcast leading dims, per-head/zero alpha, causal, padding with fully padded rows, GQA,
    several q blocks and key tiles with partial ends, Lq != Lk, fp32/fp16/bf16, head dims 64 and 128."""
    from rapkern.testing import assert_close_to_reference, reference_attention

    B, Hq, Hkv, lq, lk = shape
    g = helpers.gen(lq * 7 + lk)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
               for s in ((B, Hq, lq, d), (B, Hkv, lk, d), (B, Hkv, lk, d)))
    q = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # non-unit last stride: the host side copies it
    prior = helpers.make_prior(kind, lead, lq, lk, gen=g, dtype=torch.float32, w=9, r=3, requires_grad=False)
    if kind == "dense":
        prior.bias[..., 3, :] = float("-inf")  # a fully masked row for every alpha
        prior.bias[..., 5, 2:9] = float("-inf")
    a_t = torch.linspace(-1.0, 1.5, Hq) if alpha == "heads" else None
    a_ref = a_t if a_t is not None else alpha
    kpm = None
    if padding:
        kpm = torch.rand(B, lk, generator=g) < 0.3
        kpm[-1, :] = True if B > 1 else kpm[-1, :]
    kind_id = KINDS[kind]
    p0 = p1 = None
    if prior is not None:
        p0, p1 = (prior.u, prior.v) if kind == "lowrank" else (prior.tensors()[0], None)
    scale = d ** -0.5
    out, lse = emulated(q, k, v, kpm, a_t, 0.0 if a_t is not None else float(alpha), kind_id, p0, p1,
                        kind == "banded_masked", causal, scale, 0.0, 0)
    kw = dict(prior=prior, alpha=a_ref, causal=causal, key_padding_mask=kpm, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, **kw)
    low, low_lse = reference_attention(q, k, v, compute_dtype=dtype, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to_reference("out", out, ref, low, helpers.scaled_floor(FLOOR, dtype, ref))
    assert_close_to_reference("lse", lse, ref_lse, low_lse, helpers.scaled_floor(LSE_FLOOR, dtype, ref_lse))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.equal(out[torch.isneginf(lse)], torch.zeros_like(out[torch.isneginf(lse)]))


def test_emulated_kernel_dropout_equals_cpu_kernels(emulated):
    """Dropout: the same mask and scaling as the C++ CPU kernels (rapkern._C) with the same seed."""
    assert _ext.load() is None, _ext.load()
    g = helpers.gen(11)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g) for n in (70, 50, 50))
    table = torch.randn(2, 9, generator=g)
    args = (q, k, v, None, None, 0.7, 1, table, None, False, True, 0.125, 0.25, 123456789)
    out, lse = emulated(*args)
    ref, ref_lse = torch.ops.rapkern.attention_fwd(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    plain, _ = emulated(*args[:-2], 0.0, 0)
    assert (out - plain).abs().max() > 1e-2  # dropout changed something


def test_emulated_kernel_edge_lengths(emulated):
    """No keys at all (Lk = 0): out 0, lse -inf; one query and one key: softmax is exactly 1 (out = v)."""
    q = torch.randn(2, 2, 3, 64)
    out, lse = emulated(q, q[:, :, :0], q[:, :, :0], None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    k, v = torch.randn(2, 1, 1, 64), torch.randn(2, 1, 1, 64)
    out, lse = emulated(q[:, :, :1], k, v, None, None, 1.0, 0, None, None, False, True, 0.125, 0.0, 0)
    torch.testing.assert_close(out, v.expand(2, 2, 1, 64), rtol=0, atol=0)
    torch.testing.assert_close(lse, (q[:, :, :1] * k).sum(-1) * 0.125, rtol=1e-6, atol=1e-6)


def test_emulated_host_side_rejects_bad_inputs(emulated):
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="head dims D = 32"):
        emulated(q[..., :32], q[..., :32], q[..., :32], None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="k must have q's dtype"):
        emulated(q, q.half(), q, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="RelativeLagPrior.table must not contain non-finite"):
        emulated(q, q, q, None, None, 1.0, 1, torch.tensor([0.0, float("nan"), 1.0]), None, False, False, 1.0, 0.0, 0)


# ------------------------------------------------------------------------------------------- GPU numerics

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LSE_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _check_forward(q, k, v, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None):
    from rapkern.testing import assert_close_to_reference, reference_attention

    assert CudaBackend().availability() is None, CudaBackend().availability()
    kw = dict(prior=prior, alpha=alpha, causal=causal, key_padding_mask=key_padding_mask, return_lse=True)
    with torch.no_grad():
        out, lse = rapkern.attention(q, k, v, backend="cuda", **kw)
        ref, ref_lse = reference_attention(q, k, v, **kw)
        low, low_lse = reference_attention(q, k, v, compute_dtype=q.dtype, **kw)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close_to_reference("out", out, ref, low, helpers.scaled_floor(FLOOR, q.dtype, ref))
    assert_close_to_reference("lse", lse, ref_lse, low_lse, helpers.scaled_floor(LSE_FLOOR, q.dtype, ref_lse))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert torch.equal(out[torch.isneginf(lse)], torch.zeros_like(out[torch.isneginf(lse)]))


def _qkv(b, hq, hkv, lq, lk, d, dtype, seed):
    g = helpers.gen(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).cuda()
            for s in ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d))]


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["none", "lag", "banded", "banded_masked", "lowrank", "dense"])
@pytest.mark.parametrize("mask", ["plain", "causal+padding"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_forward_matches_reference(kind, dtype, mask, d):
    lq, lk = 257, 200  # several q blocks and key tiles, both partial
    q, k, v = _qkv(2, 4, 2, lq, lk, d, dtype, seed=d)
    prior = helpers.make_prior(kind, (4,), lq, lk, gen=helpers.gen(2), dtype=torch.float32, w=17, r=8,
                               requires_grad=False, device="cuda")
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], device="cuda")
    kpm = None
    if mask != "plain":
        kpm = torch.rand(2, lk, generator=helpers.gen(7)) < 0.3
        kpm[1, :] = True  # batch 1: every key padded -> rows with no visible key (out 0, lse -inf)
        kpm = kpm.cuda()
    _check_forward(q, k, v, prior=prior, alpha=alpha, causal=mask != "plain", key_padding_mask=kpm)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("lead", [(), (1,), (2, 1), (1, 3)])
@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_gpu_prior_broadcast_and_layouts(kind, lead):
    """Prior leading dims (), (Hp,), (Bp, Hp); float16 prior and () alpha (converted on the host side);
    transposed q (non-unit last stride: copied), Lq < Lk, Lq = 1."""
    for lq, lk in ((1, 70), (65, 130)):
        q, k, v = _qkv(2, 3, 3, lq, lk, 64, torch.bfloat16, seed=lq)
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        prior = helpers.make_prior(kind, lead, lq, lk, gen=helpers.gen(3), dtype=torch.float16, w=5, r=3,
                                   requires_grad=False, device="cuda")
        _check_forward(q, k, v, prior=prior, alpha=torch.tensor(0.9, device="cuda"), causal=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_gpu_dropout_is_reproducible_and_equals_the_cpu_kernels_mask():
    """Same seed, same result; and the same mask as the C++ CPU kernels (same hash and element counter), so
    the CUDA output matches the cpp backend's on the same fp32 inputs."""
    q, k, v = _qkv(1, 2, 2, 100, 130, 64, torch.float32, seed=5)
    prior = helpers.make_prior("lag", (), 100, 130, gen=helpers.gen(3), dtype=torch.float32, w=9,
                               requires_grad=False, device="cuda")
    kw = dict(prior=prior, alpha=0.5, causal=True, dropout_p=0.3)
    with torch.no_grad():
        torch.manual_seed(0)
        a = rapkern.attention(q, k, v, backend="cuda", **kw)
        torch.manual_seed(0)
        b = rapkern.attention(q, k, v, backend="cuda", **kw)
        plain = rapkern.attention(q, k, v, backend="cuda", **{**kw, "dropout_p": 0.0})
        torch.manual_seed(0)
        cpu_prior = prior.with_tensors(*(t.cpu() for t in prior.tensors()))
        ref = rapkern.attention(q.cpu(), k.cpu(), v.cpu(), backend="cpp", **{**kw, "prior": cpu_prior})
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    torch.testing.assert_close(a.cpu(), ref, rtol=1e-4, atol=1e-5)
