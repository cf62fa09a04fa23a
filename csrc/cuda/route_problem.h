// Host side of the CUDA routing forward, device-independent part: checks rapkern::route_fwd's contract
// (csrc/ops.cpp; messages name the argument) and fills a RouteParams, establishing the kernels' layouts with at::
// ops: a non-unit last stride is copied, the inverse centroid norms are computed once per call (float32).
// Used by route_fwd_host.cpp (CUDA tensors) and by tests/test_cuda_routing.py's host emulation (CPU tensors,
// expect_cuda = false), so the emulated kernels run on exactly the parameters the real ones get.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "cuda/route_params.h"

namespace rapkern::cuda::host {

constexpr const char* kRouteOp = "rapkern::route_fwd (CUDA)";

inline at::Tensor route_unit_last(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// `held` keeps the copies alive until the launch is queued (the caching allocator is stream-ordered).
inline RouteParams make_route_params(const at::Tensor& q_in, const at::Tensor& c_in, const at::Tensor& a_in,
                                     const std::optional<at::Tensor>& cluster_mask, double tau, bool normalize,
                                     int64_t top_k, bool expect_cuda, std::vector<at::Tensor>& held) {
  TORCH_CHECK(q_in.is_cuda() == expect_cuda, kRouteOp, ": q must be a ", expect_cuda ? "CUDA" : "CPU",
              " tensor, got device ", q_in.device());
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kRouteOp,
              ": q dtype must be float32, float16 or bfloat16, got ", dt);
  const std::pair<const char*, const at::Tensor*> named[] = {{"q", &q_in}, {"centroids", &c_in}, {"answers", &a_in}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 3, kRouteOp, ": ", name, " must be 3-D (G, rows, features), got shape ", t->sizes());
    TORCH_CHECK(t->device() == q_in.device(), kRouteOp, ": ", name, " must be on q's device ", q_in.device(),
                ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == dt, kRouteOp, ": ", name, " must have q's dtype ", dt, ", got ",
                t->scalar_type());
  }
  RouteParams p;
  p.G = q_in.size(0), p.N = q_in.size(1), p.d = q_in.size(2), p.n = c_in.size(1), p.e = a_in.size(2);
  TORCH_CHECK(c_in.size(0) == p.G && a_in.size(0) == p.G, kRouteOp, ": centroids and answers must have G = ", p.G,
              " groups (stride 0 for a shared table), got ", c_in.size(0), " and ", a_in.size(0));
  TORCH_CHECK(c_in.size(2) == p.d, kRouteOp, ": centroids must have q's feature dim d = ", p.d, ", got ",
              c_in.size(2));
  TORCH_CHECK(a_in.size(1) == p.n, kRouteOp, ": answers must have n = ", p.n, " rows as centroids, got ",
              a_in.size(1));
  TORCH_CHECK(p.n >= 1, kRouteOp, ": centroids must hold at least one cluster");
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, kRouteOp, ": tau must be finite and > 0, got ", tau);
  TORCH_CHECK_VALUE(top_k >= 0 && top_k <= p.n && top_k <= kRouteMaxTopK, kRouteOp, ": top_k must be 0 (dense) or ",
                    "in [1, min(n, ", kRouteMaxTopK, ")] = [1, ", std::min<int64_t>(p.n, kRouteMaxTopK), "], got ",
                    top_k);
  const at::Tensor q = route_unit_last(q_in), c = route_unit_last(c_in), a = route_unit_last(a_in);
  held.insert(held.end(), {q, c, a});
  p.q = q.data_ptr(), p.c = c.data_ptr(), p.a = a.data_ptr();
  p.q_sg = q.stride(0), p.q_sn = q.stride(1), p.c_sg = c.stride(0), p.c_sn = c.stride(1);
  p.a_sg = a.stride(0), p.a_sn = a.stride(1);
  if (cluster_mask.has_value()) {
    const at::Tensor& m = *cluster_mask;
    TORCH_CHECK(m.device() == q_in.device(), kRouteOp, ": cluster_mask must be on q's device ", q_in.device(),
                ", got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, kRouteOp, ": cluster_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == p.G && m.size(1) == p.n, kRouteOp,
                ": cluster_mask must have shape (G, n) = (", p.G, ", ", p.n, "), got ", m.sizes());
    p.mask = m.data_ptr<bool>();
    p.m_sg = m.stride(0), p.m_sn = m.stride(1);
  }
  // The inverse centroid norms, once per call (not per query row): 1 / max(|c_j|, eps), as reference_lda_route.
  // A shared table (group stride 0) is normed once, not once per group.
  const bool shared = p.G > 1 && c.stride(0) == 0;
  const at::Tensor table = shared ? c.select(0, 0).unsqueeze(0) : c;
  at::Tensor rc = normalize ? table.to(at::kFloat).norm(2, {-1}).clamp_min(1e-8).reciprocal()
                            : at::ones({table.size(0), p.n}, q.options().dtype(at::kFloat));
  rc = rc.contiguous();
  held.push_back(rc);
  p.rc = rc.data_ptr<float>();
  p.rc_sg = shared ? 0 : p.n;
  p.inv_tau = static_cast<float>(1.0 / tau);
  p.normalize = normalize;
  p.top_k = static_cast<int>(top_k);
  return p;
}

