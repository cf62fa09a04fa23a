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
