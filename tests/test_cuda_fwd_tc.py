"""The tensor-core CUDA forward (csrc/cuda/attention_fwd_tc_kernel.cuh, csrc/cuda/mma.h; issue 15) on a CPU.

Emulated (needs only the toolkit's headers): the kernel's own code and the op's host side (fwd_problem.h) compiled
by g++ under csrc/cuda/host_emulation.h, where mma.h's warp-collective mma.sync m16n8k16 is a transcription of the
PTX fragment layouts (each lane publishes its registers, each computes its own accumulator elements from all 32).
  (a) the layout probe: a one-warp kernel built from mma.h's fragment helpers (the ones the attention kernel uses;
      B fragments by plain shared loads or by the emulated ldmatrix) computes S = A·Bᵀ and O = round(S)·V, against
      torch matmul: exactly on small integers, closely on randoms;
  (b) the attention kernel against the float64 reference with the 2x rule: test_cuda_ext's emulated cases in
      fp16/bf16 plus every prior kind, mask_outside, causal + padding, GQA, Lq != Lk, partial tiles, empty rows,
      and dropout against a reference that applies the same counter-based mask (csrc/dropout_hash.h in numpy).
Built module (nvcc, shared with test_cuda_ext): the tensor-core kernels do not spill and fit static shared memory.
``@pytest.mark.gpu``: the real op on fp16/bf16 against the reference, and against the SIMT kernel
(RAPKERN_CUDA_FWD_SIMT=1). Only a GPU run checks the hardware's mma, races and the SASS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402
import test_cuda_ext as ext  # noqa: E402
from test_cuda_ext import cuda_lib  # noqa: E402,F401 - the built-module fixture

from rapkern.testing import assert_close_to_reference, reference_attention  # noqa: E402

TC_KERNELS_PER_ARCH = 4  # attention_fwd_tc_kernel<{half, bf16}, {64, 128}>

TC_EMU_SOURCE = r"""
#include "cuda/host_emulation.h"
#include "cuda/attention_fwd_tc_kernel.cuh"
#include "cuda/fwd_problem.h"
#include <torch/library.h>

namespace {
using namespace rapkern::cuda;

// One warp: S (16 x 16) = A (16 x 32) · Bk (16 x 32)ᵀ, then O (16 x 16) = round_T(S) · V (16 x 16), with the
// fragment helpers of mma.h exactly as the attention kernel uses them (Q row-major, K n-major, V k-major, P from
// accumulators); B fragments by plain loads or (kLdsm) by ldmatrix from shared memory.
template <typename T, bool kLdsm>
void probe_kernel(const T* a_in, const T* bk_in, const T* v_in, float* s_out, float* o_out) {
  __shared__ __align__(16) T a[16 * 32];
  __shared__ __align__(16) T bk[16 * 32];
  __shared__ __align__(16) T v[16 * 16];
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < 16 * 32; e += 32) a[e] = a_in[e], bk[e] = bk_in[e];
  for (int e = lane; e < 16 * 16; e += 32) v[e] = v_in[e];
  __syncwarp();
  float s[2][4] = {}, o[2][4] = {};
  uint32_t qa[2][4];
  for (int kc = 0; kc < 2; ++kc) mma::a_from_row_major<T>(qa[kc], a + 16 * kc, 32, lane);
  for (int n = 0; n < 2; ++n) {
    uint32_t kb[2][2];
    if (kLdsm) {
      mma::b2_from_n_major_ldsm<T>(kb[0], kb[1], bk + 8 * n * 32, 32, lane);
    } else {
      for (int kc = 0; kc < 2; ++kc) mma::b_from_n_major<T>(kb[kc], bk + 8 * n * 32 + 16 * kc, 32, lane);
    }
    for (int kc = 0; kc < 2; ++kc) mma::mma_16816<T>(s[n], qa[kc], kb[kc]);
  }
  uint32_t pa[4];
  mma::a_from_accumulators<T>(pa, s[0], s[1]);
  uint32_t vb[2][2];
  if (kLdsm) {
    mma::b2_from_k_major_ldsm<T>(vb[0], vb[1], v, 16, lane);
  } else {
    for (int n = 0; n < 2; ++n) mma::b_from_k_major<T>(vb[n], v + 8 * n, 16, lane);
  }
  for (int n = 0; n < 2; ++n) mma::mma_16816<T>(o[n], pa, vb[n]);
  for (int n = 0; n < 2; ++n) {
    for (int e = 0; e < 4; ++e) {
      const int idx = mma::c_row(lane, e) * 16 + 8 * n + mma::c_col(lane, e);
      s_out[idx] = s[n][e];
      o_out[idx] = o[n][e];
    }
  }
}

