"""The CUDA routing kernels (rapkern::route_fwd / route_bwd, csrc/cuda/route_*; issue 15) on this CPU-only machine.

Built with the rest of csrc/cuda (tests/test_cuda_ext.py's private build): the op is registered for CUDA, its
kernels compile for sm_80 and sm_90a without spills, and the fake implementation gives the documented shapes
for CUDA tensors. Emulated: the kernels' own code (route_fwd_kernel.cuh) with the op's host side
(route_problem.h), compiled by g++ under csrc/cuda/host_emulation.h, against reference_lda_route (float64), the
2x rule; top-k winners and their order exactly; the backward through the cuda backend's autograd Function against
the reference's float64 autograd (q, centroids, answers, τ), bitwise reproducible.
UNVERIFIED ON A GPU: races, SASS and speed only a GPU shows.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_ext import _resource_usage, cuda_lib, load_emulation  # noqa: F401  (cuda_lib: a fixture)

from rapkern import _ext
from rapkern.testing import assert_close_to_reference, reference_lda_route

ARCHS = ("sm_80", "sm_90a")
STATIC_SMEM_LIMIT = 48 * 1024

pytestmark = pytest.mark.skipif(_ext.load() is not None, reason=f"the op schemas come from rapkern._C: {_ext.load()}")


def test_registers_route_ops_for_cuda(cuda_lib):  # noqa: F811
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rapkern::route_fwd", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rapkern::route_bwd", "CUDA")


def test_route_kernels_do_not_spill_and_fit_shared_memory(cuda_lib):  # noqa: F811
    usage = _resource_usage(cuda_lib)
    for arch in ARCHS:
        kernels = [k for k in usage[arch] if "route_" in str(k["name"])]
        # forward {dense, top-k} and backward {rows, clusters}, x 3 dtypes
        assert len(kernels) == 12, (arch, [k["name"] for k in usage[arch]])
        for k in kernels:
            assert k["LOCAL"] == 0 and k["STACK"] == 0, f"register spill / local memory: {arch} {k}"
            assert k["SHARED"] <= STATIC_SMEM_LIMIT, f"{arch} {k}"


@pytest.mark.parametrize("top_k", [0, 3])
def test_fake_tensor_mode_shapes_on_cuda(top_k):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 8, device="cuda", dtype=torch.float16)
        c = torch.empty(2, 7, 8, device="cuda", dtype=torch.float16)
        a = torch.empty(2, 7, 3, device="cuda", dtype=torch.float16)
        out, lse, w, idx = torch.ops.rapkern.route_fwd(q, c, a, None, 0.1, True, top_k)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float16 and out.device.type == "cuda"
    assert lse.shape == ((2, 5) if top_k == 0 else (0, 0)) and lse.dtype == torch.float32
    assert w.shape == (2, 5, top_k) and w.dtype == torch.float32
    assert idx.shape == (2, 5, top_k) and idx.dtype == torch.int64


# ------------------------------------------------------------------------------------------- emulated kernels

EMU_SOURCE = r"""
#include "cuda/host_emulation.h"
#include "cuda/route_fwd_kernel.cuh"
#include "cuda/route_bwd_kernel.cuh"
#include "cuda/route_problem.h"
#include <torch/library.h>

