"""The CUDA backward (csrc/cuda/attention_bwd*.{cu,cuh,h,cpp}, issue 15) on this CPU-only machine, plus its GPU checks.

Emulated (CPU-only, needs only the toolkit's headers): the backward kernels' own code (attention_bwd_kernel.cuh),
their launch sequence (bwd_params.h bwd_passes) and the op's host side (bwd_problem.h), compiled by g++ under
csrc/cuda/host_emulation.h (one std::thread per CUDA thread), fed by the emulated CUDA forward; dq, dk, dv,
every prior gradient and dalpha compared with the float64 reference's autograd (2x rule) across prior kinds,
broadcast prior leading dims (the per-slab passes), masks, GQA, Lq != Lk, dlse, fp32/fp16/bf16, head dims 64 and
128; dropout against the C++ CPU kernels (same hash); repeated runs bitwise equal (256 host threads per CTA run
concurrently, so an unsynchronized read or a racy accumulation would show). It checks arithmetic, indexing and
the barrier structure, not what only a GPU shows (races the barriers hide, SASS, speed).

``@pytest.mark.gpu`` (skipped without CUDA): the same numerics through ``rapkern.attention(backend="cuda")``
and autograd, and 100 repeated backwards bitwise equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rapkern
from rapkern.testing import assert_close_to_reference, reference_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # noqa: E402
from test_cuda_ext import EMU_SOURCE, HAVE_CUDA, KINDS, _resource_usage, cuda_lib, load_emulation  # noqa: E402,F401

EMU_BWD_SOURCE = EMU_SOURCE.replace("TORCH_LIBRARY(rapkern_cuda_emu, m)", "TORCH_LIBRARY(rapkern_cuda_emu_b, m)") \
    .replace('#include "cuda/fwd_problem.h"', '#include "cuda/fwd_problem.h"\n#include "cuda/attention_bwd_kernel.cuh"'
             '\n#include "cuda/bwd_problem.h"') \
    .replace('m.def("attention_fwd", &attention_fwd);',
             'm.def("attention_fwd", &attention_fwd);\n  m.def("attention_bwd", &attention_bwd);') \
    .replace("}  // namespace\n", r"""