// The backward's parameters: the forward's (make_route_params) plus dout, the per-row scales rs_i = rq_i / τ and
// δ_i = dout_i·out_i (float32, computed here with at:: ops), the saved lse or top-k weights and indices, and
// float32 outputs U (G, N, d), V (G, n, d), dA (G, n, e) and dτ's row terms (G, N) allocated here.
inline RouteBwdParams make_route_bwd_params(const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& c,
                                            const at::Tensor& a, const std::optional<at::Tensor>& cluster_mask,
                                            double tau, bool normalize, int64_t top_k, const at::Tensor& out,
                                            const at::Tensor& lse, const at::Tensor& weights,
                                            const at::Tensor& indices, bool expect_cuda,
                                            std::vector<at::Tensor>& held, at::Tensor* dq, at::Tensor* dc,
                                            at::Tensor* da, at::Tensor* dz_logp) {
  RouteBwdParams p;
  p.f = make_route_params(q, c, a, cluster_mask, tau, normalize, top_k, expect_cuda, held);
  const RouteParams& f = p.f;
  const std::pair<const char*, const at::Tensor*> same[] = {{"dout", &dout_in}, {"out", &out}};
  for (const auto& [name, t] : same) {
    TORCH_CHECK(t->device() == q.device() && t->scalar_type() == q.scalar_type(), kRouteOp, ": ", name,
                " must have q's device and dtype");
    TORCH_CHECK(t->dim() == 3 && t->size(0) == f.G && t->size(1) == f.N && t->size(2) == f.e, kRouteOp, ": ",
                name, " must have shape (G, N, e) = (", f.G, ", ", f.N, ", ", f.e, "), got ", t->sizes());
  }
  const at::Tensor dout = route_unit_last(dout_in);
  held.push_back(dout);
  p.dout = dout.data_ptr();
  p.dout_sg = dout.stride(0), p.dout_sn = dout.stride(1);
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor rs = normalize ? q.to(at::kFloat).norm(2, {-1}).clamp_min(1e-8).reciprocal().mul(1.0 / tau)
                            : at::full({f.G, f.N}, 1.0 / tau, f32);
  at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  rs = rs.contiguous(), delta = delta.contiguous();
  held.insert(held.end(), {rs, delta});
  p.rs = rs.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  if (top_k == 0) {
    TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == f.G && lse.size(1) == f.N,
                kRouteOp, ": lse must be float32 (G, N) = (", f.G, ", ", f.N, "), got ", lse.sizes());
    const at::Tensor l = lse.contiguous();
    held.push_back(l);
    p.lse = l.data_ptr<float>();
  } else {
    TORCH_CHECK(weights.scalar_type() == at::kFloat && indices.scalar_type() == at::kLong &&
                    weights.sizes() == indices.sizes() && weights.dim() == 3 && weights.size(0) == f.G &&
                    weights.size(1) == f.N && weights.size(2) == top_k,
                kRouteOp, ": weights (float32) and indices (int64) must have shape (G, N, top_k) = (", f.G, ", ",
                f.N, ", ", top_k, "), got ", weights.sizes(), " and ", indices.sizes());
    const at::Tensor w = weights.contiguous(), i = indices.contiguous();
    held.insert(held.end(), {w, i});
    p.w = w.data_ptr<float>();
    p.idx = i.data_ptr<int64_t>();
  }
  *dq = at::empty({f.G, f.N, f.d}, f32);
  *dc = at::empty({f.G, f.n, f.d}, f32);
  *da = at::empty({f.G, f.n, f.e}, f32);
  p.dq = dq->data_ptr<float>();
  p.dc = dc->data_ptr<float>();
  p.da = da->data_ptr<float>();
  *dz_logp = at::zeros({f.G, f.N}, f32);
  p.dz_logp = dz_logp->data_ptr<float>();
  return p;
}

}  // namespace rapkern::cuda::host