namespace {
using namespace rapkern::cuda;

template <typename T>
void run(const RouteParams& p) {
  const emu::Dim grid{static_cast<unsigned>(p.G * ((p.N + kRouteRows - 1) / kRouteRows)), 1, 1};
  if (p.top_k == 0) emu::launch(route::route_dense_kernel<T>, grid, kRouteRows * 32, p);
  else emu::launch(route::route_topk_kernel<T>, grid, kRouteRows * 32, p);
}

// route_fwd_host.cpp's body on CPU tensors, the kernels run through the emulation.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_fwd(
    const at::Tensor& q, const at::Tensor& c, const at::Tensor& a, const std::optional<at::Tensor>& mask,
    double tau, bool normalize, int64_t top_k) {
  std::vector<at::Tensor> held;
  RouteParams p = host::make_route_params(q, c, a, mask, tau, normalize, top_k, false, held);
  at::Tensor out = at::empty({p.G, p.N, p.e}, q.options());
  at::Tensor lse = at::empty({top_k == 0 ? p.G : 0, top_k == 0 ? p.N : 0}, q.options().dtype(at::kFloat));
  at::Tensor w = at::empty({p.G, p.N, top_k}, q.options().dtype(at::kFloat));
  at::Tensor idx = at::empty({p.G, p.N, top_k}, q.options().dtype(at::kLong));
  if (p.G * p.N == 0) return {out, lse, w, idx};
  p.out = out.data_ptr();
  if (top_k == 0) p.lse = lse.data_ptr<float>();
  else p.w = w.data_ptr<float>(), p.idx = idx.data_ptr<int64_t>();
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(p); break;
    case at::kHalf: run<__half>(p); break;
    default: run<__nv_bfloat16>(p); break;
  }
  return {out, lse, w, idx};
}
// route_fwd_host.cpp's backward body, likewise.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& c, const at::Tensor& a,
    const std::optional<at::Tensor>& mask, double tau, bool normalize, int64_t top_k, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& w, const at::Tensor& idx) {
  std::vector<at::Tensor> held;
  at::Tensor dq, dc, da, dz_logp;
  RouteBwdParams p = host::make_route_bwd_params(dout, q, c, a, mask, tau, normalize, top_k, out, lse, w, idx,
                                                 false, held, &dq, &dc, &da, &dz_logp);
  if (p.f.G * p.f.N == 0) return {dq, dc.zero_(), da.zero_(), dz_logp};
  const emu::Dim rows{static_cast<unsigned>(p.f.G * ((p.f.N + kRouteRows - 1) / kRouteRows)), 1, 1};
  const emu::Dim clusters{static_cast<unsigned>(p.f.G * ((p.f.n + kRouteRows - 1) / kRouteRows)), 1, 1};
  auto run_bwd = [&](auto tag) {
    using T = decltype(tag);
    emu::launch(route::route_bwd_rows_kernel<T>, rows, kRouteRows * 32, p);
    emu::launch(route::route_bwd_clusters_kernel<T>, clusters, kRouteRows * 32, p);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run_bwd(float{}); break;
    case at::kHalf: run_bwd(__half{}); break;
    default: run_bwd(__nv_bfloat16{}); break;
  }
  return {dq, dc, da, dz_logp};
}
}  // namespace

TORCH_LIBRARY(rapkern_cuda_emu_route, m) {
  m.def("route_fwd", &route_fwd);
  m.def("route_bwd", &route_bwd);
}
"""


@pytest.fixture(scope="module")
def emulated():
    return load_emulation(EMU_SOURCE, "rapkern_cuda_emu_route", "route_fwd", "cuda_emu_route").route_fwd


@pytest.fixture
def emulated_ops(emulated, monkeypatch):
    """rapkern.backends.cuda.routing's autograd Function on CPU tensors, its two ops run by the emulation."""
    monkeypatch.setattr(torch.ops.rapkern, "route_fwd", torch.ops.rapkern_cuda_emu_route.route_fwd)
    monkeypatch.setattr(torch.ops.rapkern, "route_bwd", torch.ops.rapkern_cuda_emu_route.route_bwd)


def _inputs(g, n_q, n, d, e, dtype, shared, gen):
    q = torch.randn(g, n_q, d, generator=gen).to(dtype)
    if shared:  # one table for every group: group stride 0, as RouteProblem passes a shared table
        c = torch.randn(1, n, d, generator=gen).to(dtype).expand(g, n, d)
        a = torch.randn(1, n, e, generator=gen).to(dtype).expand(g, n, e)
    else:
        c = torch.randn(g, n, d, generator=gen).to(dtype)
        a = torch.randn(g, n, e, generator=gen).to(dtype)
    return q, c, a


def _mask(g, n, kind, gen):
    """None, a random cluster mask ("some"), or one with group 1 entirely absent ("empty group")."""
    if kind == "none":
        return None
    mask = torch.rand(g, n, generator=gen) < 0.3
    mask[:, 0] = False
    if kind == "empty group":
        mask[1] = True
    return mask