template <typename T>
void run_bwd(const BwdParams& p) {
  BwdPass passes[kMaxBwdPasses];
  const int n = bwd_passes(p, passes);
  for (int k = 0; k < n; ++k) {
    unsigned gx = 0, gy = 0;
    bwd_grid(p, passes[k], &gx, &gy);
    if (gx == 0 || gy == 0) continue;
    const emu::Dim grid{gx, gy, 1};
    const BwdPass& s = passes[k];
    if (s.kernel == kReduce) emu::launch(bwd::attention_bwd_reduce_kernel, grid, bwd::NT, p, s);
    else if (s.kernel == kQ && p.f.D == 64) emu::launch(bwd::attention_bwd_q_kernel<T, 64>, grid, bwd::NT, p, s);
    else if (s.kernel == kQ) emu::launch(bwd::attention_bwd_q_kernel<T, 128>, grid, bwd::NT, p, s);
    else if (p.f.D == 64) emu::launch(bwd::attention_bwd_kv_kernel<T, 64>, grid, bwd::NT, p, s);
    else emu::launch(bwd::attention_bwd_kv_kernel<T, 128>, grid, bwd::NT, p, s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& kpm,
    const std::optional<at::Tensor>& alpha, double alpha_value, int64_t prior_kind,
    const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1, bool mask_outside,
    bool causal, double scale, double dropout_p, int64_t seed, bool need_qkv, bool need_prior, bool need_alpha) {
  host::BwdSetup S = host::make_bwd(dout, dlse, q, k, v, out, lse, kpm, alpha, alpha_value, prior_kind, prior0,
                                    prior1, mask_outside, causal, scale, dropout_p, seed, need_qkv, need_prior,
                                    need_alpha, false);
  if (S.work) {
    switch (q.scalar_type()) {
      case at::kFloat: run_bwd<float>(S.p); break;
      case at::kHalf: run_bwd<__half>(S.p); break;
      default: run_bwd<__nv_bfloat16>(S.p); break;
    }
  }
  return host::bwd_result(S, q);
}
}  // namespace
""", 1)


def test_backward_kernels_are_compiled_for_both_architectures(cuda_lib):  # noqa: F811
    """dq and dk/dv kernels per dtype x head dim (64, 128), one reduction kernel; no spills, static shared memory
    within 48 KB (test_cuda_ext.py checks every kernel of the module for that)."""
    usage = _resource_usage(cuda_lib)
    for arch in ("sm_80", "sm_90a"):
        names = [str(k["name"]) for k in usage[arch]]
        for kernel, n in (("attention_bwd_q_kernel", 6), ("attention_bwd_kv_kernel", 6),
                          ("attention_bwd_reduce_kernel", 1)):
            found = [k for k in usage[arch] if kernel in str(k["name"])]
            assert len(found) == n, (arch, kernel, names)
            for k in found:
                assert k["LOCAL"] == 0 and k["STACK"] == 0 and k["SHARED"] <= 48 * 1024, (arch, k)


@pytest.fixture(scope="module")
def emu():
    """torch.ops.rapkern_cuda_emu_b.{attention_fwd, attention_bwd}: the CUDA kernels and host sides, emulated."""
    return load_emulation(EMU_BWD_SOURCE, "rapkern_cuda_emu_b", "attention_bwd", "cuda_emu_bwd")


FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _ref_grads(q, k, v, prior, alpha, dt, gout, glse, **kw):
    """Gradients of the reference computed in dt (float64: the truth; the input dtype: the eager baseline)."""
    def leaf(t):
        return t.detach().to(dt).requires_grad_()

    qq, kk, vv = (leaf(t) for t in (q, k, v))
    pr = None if prior is None else prior.with_tensors(*(leaf(t) for t in prior.tensors()))
    al = leaf(alpha) if isinstance(alpha, torch.Tensor) else alpha
    out, lse = reference_attention(qq, kk, vv, prior=pr, alpha=al, return_lse=True, compute_dtype=dt, **kw)
    leaves = [qq, kk, vv] + ([] if pr is None else list(pr.tensors())) + ([al] if isinstance(al, torch.Tensor) else [])
    live = torch.isfinite(lse)
    gs = torch.autograd.grad([out, lse], leaves, [gout.to(out.dtype), torch.where(live, glse, 0).to(lse.dtype)],
                             allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, gs)]


def _op_args(prior, kind, alpha):
    p0 = p1 = None
    if prior is not None:
        p0, p1 = (prior.u, prior.v) if kind == "lowrank" else (prior.tensors()[0], None)
    a_t = alpha if isinstance(alpha, torch.Tensor) else None
    return p0, p1, a_t, (0.0 if a_t is not None else float(alpha))


def emu_case(emu, kind, dtype, d, causal, padding, shape, lead, alpha, *, w=9, use_dlse=True, seed=0):
    B, Hq, Hkv, lq, lk = shape
    g = helpers.gen(seed + lq * 7 + lk)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
               for s in ((B, Hq, lq, d), (B, Hkv, lk, d), (B, Hkv, lk, d)))
    prior = helpers.make_prior(kind, lead, lq, lk, gen=g, dtype=torch.float32, w=w, r=3, requires_grad=True)
    if kind == "dense":
        with torch.no_grad():
            prior.bias[..., 3, :] = float("-inf")  # a fully masked row for every alpha
            prior.bias[..., 5, 2:9] = float("-inf")
    if alpha == "heads":
        alpha = torch.linspace(-1.0, 1.5, Hq).requires_grad_()
    elif alpha == "shared":
        alpha = torch.tensor(0.8).requires_grad_()
    kpm = None
    if padding:
        kpm = torch.rand(B, lk, generator=g) < 0.3
        if B > 1:
            kpm[-1, :] = True  # a batch whose rows see no key: zero gradients
    gout = torch.randn(B, Hq, lq, d, generator=g, dtype=torch.float64)
    glse = torch.randn(B, Hq, lq, generator=g, dtype=torch.float64) if use_dlse else torch.zeros(B, Hq, lq)
    p0, p1, a_t, av = _op_args(prior, kind, alpha)
    scale = d ** -0.5
    mo = kind == "banded_masked"
    args = (q, k, v, kpm, a_t, av, KINDS[kind], p0, p1, mo, causal, scale, 0.0, 0)
    out, lse = emu.attention_fwd(*(x.detach() if isinstance(x, torch.Tensor) else x for x in args))
    bargs = (gout.to(dtype), glse.float() if use_dlse else None, q, k, v, out, lse, kpm,
             None if a_t is None else a_t.detach(), av, KINDS[kind],
             None if p0 is None else p0.detach(), None if p1 is None else p1.detach(), mo, causal, scale, 0.0, 0,
             True, prior is not None, a_t is not None)
    got = emu.attention_bwd(*bargs)
    kw = dict(causal=causal, key_padding_mask=kpm)
    ref = _ref_grads(q, k, v, prior, alpha, torch.float64, gout, glse, **kw)
    low = _ref_grads(q, k, v, prior, alpha, dtype, gout, glse, **kw)
    names = ["q", "k", "v"] + ([] if prior is None else (["u", "v_p"] if kind == "lowrank" else ["prior"]))
    names += ["alpha"] if a_t is not None else []
    got_list = list(got[:3]) + ([] if prior is None else ([got[3], got[4]] if kind == "lowrank" else [got[3]]))
    got_list += [got[5]] if a_t is not None else []
    for n, gt, r, lo in zip(names, got_list, ref, low):
        assert gt.shape == r.shape, (n, gt.shape, r.shape)
        assert gt.dtype == (dtype if n in ("q", "k", "v") else torch.float32), (n, gt.dtype)
        floor = helpers.scaled_floor(FLOOR, dtype, r, reduce_len=max(lq, lk))
        assert_close_to_reference(f"d{n}", gt, r, lo, floor)
    return got, bargs


EMU_CASES = [
    # kind, dtype, d, causal, padding, (B, Hq, Hkv, Lq, Lk), lead, alpha
    ("none", torch.float32, 64, False, False, (1, 2, 1, 70, 45), (), 1.0),
    ("lag", torch.float32, 64, True, True, (2, 2, 1, 70, 45), (2,), "heads"),
    ("lag", torch.float32, 64, False, False, (2, 2, 2, 66, 130), (2, 1), "shared"),  # per-slab lag reduction
    ("lag", torch.bfloat16, 128, False, False, (1, 1, 1, 9, 100), (), 0.5),
    ("banded", torch.float16, 64, True, False, (1, 2, 2, 66, 66), (1, 2), "heads"),
    ("banded", torch.float32, 64, False, True, (2, 2, 1, 40, 70), (), "heads"),  # broadcast: per-slab pass
    ("banded_masked", torch.float32, 64, False, True, (1, 2, 1, 130, 97), (2,), "heads"),
    ("banded_masked", torch.float32, 64, True, False, (1, 1, 1, 100, 100), (), 1.5),
    ("lowrank", torch.float32, 128, True, True, (2, 2, 2, 33, 65), (2, 2), "heads"),
    ("lowrank", torch.float32, 64, False, False, (2, 2, 1, 70, 40), (2, 1), "heads"),  # broadcast u and v
    ("dense", torch.float32, 64, True, True, (2, 2, 1, 40, 37), (1, 2), "heads"),
    ("dense", torch.float16, 64, False, False, (1, 2, 1, 64, 64), (), "shared"),
]


@pytest.mark.parametrize("kind,dtype,d,causal,padding,shape,lead,alpha", EMU_CASES)
def test_emulated_backward_matches_reference(emu, kind, dtype, d, causal, padding, shape, lead, alpha):
    """dq, dk, dv, the prior's gradients and dalpha against the float64 reference (2x rule), with dlse."""
    emu_case(emu, kind, dtype, d, causal, padding, shape, lead, alpha)


def test_emulated_backward_without_dlse_and_zero_alpha(emu):
    emu_case(emu, "lag", torch.float32, 64, True, False, (1, 2, 2, 50, 50), (2,), 0.0, use_dlse=False)


def test_emulated_backward_is_bitwise_reproducible(emu):
    """Two runs give identical bits (the host threads of a CTA really run concurrently)."""
    got, bargs = emu_case(emu, "lowrank", torch.float32, 64, True, True, (2, 2, 1, 70, 40), (1, 1), "heads")
    again = emu.attention_bwd(*bargs)
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    got, bargs = emu_case(emu, "lag", torch.float32, 64, False, True, (2, 2, 1, 70, 75), (), "shared", w=20)
    again = emu.attention_bwd(*bargs)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_emulated_backward_dropout_equals_cpu_kernels(emu):
    """Dropout: the backward regenerates the forward's mask (the CPU kernels' hash): equal to rapkern._C's
    CPU backward on the same inputs, and different from the no-dropout gradients."""
    from rapkern import _ext

    assert _ext.load() is None, _ext.load()
    g = helpers.gen(11)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g) for n in (70, 50, 50))
    table = torch.randn(2, 9, generator=g)
    alpha = torch.tensor([0.7, -0.4])
    fargs = (q, k, v, None, alpha, 0.0, 1, table, None, False, True, 0.125, 0.25, 123456789)
    out, lse = torch.ops.rapkern.attention_fwd(*fargs)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    bargs = (dout, dlse, q, k, v, out, lse) + fargs[3:] + (True, True, True)
    got = emu.attention_bwd(*bargs)
    want = torch.ops.rapkern.attention_bwd(*bargs)
    for name, a, b in zip(("dq", "dk", "dv", "dtable", "dprior1", "dalpha"), got, want):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=name)
    plain = emu.attention_bwd(*bargs[:-5], 0.0, 0, True, True, True)
    assert (got[0] - plain[0]).abs().max() > 1e-2


