// The routing forward kernels of route_fwd.cu, in a header so that tests/test_cuda_routing.py can also compile
// them for the host under csrc/cuda/host_emulation.h and check them on a CPU. Device code only, using no more of
// CUDA than that emulation provides (threads, __syncwarp, float __shfl_xor_sync, static __shared__).
//
// One warp per query row, kRouteRows rows per CTA; grid dim 0 = G · row blocks (CUDA allows 2^31 - 1 there).
// Scores z_j = (q·c_j) · rq · rc_j / τ in fp32: a lane-strided partial dot over d, summed by a butterfly of
// shuffles, which leaves every lane with the same value (each step adds the same two numbers in either order), so
// the warp takes its branches together. Cluster loops run in index order: results are deterministic.
//  - dense: pass 1 keeps the running max and sum of exp (online softmax) over the present clusters; pass 2
//    recomputes each score, w_j = exp(z_j - m) / l, and each lane accumulates its output columns (32·kCols per
//    pass over the clusters; more passes for a wider e). A row of a group with no present cluster gets out 0 and
//    lse -inf (reference_lda_route: weight 0 everywhere).
//  - top-k: lane 0 keeps the row's K best (score desc, index asc; absent clusters score -inf, so they rank last
//    in index order, as the reference's stable sort does) in shared memory by insertion; then softmax over the
//    winners and out = Σ_t w_t a[idx_t]. A group with no present cluster: indices 0..K-1, weights 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/route_params.h"

namespace rapkern::cuda::route {

constexpr int kCols = 4;  // output columns per lane and pass: 128 per warp
constexpr float kNormEps = 1e-8f;
constexpr unsigned kWarp = 0xffffffffu;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(kWarp, x, m);
  return x;
}

struct Row {
  int64_t g = 0, i = 0;
  bool live = false;
};

__device__ __forceinline__ Row row_of_warp(const RouteParams& p) {
  const int64_t blocks = (p.N + kRouteRows - 1) / kRouteRows;
  Row r;
  r.g = static_cast<int64_t>(blockIdx.x) / blocks;
  r.i = (static_cast<int64_t>(blockIdx.x) - r.g * blocks) * kRouteRows + static_cast<int64_t>(threadIdx.x / 32);
  r.live = r.i < p.N;
  return r;
}

// rq / τ for the row: 1 / max(|q_i|, eps) / τ with normalize, else 1 / τ.
template <typename T>
__device__ float row_scale(const RouteParams& p, const T* q, int lane) {
  if (!p.normalize) return p.inv_tau;
  float ss = 0.f;
  for (int64_t k = lane; k < p.d; k += 32) {
    const float x = to_float(q[k]);
    ss = fmaf(x, x, ss);
  }
  return p.inv_tau / fmaxf(sqrtf(warp_sum(ss)), kNormEps);
}

__device__ __forceinline__ bool absent(const RouteParams& p, int64_t g, int64_t j) {
  return p.mask != nullptr && p.mask[g * p.m_sg + j * p.m_sn];
}

// z_j for the row (the same value on every lane).
template <typename T>
__device__ float score(const RouteParams& p, const T* q, int64_t g, int64_t j, float rs, int lane) {
  const T* c = static_cast<const T*>(p.c) + g * p.c_sg + j * p.c_sn;
  float acc = 0.f;
  for (int64_t k = lane; k < p.d; k += 32) acc = fmaf(to_float(q[k]), to_float(c[k]), acc);
  return warp_sum(acc) * rs * p.rc[g * p.rc_sg + j];
}

