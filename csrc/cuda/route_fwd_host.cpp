// Host side of the CUDA forward of rapkern::route_fwd (lda_route, issue 15): the checks and layouts of
// route_problem.h, the outputs, and route_fwd.cu's launch on the current stream. UNVERIFIED ON A GPU (see there).
// The backward (route_bwd) returns the gradients with the inverse norms held fixed; routing.py finishes them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cuda/fwd_params.h"
#include "cuda/route_params.h"
#include "cuda/route_problem.h"

namespace rapkern::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_fwd_cuda(
    const at::Tensor& q, const at::Tensor& centroids, const at::Tensor& answers,
    const std::optional<at::Tensor>& cluster_mask, double tau, bool normalize, int64_t top_k) {
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<at::Tensor> held;
  RouteParams p = host::make_route_params(q, centroids, answers, cluster_mask, tau, normalize, top_k, true, held);
  const at::TensorOptions opts = q.options();
  at::Tensor out = at::empty({p.G, p.N, p.e}, opts);
  at::Tensor lse = at::empty({top_k == 0 ? p.G : 0, top_k == 0 ? p.N : 0}, opts.dtype(at::kFloat));
  at::Tensor w = at::empty({p.G, p.N, top_k}, opts.dtype(at::kFloat));
  at::Tensor idx = at::empty({p.G, p.N, top_k}, opts.dtype(at::kLong));
  const int64_t blocks = p.G * ((p.N + kRouteRows - 1) / kRouteRows);
  if (blocks == 0) return {out, lse, w, idx};
  TORCH_CHECK(blocks <= 0x7fffffff, host::kRouteOp, ": G * ceil(N / ", kRouteRows, ") = ", blocks,
              " exceeds the grid's x limit");
  p.out = out.data_ptr();
  if (top_k == 0) {
    p.lse = lse.data_ptr<float>();
  } else {
    p.w = w.data_ptr<float>();
    p.idx = idx.data_ptr<int64_t>();
  }
  const auto dt = q.scalar_type();
  const int dtype = dt == at::kFloat ? kF32 : dt == at::kHalf ? kF16 : kBF16;
  C10_CUDA_CHECK(launch_route_fwd(p, dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse, w, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& centroids, const at::Tensor& answers,
    const std::optional<at::Tensor>& cluster_mask, double tau, bool normalize, int64_t top_k, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& weights, const at::Tensor& indices) {
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<at::Tensor> held;
  at::Tensor dq, dc, da, dz_logp;
  RouteBwdParams p = host::make_route_bwd_params(dout, q, centroids, answers, cluster_mask, tau, normalize, top_k,
                                                 out, lse, weights, indices, true, held, &dq, &dc, &da, &dz_logp);
  const int64_t blocks = p.f.G * ((std::max(p.f.N, p.f.n) + kRouteRows - 1) / kRouteRows);
  if (p.f.G * p.f.N == 0) {
    dc.zero_();
    da.zero_();
    return {dq, dc, da, dz_logp};
  }
  TORCH_CHECK(blocks <= 0x7fffffff, host::kRouteOp, ": the backward's grid (", blocks,
              " blocks) exceeds the x limit");
  const auto dt = q.scalar_type();
  const int dtype = dt == at::kFloat ? kF32 : dt == at::kHalf ? kF16 : kBF16;
  C10_CUDA_CHECK(launch_route_bwd(p, dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dc, da, dz_logp};
}

}  // namespace
}  // namespace rapkern::cuda

TORCH_LIBRARY_IMPL(rapkern, CUDA, m) {
  m.impl("route_fwd", &rapkern::cuda::route_fwd_cuda);
  m.impl("route_bwd", &rapkern::cuda::route_bwd_cuda);
}