template <typename T>
void probe(const at::Tensor& a, const at::Tensor& bk, const at::Tensor& v, at::Tensor& s, at::Tensor& o,
           bool ldsm) {
  const auto* pa = static_cast<const T*>(a.data_ptr());
  const auto* pb = static_cast<const T*>(bk.data_ptr());
  const auto* pv = static_cast<const T*>(v.data_ptr());
  if (ldsm) emu::launch(probe_kernel<T, true>, emu::Dim{1, 1, 1}, 32, pa, pb, pv, s.data_ptr<float>(),
                        o.data_ptr<float>());
  else emu::launch(probe_kernel<T, false>, emu::Dim{1, 1, 1}, 32, pa, pb, pv, s.data_ptr<float>(),
                   o.data_ptr<float>());
}

std::tuple<at::Tensor, at::Tensor> mma_probe(const at::Tensor& a, const at::Tensor& bk, const at::Tensor& v,
                                             bool ldsm) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 32}) && bk.sizes() == at::IntArrayRef({16, 32}) &&
              v.sizes() == at::IntArrayRef({16, 16}), "mma_probe: shapes (16, 32), (16, 32), (16, 16)");
  TORCH_CHECK(a.is_contiguous() && bk.is_contiguous() && v.is_contiguous(), "mma_probe: contiguous inputs");
  at::Tensor s = at::zeros({16, 16}, a.options().dtype(at::kFloat)), o = at::zeros_like(s);
  if (a.scalar_type() == at::kHalf) probe<__half>(a, bk, v, s, o, ldsm);
  else probe<__nv_bfloat16>(a, bk, v, s, o, ldsm);
  return {s, o};
}

template <typename T>
void run(const FwdParams& p) {
  const emu::Dim grid{static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>(cdiv(p.Lq, fwd_tc::BM)), 1};
  if (p.D == 64) emu::launch(fwd_tc::attention_fwd_tc_kernel<T, 64>, grid, fwd_tc::NT, p);
  else emu::launch(fwd_tc::attention_fwd_tc_kernel<T, 128>, grid, fwd_tc::NT, p);
}

// The CUDA op's host side (make_fwd_params) and the tensor-core kernel, run on CPU tensors through the emulation.
std::tuple<at::Tensor, at::Tensor> attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& kpm,
    const std::optional<at::Tensor>& alpha, double alpha_value, int64_t prior_kind,
    const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1, bool mask_outside,
    bool causal, double scale, double dropout_p, int64_t seed) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "the tensor-core kernel serves float16 and bfloat16, got ", q.scalar_type());
  std::vector<at::Tensor> held;
  FwdParams p = host::make_fwd_params(q, k, v, kpm, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside,
                                      causal, scale, dropout_p, seed, false, held);
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  if (p.B * p.Hq * p.Lq == 0) return {out, lse};
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (q.scalar_type() == at::kHalf) run<__half>(p);
  else run<__nv_bfloat16>(p);
  return {out, lse};
}
}  // namespace

