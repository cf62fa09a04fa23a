// The routing backward kernels of route_bwd.cu (the math: RouteBwdParams in route_params.h), in a header so that
// tests/test_cuda_routing.py can run their code under csrc/cuda/host_emulation.h. Device code only.
//
// Two kernels, each output element owned by one lane and summed in a fixed order (no atomics: deterministic):
//  - rows: one warp per query row i, U_i = Σ_j dX_ij c_j (and dτ's row term) over the row's entries (every present cluster, or the K
//    selected ones), lanes over d (32·kCols columns per pass, the entries recomputed for each pass);
//  - clusters: one warp per (group, cluster j), V_j = Σ_i dX_ij q_i and dA_j = Σ_i P_ij dout_i over the group's
//    rows (top-k: the rows that selected j), lanes over d and e.
// P is recomputed from the saved lse (dense) or read from the saved weights (top-k); rows of a group with no
// present cluster (lse -inf, weights 0) contribute nothing.
#pragma once

#include "cuda/route_fwd_kernel.cuh"
#include "cuda/route_params.h"

namespace rapkern::cuda::route {

template <typename T>
__device__ float warp_dot(const T* x, const T* y, int64_t len, int lane) {
  float acc = 0.f;
  for (int64_t k = lane; k < len; k += 32) acc = fmaf(to_float(x[k]), to_float(y[k]), acc);
  return warp_sum(acc);
}

// P_ij of row `row` (= g·N + i) for cluster j: from lse (dense) or the saved top-k entry t (-1: j not selected).
template <typename T>
__device__ float weight_of(const RouteBwdParams& p, const T* q, int64_t g, int64_t j, int64_t row, int64_t t,
                          int lane) {
  if (p.f.top_k > 0) return t < 0 ? 0.f : p.w[row * p.f.top_k + t];
  if (absent(p.f, g, j)) return 0.f;
  return expf(score(p.f, q, g, j, p.rs[row], lane) - p.lse[row]);
}

template <typename T>
__global__ void __launch_bounds__(kRouteRows * 32) route_bwd_rows_kernel(const RouteBwdParams p) {
  const RouteParams& f = p.f;
  const Row r = row_of_warp(f);
  if (!r.live) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t row = r.g * f.N + r.i;
  const T* q = static_cast<const T*>(f.q) + r.g * f.q_sg + r.i * f.q_sn;
  const T* dout = static_cast<const T*>(p.dout) + r.g * p.dout_sg + r.i * p.dout_sn;
  const T* a_g = static_cast<const T*>(f.a) + r.g * f.a_sg;
  const T* c_g = static_cast<const T*>(f.c) + r.g * f.c_sg;
  const bool dead = f.top_k == 0 && p.lse[row] == -INFINITY;
  const int64_t entries = f.top_k > 0 ? f.top_k : f.n;
  float* u = p.dq + row * f.d;
  // dτ's row term Σ_j dZ_ij·log P_ij (Σ_j dZ_ij = 0, so this is Σ_j dZ_ij z_ij without its cancellation),
  // summed in the first column pass
  float dz_logp = 0.f;
  for (int64_t d0 = 0; d0 < f.d; d0 += 32 * kCols) {
    float acc[kCols] = {};
    for (int64_t t = 0; t < entries && !dead; ++t) {
      const int64_t j = f.top_k > 0 ? p.idx[row * f.top_k + t] : t;
      const float P = weight_of(p, q, r.g, j, row, t, lane);
      if (P == 0.f) continue;  // the same on every lane
      const float dZ = P * (warp_dot(dout, a_g + j * f.a_sn, f.e, lane) - p.delta[row]);
      if (d0 == 0) dz_logp = fmaf(dZ, logf(P), dz_logp);
      const float dX = dZ * p.rs[row] * f.rc[r.g * f.rc_sg + j];
      const T* c = c_g + j * f.c_sn;
      for (int k = 0; k < kCols; ++k) {
        const int64_t col = d0 + lane + 32 * k;
        if (col < f.d) acc[k] = fmaf(dX, to_float(c[col]), acc[k]);
      }
    }
    for (int k = 0; k < kCols; ++k) {
      const int64_t col = d0 + lane + 32 * k;
      if (col < f.d) u[col] = acc[k];
    }
  }
  if (lane == 0) p.dz_logp[row] = dz_logp;
}

template <typename T>
__global__ void __launch_bounds__(kRouteRows * 32) route_bwd_clusters_kernel(const RouteBwdParams p) {
  const RouteParams& f = p.f;
  const int64_t blocks = (f.n + kRouteRows - 1) / kRouteRows;
  const int64_t g = static_cast<int64_t>(blockIdx.x) / blocks;
  const int64_t j = (static_cast<int64_t>(blockIdx.x) - g * blocks) * kRouteRows + threadIdx.x / 32;
  if (j >= f.n) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* a = static_cast<const T*>(f.a) + g * f.a_sg + j * f.a_sn;
  const float rc = f.rc[g * f.rc_sg + j];
  float* v = p.dc + (g * f.n + j) * f.d;
  float* da = p.da + (g * f.n + j) * f.e;
  const int64_t width = f.d > f.e ? f.d : f.e;
  for (int64_t c0 = 0; c0 < width; c0 += 32 * kCols) {
    float acc_v[kCols] = {}, acc_a[kCols] = {};
    for (int64_t i = 0; i < f.N; ++i) {
      const int64_t row = g * f.N + i;
      if (f.top_k == 0 && p.lse[row] == -INFINITY) continue;
      int64_t t = -1;
      if (f.top_k > 0) {
        for (int64_t s = 0; s < f.top_k && t < 0; ++s) t = p.idx[row * f.top_k + s] == j ? s : -1;
        if (t < 0) continue;
      }
      const T* q = static_cast<const T*>(f.q) + g * f.q_sg + i * f.q_sn;
      const float P = weight_of(p, q, g, j, row, t, lane);
      if (P == 0.f) continue;
      const T* dout = static_cast<const T*>(p.dout) + g * p.dout_sg + i * p.dout_sn;
      const float dX = P * (warp_dot(dout, a, f.e, lane) - p.delta[row]) * p.rs[row] * rc;
      for (int k = 0; k < kCols; ++k) {
        const int64_t col = c0 + lane + 32 * k;
        if (col < f.d) acc_v[k] = fmaf(dX, to_float(q[col]), acc_v[k]);
        if (col < f.e) acc_a[k] = fmaf(P, to_float(dout[col]), acc_a[k]);
      }
    }
    for (int k = 0; k < kCols; ++k) {
      const int64_t col = c0 + lane + 32 * k;
      if (col < f.d) v[col] = acc_v[k];
      if (col < f.e) da[col] = acc_a[k];
    }
  }
}

}  // namespace rapkern::cuda::route