EMU_CASES = [
    # top_k, dtype, normalize, (G, N, n, d, e), shared table, mask ("none", "some", "empty group")
    (0, torch.float32, True, (2, 11, 19, 40, 150), False, "none"),   # e > 128: two column passes
    (0, torch.float16, True, (1, 9, 33, 16, 5), True, "some"),
    (0, torch.float32, False, (3, 8, 7, 70, 33), False, "empty group"),
    (0, torch.bfloat16, True, (1, 8, 12, 32, 8), False, "none"),
    (3, torch.float32, True, (2, 10, 17, 24, 40), False, "some"),
    (5, torch.float16, False, (1, 9, 20, 33, 130), True, "none"),
    (4, torch.float32, True, (3, 7, 6, 8, 9), False, "empty group"),  # masked clusters rank last, by index
    (1, torch.float32, True, (1, 5, 64, 16, 4), False, "none"),
]


@pytest.mark.parametrize("top_k,dtype,normalize,shape,shared,mask_kind", EMU_CASES)
def test_emulated_route_matches_reference(emulated, top_k, dtype, normalize, shape, shared, mask_kind):
    gen = torch.Generator().manual_seed(7)
    g, n_q, n, d, e = shape
    q, c, a = _inputs(g, n_q, n, d, e, dtype, shared, gen)
    mask = _mask(g, n, mask_kind, gen)
    tau = 0.2
    out, lse, w, idx = emulated(q, c, a, mask, tau, normalize, top_k)
    kw = dict(tau=tau, top_k=top_k or None, normalize=normalize, cluster_mask=mask, return_weights=True)
    ref_out, ref_w = reference_lda_route(q, c, a, **kw)
    low_out, low_w = reference_lda_route(q, c, a, **kw, compute_dtype=dtype)
    assert_close_to_reference("out", out.float(), ref_out.double(), low_out.float(), 1e-5)
    if top_k:
        ref_w, ref_idx = ref_w
        assert torch.equal(idx, ref_idx), (idx, ref_idx)
        assert_close_to_reference("weights", w, ref_w.double(), low_w[0].float(), 1e-6)
    else:
        assert lse.shape == (g, n_q)
        dead = torch.zeros(g, dtype=torch.bool) if mask is None else mask.all(-1)  # groups with no cluster
        assert torch.isneginf(lse[dead]).all() and torch.isfinite(lse[~dead]).all()


GRAD_CASES = [
    # top_k, dtype, normalize, (G, N, n, d, e), shared table, mask, learnable tau
    (0, torch.float32, True, (2, 9, 13, 40, 150), False, "some", True),  # d, e: one and two column passes
    (0, torch.float16, True, (1, 10, 9, 16, 8), True, "none", False),
    (0, torch.float32, False, (3, 8, 7, 20, 5), False, "empty group", True),
    (3, torch.float32, True, (2, 9, 17, 24, 140), False, "some", True),
    (4, torch.float16, False, (1, 11, 12, 33, 7), True, "none", False),
    (2, torch.float32, True, (3, 7, 6, 8, 9), False, "empty group", False),
]