TORCH_LIBRARY(rapkern_cuda_tc_emu, m) {
  m.def("attention_fwd", &attention_fwd);
  m.def("mma_probe", &mma_probe);
}
"""

DTYPES = [torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def tc_ops():
    """torch.ops.rapkern_cuda_tc_emu: attention_fwd (the tensor-core kernel) and mma_probe, emulated."""
    return ext.load_emulation(TC_EMU_SOURCE, "rapkern_cuda_tc_emu", "mma_probe", "cuda_tc_emu")


# ------------------------------------------------------------------------------------------- (a) layouts


@pytest.mark.parametrize("ldsm", [False, True], ids=["plain", "ldmatrix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_mma_fragments_on_small_integers_are_exact(tc_ops, dtype, ldsm):
    """Small integers: every product and sum is exact in fp32, S (|S| <= 192) is exact in fp16 and bf16 (bf16 holds
    integers up to 256), so S and O = round(S)·V must equal the float64 matmuls bit for bit: any misplaced element
    of any fragment shows."""
    g = helpers.gen(1)
    a = torch.randint(-3, 4, (16, 32), generator=g).to(dtype)
    bk = torch.randint(-2, 3, (16, 32), generator=g).to(dtype)  # |S| <= 32 * 3 * 2 = 192
    v = torch.randint(-2, 3, (16, 16), generator=g).to(dtype)
    s, o = tc_ops.mma_probe(a, bk, v, ldsm)
    s_ref = a.double() @ bk.double().T
    assert torch.equal(s.double(), s_ref)
    assert torch.equal(o.double(), s_ref @ v.double())  # |O| <= 16 * 192 * 2: exact in fp32


@pytest.mark.parametrize("ldsm", [False, True], ids=["plain", "ldmatrix"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_mma_fragments_on_random_values(tc_ops, dtype, ldsm):
    g = helpers.gen(2)
    a, bk = (torch.randn(16, 32, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(16, 16, generator=g).to(dtype)
    s, o = tc_ops.mma_probe(a, bk, v, ldsm)
    s_ref = a.double() @ bk.double().T
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)  # fp32 sums of exact products
    o_ref = s.to(dtype).double() @ v.double()  # P is rounded to the input dtype before the second product
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- (b) attention

TC_CASES = [case for case in ext.EMU_CASES if case[1] in DTYPES] + [
    # kind, dtype, d, causal, padding, (B, Hq, Hkv, Lq, Lk), lead, alpha
    ("none", torch.bfloat16, 64, True, True, (2, 4, 2, 70, 45), (), 1.0),            # GQA, Lq > Lk, empty rows
    ("lag", torch.float16, 64, True, True, (2, 2, 1, 70, 45), (2,), "heads"),
    ("lag", torch.float16, 128, False, False, (1, 2, 1, 17, 130), (), 0.7),          # 3 key tiles, last partial
    ("banded", torch.bfloat16, 128, False, True, (1, 2, 1, 65, 80), (2,), "heads"),
    ("banded_masked", torch.bfloat16, 64, False, True, (1, 2, 1, 130, 97), (2,), 0.0),  # masks even at alpha 0
    ("banded_masked", torch.float16, 64, True, False, (1, 1, 1, 100, 100), (), 1.5),
    ("lowrank", torch.float16, 128, True, True, (2, 2, 2, 33, 65), (2, 1), "heads"),
    ("lowrank", torch.bfloat16, 64, False, False, (1, 2, 2, 1, 17), (), 1.0),         # Lq = 1
    ("dense", torch.bfloat16, 64, True, True, (2, 2, 1, 40, 37), (1, 2), "heads"),  # -inf rows for every alpha
    ("dense", torch.float16, 128, False, False, (1, 1, 1, 113, 97), (), 2.0),
]


@pytest.mark.parametrize("kind,dtype,d,causal,padding,shape,lead,alpha", TC_CASES)
def test_emulated_tc_kernel_matches_reference(tc_ops, kind, dtype, d, causal, padding, shape, lead, alpha):
    """test_cuda_ext's check (2x rule on out and lse, -inf rows exactly where the reference has them, out 0 there)
    run on the tensor-core kernel."""
    ext.test_emulated_kernel_matches_reference(tc_ops.attention_fwd, kind, dtype, d, causal, padding, shape, lead,
                                               alpha)


def _keep_mask(seed: int, shape: tuple[int, int, int, int], p: float) -> torch.Tensor:
    """csrc/dropout_hash.h in numpy: element (b, h, i, j) of a (B, Hq, Lq, Lk) problem is kept iff
    dropout_uniform(seed, ((b·Hq + h)·Lq + i)·Lk + j) >= p (float32 comparison, as the kernels do)."""
    with np.errstate(over="ignore"):
        idx = np.arange(int(np.prod(shape)), dtype=np.uint64)
        z = np.uint64(seed) + (idx + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / 16777216.0)
    return torch.from_numpy(u >= np.float32(p)).reshape(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_emulated_tc_kernel_dropout(tc_ops, dtype):
    """Dropout with the CPU kernels' counter-based mask: out against (softmax ∘ keep / (1 - p)) V in float64, with
    the 2x rule against the same math in the input dtype; lse is dropout's (unchanged); another seed differs."""
    B, Hq, Hkv, lq, lk, d, p, seed = 1, 2, 1, 70, 80, 64, 0.25, 123456789
    g = helpers.gen(11)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
               for s in ((B, Hq, lq, d), (B, Hkv, lk, d), (B, Hkv, lk, d)))
    prior = helpers.make_prior("lag", (2,), lq, lk, gen=g, dtype=torch.float32, w=4, requires_grad=False)
    table = prior.tensors()[0]
    args = (q, k, v, None, None, 0.7, 1, table, None, False, True, 0.125, p, seed)
    out, lse = tc_ops.attention_fwd(*args)
    keep = _keep_mask(seed, (B, Hq, lq, lk), p)
    assert 0.6 < float(keep.float().mean()) < 0.9
    kw = dict(prior=prior, alpha=0.7, causal=True, scale=0.125, return_lse=True)
    eye = torch.eye(lk, dtype=torch.float64).expand(B, Hkv, lk, lk)
    probs, ref_lse = reference_attention(q.double(), k.double(), eye, **kw)  # softmax rows (0 for empty rows)
    ref = (probs * keep / (1 - p)) @ v.double().repeat_interleave(Hq // Hkv, dim=1)
    probs_low, _ = reference_attention(q, k, eye.to(dtype), compute_dtype=dtype, **kw)
    low = ((probs_low * keep.to(dtype)) / (1 - p)) @ v.repeat_interleave(Hq // Hkv, dim=1)
    assert_close_to_reference("out", out, ref, low, helpers.scaled_floor(ext.FLOOR, dtype, ref))
    plain, plain_lse = tc_ops.attention_fwd(*args[:-2], 0.0, 0)
    torch.testing.assert_close(lse, plain_lse, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    other, _ = tc_ops.attention_fwd(*args[:-1], seed + 1)
    assert (out.float() - other.float()).abs().max() > 1e-2


def test_emulated_tc_kernel_edge_lengths(tc_ops):
    """No keys (Lk = 0): out 0, lse -inf; one query and one key: softmax is exactly 1 (out = v)."""
    q = torch.randn(2, 2, 3, 64).half()
    out, lse = tc_ops.attention_fwd(q, q[:, :, :0], q[:, :, :0], None, None, 1.0, 0, None, None, False, False, 1.0,
                                    0.0, 0)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    k, v = torch.randn(2, 1, 1, 64).half(), torch.randn(2, 1, 1, 64).half()
    out, lse = tc_ops.attention_fwd(q[:, :, :1], k, v, None, None, 1.0, 0, None, None, False, True, 0.125, 0.0, 0)
    torch.testing.assert_close(out, v.expand(2, 2, 1, 64), rtol=0, atol=0)
    torch.testing.assert_close(lse, (q[:, :, :1].float() * k.float()).sum(-1) * 0.125, rtol=1e-5, atol=1e-5)


def test_emulated_tc_kernel_strided_inputs(tc_ops):
    """Row strides that are not multiples of 8 elements (the element-wise staging path) and a q view whose rows
    are 16-byte aligned (the vector path) give the same result as contiguous copies."""
    g = helpers.gen(5)
    big = torch.randn(1, 2, 50, 72, generator=g).bfloat16()
    q, k, v = big[..., :64], big[..., 3:67], big[..., 8:72]  # row stride 72: k at offset 3 is not 16-byte aligned
    args = (None, None, 1.0, 0, None, None, False, True, 0.125, 0.0, 0)
    out, lse = tc_ops.attention_fwd(q, k, v, *args)
    out_c, lse_c = tc_ops.attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), *args)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


# ------------------------------------------------------------------------------------------- built module


def test_tc_kernels_do_not_spill_and_fit_shared_memory(cuda_lib):  # noqa: F811 - the fixture
    usage = ext._resource_usage(cuda_lib)
    for arch in ext.ARCHS:
        kernels = [k for k in usage.get(arch, []) if "attention_fwd_tc_kernel" in str(k["name"])]
        assert len(kernels) == TC_KERNELS_PER_ARCH, (arch, [k["name"] for k in usage.get(arch, [])])
        for k in kernels:
            what = f"{arch} {k['name']}: {k}"
            assert k["LOCAL"] == 0 and k["STACK"] == 0, f"register spill / local memory: {what}"
            assert k["SHARED"] <= ext.STATIC_SMEM_LIMIT, f"static shared memory above 48 KB: {what}"
            assert k["REG"] <= 255, what


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not ext.HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("lq,lk", [(1, 17), (113, 1025), (1023, 97)])
@pytest.mark.parametrize("kind", ["none", "lag", "banded_masked", "dense"])
def test_gpu_tc_forward_matches_reference(kind, lq, lk, d, dtype):
    """The tensor-core path (the default for fp16/bf16) against the float64 reference, 2x rule: GQA, causal and
    padding with a fully padded batch, lengths that are not multiples of the tiles."""
    q, k, v = ext._qkv(2, 4, 2, lq, lk, d, dtype, seed=lq + lk)
    prior = helpers.make_prior(kind, (4,), lq, lk, gen=helpers.gen(2), dtype=torch.float32, w=17, r=8,
                               requires_grad=False, device="cuda")
    kpm = torch.rand(2, lk, generator=helpers.gen(7)) < 0.3
    kpm[1, :] = True
    ext._check_forward(q, k, v, prior=prior, alpha=torch.tensor([0.7, 0.0, -1.3, 2.0], device="cuda"), causal=True,
                       key_padding_mask=kpm.cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not ext.HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_gpu_tc_forward_close_to_simt_and_dropout_mask(dtype, monkeypatch):
    """Tensor-core vs SIMT kernel (RAPKERN_CUDA_FWD_SIMT=1) on the same inputs, with dropout: both use the same
    counter-based mask, so they differ only by rounding (P in the input dtype on the tensor cores)."""
    import rapkern

    q, k, v = ext._qkv(1, 4, 2, 300, 260, 128, dtype, seed=3)
    prior = helpers.make_prior("lag", (), 300, 260, gen=helpers.gen(3), dtype=torch.float32, w=9,
                               requires_grad=False, device="cuda")
    kw = dict(prior=prior, alpha=0.5, causal=True, dropout_p=0.2)
    with torch.no_grad():
        torch.manual_seed(0)
        tc = rapkern.attention(q, k, v, backend="cuda", **kw)
        monkeypatch.setenv("RAPKERN_CUDA_FWD_SIMT", "1")
        torch.manual_seed(0)
        simt = rapkern.attention(q, k, v, backend="cuda", **kw)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(tc.float(), simt.float(), rtol=tol, atol=tol)