template <typename T>
__global__ void __launch_bounds__(kRouteRows * 32) route_dense_kernel(const RouteParams p) {
  const Row r = row_of_warp(p);
  if (!r.live) return;  // the whole warp leaves together
  const int lane = static_cast<int>(threadIdx.x % 32);
  const T* q = static_cast<const T*>(p.q) + r.g * p.q_sg + r.i * p.q_sn;
  const float rs = row_scale(p, q, lane);
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j < p.n; ++j) {
    if (absent(p, r.g, j)) continue;
    const float z = score(p, q, r.g, j, rs, lane);
    if (z > m) {
      l = l * expf(m - z) + 1.f;  // expf(-inf) = 0 on the first present cluster
      m = z;
    } else {
      l += expf(z - m);
    }
  }
  if (lane == 0) p.lse[r.g * p.N + r.i] = l > 0.f ? m + logf(l) : -INFINITY;
  T* out = static_cast<T*>(p.out) + (r.g * p.N + r.i) * p.e;
  const T* a_g = static_cast<const T*>(p.a) + r.g * p.a_sg;
  const float inv_l = l > 0.f ? 1.f / l : 0.f;
  for (int64_t e0 = 0; e0 < p.e; e0 += 32 * kCols) {
    float acc[kCols] = {};
    if (l > 0.f) {
      for (int64_t j = 0; j < p.n; ++j) {
        if (absent(p, r.g, j)) continue;
        const float w = expf(score(p, q, r.g, j, rs, lane) - m) * inv_l;
        const T* a = a_g + j * p.a_sn;
        for (int t = 0; t < kCols; ++t) {
          const int64_t col = e0 + lane + 32 * t;
          if (col < p.e) acc[t] = fmaf(w, to_float(a[col]), acc[t]);
        }
      }
    }
    for (int t = 0; t < kCols; ++t) {
      const int64_t col = e0 + lane + 32 * t;
      if (col < p.e) store(out + col, acc[t]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kRouteRows * 32) route_topk_kernel(const RouteParams p) {
  __shared__ float best_z[kRouteRows][kRouteMaxTopK];
  __shared__ int64_t best_j[kRouteRows][kRouteMaxTopK];
  const Row r = row_of_warp(p);
  if (!r.live) return;
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  const int K = p.top_k;
  float* bz = best_z[warp];
  int64_t* bj = best_j[warp];
  const T* q = static_cast<const T*>(p.q) + r.g * p.q_sg + r.i * p.q_sn;
  const float rs = row_scale(p, q, lane);
  int count = 0;  // lane 0's list length (only lane 0 reads it)
  for (int64_t j = 0; j < p.n; ++j) {
    const float z = absent(p, r.g, j) ? -INFINITY : score(p, q, r.g, j, rs, lane);
    if (lane == 0 && (count < K || z > bz[K - 1])) {  // strictly greater: an equal score keeps the lower index
      int pos = count < K ? count : K - 1;
      while (pos > 0 && bz[pos - 1] < z) {
        bz[pos] = bz[pos - 1];
        bj[pos] = bj[pos - 1];
        --pos;
      }
      bz[pos] = z;
      bj[pos] = j;
      if (count < K) ++count;
    }
  }
  __syncwarp();
  const float top = bz[0];  // the row's largest score; -inf when the group has no present cluster
  float sum = 0.f;
  if (top > -INFINITY) {
    for (int t = 0; t < K; ++t) sum += expf(bz[t] - top);
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const int64_t row = r.g * p.N + r.i;
  if (lane == 0) {
    for (int t = 0; t < K; ++t) {
      p.w[row * K + t] = top > -INFINITY ? expf(bz[t] - top) * inv : 0.f;
      p.idx[row * K + t] = bj[t];
    }
  }
  T* out = static_cast<T*>(p.out) + row * p.e;
  const T* a_g = static_cast<const T*>(p.a) + r.g * p.a_sg;
  for (int64_t col = lane; col < p.e; col += 32) {
    float acc = 0.f;
    if (top > -INFINITY) {
      for (int t = 0; t < K; ++t) acc = fmaf(expf(bz[t] - top) * inv, to_float(a_g[bj[t] * p.a_sn + col]), acc);
    }
    store(out + col, acc);
  }
  __syncwarp();  // the shared list is not reused, but keep the warp together before it leaves
}

}  // namespace rapkern::cuda::route