def test_emulated_backward_edge_cases(emu):
    """Lk = 0 (dq 0, dk/dv empty), Lq = 0 (dk, dv 0), nothing asked (empty results), bad dlse shape."""
    q = torch.randn(1, 2, 5, 64)
    e = q[:, :, :0]
    out, lse = emu.attention_fwd(q, e, e, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    g = emu.attention_bwd(out, None, q, e, e, out, lse, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0,
                          True, False, False)
    assert torch.equal(g[0], torch.zeros_like(q)) and g[1].numel() == 0 and g[5].numel() == 0
    k = torch.randn(1, 2, 7, 64)
    out, lse = emu.attention_fwd(e, k, k, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    g = emu.attention_bwd(out, None, e, k, k, out, lse, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0,
                          True, False, False)
    assert g[0].numel() == 0 and torch.equal(g[1], torch.zeros_like(k)) and torch.equal(g[2], torch.zeros_like(k))
    out, lse = emu.attention_fwd(q, k, k, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0)
    g = emu.attention_bwd(out, None, q, k, k, out, lse, None, None, 1.0, 0, None, None, False, False, 1.0, 0.0, 0,
                          False, False, False)
    assert all(t.numel() == 0 for t in g)
    with pytest.raises(RuntimeError, match="dlse must have shape"):
        emu.attention_bwd(out, lse[:, :1], q, k, k, out, lse, None, None, 1.0, 0, None, None, False, False, 1.0,
                          0.0, 0, True, False, False)


@pytest.mark.parametrize("kind,lead,alpha", [("lag", (), "shared"), ("lowrank", (2, 1), "heads"),
                                              ("dense", (1, 2), None), ("banded", (2,), "heads")])
def test_fake_backward_metadata_equals_the_cuda_host_side(emu, kind, lead, alpha):
    """What torch.compile plans with (rapkern/_ext.py's fake attention_bwd) is what the CUDA op's host side
    returns (bwd_problem.h, emulated): shapes, dtypes and strides of all six results."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from rapkern import _ext

    assert _ext.load() is None, _ext.load()
    g = helpers.gen(3)
    B, Hq, Hkv, lq, lk, d = 2, 2, 1, 40, 33, 64
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float16) for s in ((B, Hq, lq, d), (B, Hkv, lk, d),
                                                                           (B, Hkv, lk, d)))
    prior = helpers.make_prior(kind, lead, lq, lk, gen=g, dtype=torch.float32, w=5, r=3)
    p0, p1 = (prior.u, prior.v) if kind == "lowrank" else (prior.tensors()[0], None)
    a_t = {"shared": torch.tensor(0.8), "heads": torch.tensor([0.5, -1.0]), None: None}[alpha]
    fargs = (q, k, v, None, a_t, 1.0, KINDS[kind], p0, p1, False, True, 0.125, 0.0, 0)
    out, lse = emu.attention_fwd(*fargs)
    bargs = (torch.randn_like(out), None, q, k, v, out, lse) + fargs[3:] + (True, True, True)
    real = emu.attention_bwd(*bargs)
    with FakeTensorMode() as mode:
        fake = torch.ops.rapkern.attention_bwd(*(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                                                 for x in bargs))
    for name, r, f in zip(("dq", "dk", "dv", "dprior0", "dprior1", "dalpha"), real, fake):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), name


# ------------------------------------------------------------------------------------------- GPU


def _gpu_case(kind, dtype, d, mask, lead=(4,), seed=0):
    lq, lk = 257, 200
    g = helpers.gen(seed)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).cuda().requires_grad_()
               for s in ((2, 4, lq, d), (2, 2, lk, d), (2, 2, lk, d)))
    prior = helpers.make_prior(kind, lead, lq, lk, gen=helpers.gen(2), dtype=torch.float32, w=17, r=8,
                               requires_grad=True, device="cuda")
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], device="cuda", requires_grad=True)
    kpm = None
    if mask != "plain":
        kpm = torch.rand(2, lk, generator=helpers.gen(7)) < 0.3
        kpm[1, :] = True
        kpm = kpm.cuda()
    gout = torch.randn(2, 4, lq, d, generator=helpers.gen(9), dtype=torch.float64).cuda()
    glse = torch.randn(2, 4, lq, generator=helpers.gen(10), dtype=torch.float64).cuda()
    return q, k, v, prior, alpha, kpm, gout, glse


def _cuda_grads(q, k, v, prior, alpha, kpm, gout, glse, causal):
    out, lse = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=causal, key_padding_mask=kpm,
                                 return_lse=True, backend="cuda")
    leaves = [q, k, v] + ([] if prior is None else list(prior.tensors())) + [alpha]
    live = torch.isfinite(lse)
    return torch.autograd.grad([out, lse], leaves, [gout.to(out.dtype), torch.where(live, glse, 0).float()],
                               allow_unused=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", ["none", "lag", "banded", "banded_masked", "lowrank", "dense"])
@pytest.mark.parametrize("mask", ["plain", "causal+padding"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_backward_matches_reference(kind, dtype, mask, d):
    q, k, v, prior, alpha, kpm, gout, glse = _gpu_case(kind, dtype, d, mask)
    causal = mask != "plain"
    got = _cuda_grads(q, k, v, prior, alpha, kpm, gout, glse, causal)
    kw = dict(causal=causal, key_padding_mask=kpm)
    ref = _ref_grads(q, k, v, prior, alpha, torch.float64, gout, glse, **kw)
    low = _ref_grads(q, k, v, prior, alpha, dtype, gout, glse, **kw)
    for i, (gt, r, lo) in enumerate(zip(got, ref, low)):
        gt = torch.zeros_like(r) if gt is None else gt
        floor = helpers.scaled_floor(FLOOR, dtype, r, reduce_len=257)
        assert_close_to_reference(f"grad[{i}]", gt, r, lo, floor)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kind,lead", [("lag", (1,)), ("banded", ()), ("lowrank", (2, 1)), ("dense", (1, 4))])
def test_gpu_backward_broadcast_priors(kind, lead):
    """Broadcast prior leading dims: the per-slab passes and the lag reduction over heads and batches."""
    q, k, v, prior, alpha, kpm, gout, glse = _gpu_case(kind, torch.bfloat16, 64, "causal+padding", lead=lead)
    got = _cuda_grads(q, k, v, prior, alpha, kpm, gout, glse, True)
    kw = dict(causal=True, key_padding_mask=kpm)
    ref = _ref_grads(q, k, v, prior, alpha, torch.float64, gout, glse, **kw)
    low = _ref_grads(q, k, v, prior, alpha, torch.bfloat16, gout, glse, **kw)
    for i, (gt, r, lo) in enumerate(zip(got, ref, low)):
        assert_close_to_reference(f"grad[{i}]", gt, r, lo, helpers.scaled_floor(FLOOR, torch.bfloat16, r, 257))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_gpu_backward_is_bitwise_deterministic_over_100_runs():
    for kind, lead in (("lag", (1,)), ("dense", (4,)), ("lowrank", ())):
        q, k, v, prior, alpha, kpm, gout, glse = _gpu_case(kind, torch.bfloat16, 128, "causal+padding", lead=lead)
        first = _cuda_grads(q, k, v, prior, alpha, kpm, gout, glse, True)
        for _ in range(99):
            again = _cuda_grads(q, k, v, prior, alpha, kpm, gout, glse, True)
            for a, b in zip(first, again):
                assert (a is None and b is None) or torch.equal(a, b), kind


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_gpu_backward_dropout_equals_the_cpu_kernels():
    """Dropout: the backward regenerates the forward's mask; equal to the cpp backend's on the same inputs."""
    g = helpers.gen(5)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g) for n in (100, 130, 130))
    table = torch.randn(2, 9, generator=g)
    alpha = torch.tensor([0.7, -0.4])
    fargs = (q, k, v, None, alpha, 0.0, 1, table, None, False, True, 0.125, 0.25, 77)
    out, lse = torch.ops.rapkern.attention_fwd(*fargs)
    dout, dlse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    bargs = (dout, dlse, q, k, v, out, lse) + fargs[3:] + (True, True, True)
    want = torch.ops.rapkern.attention_bwd(*bargs)
    got = torch.ops.rapkern.attention_bwd(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in bargs))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device")
def test_gpu_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) over rapkern.attention(backend="cuda"), forward and backward: no graph break,
    the same results as eager (the same kernels run)."""
    q, k, v, prior, alpha, kpm, gout, glse = _gpu_case("lag", torch.bfloat16, 128, "causal+padding", lead=(1,))
    leaves = [q, k, v, alpha, *prior.tensors()]

    def f(q, k, v, alpha, *pt):
        return rapkern.attention(q, k, v, prior=prior.with_tensors(*pt), alpha=alpha, causal=True,
                                 key_padding_mask=kpm, backend="cuda")

    compiled = torch.compile(f, fullgraph=True)
    results = []
    for fn in (f, compiled):
        out = fn(*leaves)
        results.append([out, *torch.autograd.grad(out, leaves, gout.to(out.dtype))])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"result {i}")