@pytest.mark.parametrize("top_k,dtype,normalize,shape,shared,mask_kind,learn_tau", GRAD_CASES)
def test_emulated_route_gradients_match_reference(emulated_ops, top_k, dtype, normalize, shape, shared, mask_kind,
                                                  learn_tau):
    """The cuda backend's autograd Function (route_fwd/route_bwd kernels under the emulation, the Jacobians and
    dτ in Python) against reference_lda_route's autograd in float64: q, centroids, answers and τ, 2x rule."""
    from rapkern.backends.cuda.routing import CudaRouteFunction

    gen = torch.Generator().manual_seed(11)
    g, n_q, n, d, e = shape
    q, c, a = _inputs(g, n_q, n, d, e, dtype, False, gen)
    c, a = (c[:1], a[:1]) if shared else (c, a)
    leaves = [t.clone().requires_grad_() for t in (q, c, a)]
    tau = torch.tensor(0.3, requires_grad=True) if learn_tau else 0.3
    mask = _mask(g, n, mask_kind, gen)
    dout = torch.randn(g, n_q, e, generator=gen).to(dtype)

    def grads(fn, cast):
        xs = [t.detach().to(cast).requires_grad_() for t in leaves]
        tt = tau.detach().to(cast).requires_grad_() if learn_tau else tau
        cq, cc, ca = xs[0], xs[1].expand(g, n, d), xs[2].expand(g, n, e)
        out = fn(cq, cc, ca, tt)
        wrt = xs + ([tt] if learn_tau else [])
        return torch.autograd.grad(out, wrt, dout.to(out.dtype))

    def kernel(cq, cc, ca, tt):
        cfg = (float(tt.detach()) if learn_tau else tt, normalize, top_k)
        return CudaRouteFunction.apply(cfg, cq, cc, ca, mask, tt if learn_tau else None)

    def reference(cdt):
        return lambda cq, cc, ca, tt: reference_lda_route(cq, cc, ca, tau=tt, top_k=top_k or None,
                                                          normalize=normalize, cluster_mask=mask,
                                                          compute_dtype=cdt)

    got = grads(kernel, dtype)
    ref = grads(reference(torch.float64), torch.float64)
    low = grads(reference(dtype), dtype)
    for name, x, r, lo in zip(("dq", "dcentroids", "danswers", "dtau"), got, ref, low):
        assert_close_to_reference(name, x.float(), r, lo.float(), 1e-4 if dtype == torch.float16 else 1e-5)


