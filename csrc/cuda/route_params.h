// The routing forward's parameters (rapkern::route_fwd, lda_route semantics): plain data shared by the host side
// (route_fwd_host.cpp, host compiler with ATen) and the kernels (route_fwd.cu, nvcc). Device pointers; strides
// in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace rapkern::cuda {

struct RouteParams {
  const void* q = nullptr;  // (G, N, d), unit last stride
  const void* c = nullptr;  // (G, n, d), unit last stride; group stride 0 for a shared table
  const void* a = nullptr;  // (G, n, e), unit last stride; group stride 0 for a shared table
  const float* rc = nullptr;  // (G, n) inverse centroid norms (1 without normalize), stride rc_sg per group
  const bool* mask = nullptr;  // (G, n), true = absent cluster; nullptr when there is no mask
  void* out = nullptr;          // (G, N, e) contiguous, q's dtype
  float* lse = nullptr;         // dense: (G, N) contiguous, natural log (-inf for a group with no cluster)
  float* w = nullptr;           // top-k: (G, N, K) contiguous
  int64_t* idx = nullptr;       // top-k: (G, N, K) contiguous
  int64_t q_sg = 0, q_sn = 0, c_sg = 0, c_sn = 0, a_sg = 0, a_sn = 0, rc_sg = 0, m_sg = 0, m_sn = 0;
  int64_t G = 0, N = 0, n = 0, d = 0, e = 0;
  float inv_tau = 1.f;
  bool normalize = true;
  int top_k = 0;  // 0: dense
};

constexpr int kRouteMaxTopK = 64;  // the top-k kernel keeps each row's winners in shared memory
constexpr int kRouteRows = 8;      // query rows per CTA: one warp each

// Launches the dense or top-k forward for dtype (DType of fwd_params.h) on `stream`; returns the launch error.
cudaError_t launch_route_fwd(const RouteParams& p, int dtype, cudaStream_t stream);

}  // namespace rapkern::cuda

namespace rapkern::cuda {

// The routing backward's parameters (rapkern::route_bwd): the forward's inputs (the RouteParams part: q, c, a,
// rc, mask, strides, sizes, top_k), the forward's results, and the outputs, all float32 and contiguous.
// With z_ij = (q_i·c_j)·rs_i·rc_j (rs_i = rq_i/τ) and P the routing weights: dP_ij = dout_i·a_j,
// dZ_ij = P_ij (dP_ij - δ_i) with δ_i = dout_i·out_i, and dX_ij = dZ_ij·rs_i·rc_j. The kernels give the gradients
// with the inverse norms held fixed, U_i = Σ_j dX_ij c_j, V_j = Σ_i dX_ij q_i, and dA_j = Σ_i P_ij dout_i; the
// normalization Jacobians and dτ are O(rows·d) torch ops (rapkern/backends/cuda/routing.py).
struct RouteBwdParams {
  RouteParams f;                 // the forward's inputs (out/lse/w/idx there unused)
  const void* dout = nullptr;    // (G, N, e), unit last stride, q's dtype
  int64_t dout_sg = 0, dout_sn = 0;
  const float* rs = nullptr;     // (G, N) rq_i / τ
  const float* delta = nullptr;  // (G, N) dout_i·out_i
  const float* lse = nullptr;    // dense: (G, N) natural log, -inf for a group with no cluster
  const float* w = nullptr;      // top-k: (G, N, K) weights
  const int64_t* idx = nullptr;  // top-k: (G, N, K) cluster indices
  float* dq = nullptr;           // U (G, N, d)
  float* dc = nullptr;           // V (G, n, d)
  float* da = nullptr;           // dA (G, n, e)
  float* dz_logp = nullptr;      // (G, N): Σ_j dZ_ij·log P_ij = Σ_j dZ_ij·(z_ij - lse_i), for dτ = -(1/τ) Σ_i of it
};

// Launches the row kernel (U) and the cluster kernel (V, dA); returns the first launch error.
cudaError_t launch_route_bwd(const RouteBwdParams& p, int dtype, cudaStream_t stream);

}  // namespace rapkern::cuda