def test_emulated_route_backward_is_bitwise_reproducible(emulated_ops):
    from rapkern.backends.cuda.routing import CudaRouteFunction

    gen = torch.Generator().manual_seed(2)
    q, c, a = (t.requires_grad_() for t in _inputs(2, 9, 10, 16, 8, torch.float32, False, gen))
    dout = torch.randn(2, 9, 8, generator=gen)
    runs = [torch.autograd.grad(CudaRouteFunction.apply((0.2, True, k), q, c, a, None, None), (q, c, a), dout)
            for k in (0, 0, 3, 3)]
    for first, second in ((runs[0], runs[1]), (runs[2], runs[3])):
        assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_emulated_topk_ties_keep_the_lower_index(emulated):
    """Equal scores (duplicated centroids) rank by index, as the reference's stable sort."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 4, 8, generator=gen)
    c = torch.cat([base, base], dim=1)  # clusters j and j + 4 score the same
    q = torch.randn(1, 6, 8, generator=gen)
    a = torch.randn(1, 8, 5, generator=gen)
    _, _, w, idx = emulated(q, c, a, None, 0.5, True, 4)
    _, (ref_w, ref_idx) = reference_lda_route(q, c, a, tau=0.5, top_k=4, return_weights=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w.float(), rtol=1e-5, atol=1e-6)


def test_emulated_dense_lse_is_the_log_partition(emulated):
    gen = torch.Generator().manual_seed(5)
    q, c, a = _inputs(1, 9, 13, 16, 3, torch.float32, False, gen)
    _, lse, _, _ = emulated(q, c, a, None, 0.3, True, 0)
    qn = q.double() / q.double().norm(dim=-1, keepdim=True)
    cn = c.double() / c.double().norm(dim=-1, keepdim=True)
    ref = torch.logsumexp(qn @ cn.transpose(-1, -2) / 0.3, dim=-1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,match", [
    (dict(top_k=65), r"top_k must be 0 \(dense\) or in \[1, min\(n, 64\)\]"),
    (dict(top_k=-1), r"top_k must be"),
    (dict(tau=0.0), r"tau must be finite and > 0"),
    (dict(mask=torch.zeros(1, 3, dtype=torch.bool)), r"cluster_mask must have shape \(G, n\) = \(1, 70\)"),
    (dict(mask=torch.zeros(1, 70)), r"cluster_mask must be bool"),
    (dict(a=torch.randn(1, 69, 4)), r"answers must have n = 70 rows"),
    (dict(c=torch.randn(1, 70, 9)), r"centroids must have q's feature dim d = 8"),
    (dict(q=torch.randn(1, 4, 8, dtype=torch.float64)), r"q dtype must be float32, float16 or bfloat16"),
])
def test_emulated_host_side_rejects_bad_inputs(emulated, args, match):
    kw = dict(q=torch.randn(1, 4, 8), c=torch.randn(1, 70, 8), a=torch.randn(1, 70, 4), mask=None, tau=0.1,
              top_k=0)
    kw.update(args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        emulated(kw["q"], kw["c"], kw["a"], kw["mask"], kw["tau"], True, kw["top_k"])


# ------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("top_k", [0, 1, 8, 64])
@pytest.mark.parametrize("mask_kind", ["none", "empty group"])
def test_gpu_route_matches_reference(dtype, top_k, mask_kind):
    from rapkern.backends.cuda import _load

    assert _load.load() is None, _load.load()
    gen = torch.Generator().manual_seed(top_k)
    q, c, a = (t.cuda() for t in _inputs(3, 37, 200, 64, 150, dtype, False, gen))
    mask = None
    if mask_kind != "none":
        mask = (torch.rand(3, 200, generator=gen) < 0.3).cuda()
        mask[1] = True
    out, lse, w, idx = torch.ops.rapkern.route_fwd(q, c, a, mask, 0.1, True, top_k)
    torch.cuda.synchronize()
    kw = dict(tau=0.1, top_k=top_k or None, normalize=True, cluster_mask=mask, return_weights=True)
    ref_out, ref_w = reference_lda_route(q, c, a, **kw)
    low_out, _ = reference_lda_route(q, c, a, **kw, compute_dtype=dtype)
    assert_close_to_reference("out", out.float(), ref_out.double(), low_out.float(), 1e-5)
    if top_k:
        assert torch.equal(idx, ref_w[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("top_k", [None, 8])
def test_gpu_route_gradients_match_reference_and_repeat_bitwise(top_k):
    import rapkern

    gen = torch.Generator().manual_seed(4)
    q, c, a = (t.cuda().requires_grad_() for t in _inputs(2, 300, 150, 64, 96, torch.float32, False, gen))
    tau = torch.tensor(0.2, device="cuda", requires_grad=True)
    dout = torch.randn(2, 300, 96, generator=gen).cuda()
    runs = [torch.autograd.grad(rapkern.lda_route(q, c, a, tau=tau, top_k=top_k, backend="cuda"), (q, c, a, tau),
                                dout) for _ in range(20)]
    assert all(torch.equal(x, y) for r in runs[1:] for x, y in zip(runs[0], r))
    ref = torch.autograd.grad(reference_lda_route(q, c, a, tau=tau, top_k=top_k), (q, c, a, tau), dout.double())
    low = torch.autograd.grad(reference_lda_route(q, c, a, tau=tau, top_k=top_k, compute_dtype=torch.float32),
                              (q, c, a, tau), dout)
    for name, x, r, lo in zip(("dq", "dc", "da", "dtau"), runs[0], ref, low):
        assert_close_to_reference(name, x, r, lo, 1e-5)


# ------------------------------------------------------------------------------------------- the backend


def test_backend_reasons_for_routing():
    import rapkern
    from rapkern.backends.cuda import CudaBackend
    from rapkern.validate import check_route

    q, c, a = torch.randn(5, 8), torch.randn(70, 8), torch.randn(70, 4)
    why = CudaBackend().route_reasons(check_route(q, c, a, tau=0.1, top_k=65, normalize=True))
    assert any("device type 'cpu'" in w for w in why) and any("top_k = 65 > 64" in w for w in why)
    with pytest.raises(NotImplementedError, match="backend 'cuda' cannot run lda_route"):
        rapkern.lda_route(q, c, a, backend="cuda")


@pytest.mark.parametrize("top_k", [None, 3, 70])
def test_lda_route_through_the_backend_under_fake_cuda_tensors(top_k):
    """rapkern.lda_route(backend="cuda") end to end on fake CUDA tensors: reasons, the op call, the fake impl."""
    import rapkern
    from rapkern.backends.cuda import _load

    if _load.load() is not None:
        pytest.skip(_load.load())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(4, 5, 8, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(70, 8, device="cuda", dtype=torch.bfloat16)
        a = torch.empty(70, 6, device="cuda", dtype=torch.bfloat16)
        out = rapkern.lda_route(q, c, a, top_k=top_k, backend="cuda")
    assert out.shape == (4, 5, 6) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
