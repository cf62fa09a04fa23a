// The forward kernel of attention_fwd.cu (see there), in a header so that tests/test_cuda_ext.py can also
// compile it for the host under a small CUDA emulation (csrc/cuda/host_emulation.h: 256 std::threads per CTA,
// barriers for __syncthreads/__syncwarp, shuffles through shared slots) and check its numerics on a CPU.
// Everything here is device code; nothing in it may use more of CUDA than that emulation provides.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/fwd_params.h"
#include "cuda/index.h"

namespace rapkern::cuda {
namespace fwd {

constexpr int BM = 64;   // query rows per CTA
constexpr int BN = 32;   // keys per tile
constexpr int NT = 256;  // threads per CTA: 4 per query row
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// alpha_h * B[i, j] added to the scaled score x (prior kinds 1-4); a dense -inf entry masks for every alpha.
__device__ __forceinline__ float add_prior(const FwdParams& p, float a, int64_t b, int64_t h, int64_t i, int64_t j,
                                           int64_t lag_const, float x) {
  switch (p.kind) {
    case kLag: {
      const int64_t idx = lag_const >= 0 ? lag_const : lag_index(p.half, i, j);
      return x + a * p.p0[prior_offset(p.a0, b, h, 0, idx)];
    }
    case kBanded:
      if (!band_inside(p.half, i, j)) return x;
      return x + a * p.p0[prior_offset(p.a0, b, h, i, band_offset(p.half, i, j))];
    case kLowRank: {
      float acc = 0.f;
      const float* u = p.p0 + prior_offset(p.a0, b, h, i, 0);
      const float* v = p.p1 + prior_offset(p.a1, b, h, j, 0);
      for (int64_t c = 0; c < p.half; ++c) acc = fmaf(u[c * p.a0.sc], v[c * p.a1.sc], acc);
      return x + a * acc;
    }
    case kDense: {
      const float bias = p.p0[prior_offset(p.a0, b, h, i, j)];
      return bias == -INFINITY ? -INFINITY : x + a * bias;
    }
    default:
      return x;
  }
}

// Stages keys [j0, j0 + TN) of K and V (rows past Lk: 0) and their masked flags (past Lk or padded) into shared
// memory, all NT threads of the CTA sharing the work; the caller puts the barriers around it.
template <typename T, int D, int TN>
__device__ __forceinline__ void stage_key_tile(const FwdParams& p, const T* kbase, const T* vbase, int64_t b,
                                               int64_t j0, int tid, T (*ks)[D], T (*vs)[D], bool* kmasked) {
  for (int e = tid; e < TN * D; e += NT) {
    const int jj = e / D, d = e % D;
    const int64_t j = j0 + jj;
    ks[jj][d] = j < p.Lk ? kbase[j * p.k_sl + d] : from_f<T>(0.f);
    vs[jj][d] = j < p.Lk ? vbase[j * p.v_sl + d] : from_f<T>(0.f);
  }
  if (tid < TN) {
    const int64_t j = j0 + tid;
    kmasked[tid] = j >= p.Lk || (p.kpm != nullptr && p.kpm[b * p.kpm_sb + j * p.kpm_sl]);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(NT) attention_fwd_kernel(const FwdParams p) {
  constexpr int DQ = D / 4;  // head-dim columns per thread
  __shared__ T ks[BN][D];
  __shared__ T vs[BN][D];
  __shared__ bool kmasked[BN];
  __shared__ float sc[BM][BN + 1];  // the scores / logits of the tile (+1: rows on different banks)

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int tid = threadIdx.x, r = tid >> 2, part = tid & 3;
  const int64_t i = i0 + r;
  const bool row_ok = i < p.Lq;

  const T* qrow = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + (row_ok ? i : 0) * p.q_sl;
  float q[DQ], o[DQ];
#pragma unroll
  for (int m = 0; m < DQ; ++m) {
    q[m] = row_ok ? to_f(qrow[part + 4 * m]) : 0.f;
    o[m] = 0.f;
  }
  float row_max = -INFINITY, row_sum = 0.f;
  const float a = p.alpha ? p.alpha[h * p.alpha_s] : p.alpha_value;
  const bool use_prior = p.kind == kDense || (p.kind != kNone && a != 0.f);
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;

  int64_t jb_lo = 0, jb_hi = 0;
  key_block_range(p.causal, p.band_masked, p.half, p.Lk, i0, imin(i0 + BM, p.Lq), BN, &jb_lo, &jb_hi);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  for (int64_t jb = jb_lo; jb < jb_hi; ++jb) {
    const int64_t j0 = jb * BN;
    __syncthreads();  // the previous tile's readers are done
    stage_key_tile<T, D, BN>(p, kbase, vbase, b, j0, tid, ks, vs, kmasked);
    __syncthreads();

    // Scores: the four threads of a row sum their partial dot products (lanes 4k..4k+3 of one warp), the
    // lane with jj % 4 == part stores it; then each lane finishes its own 8 entries (scale, prior, masks).
#pragma unroll 1
    for (int jj = 0; jj < BN; ++jj) {
      float acc = 0.f;
#pragma unroll
      for (int m = 0; m < DQ; ++m) acc = fmaf(q[m], to_f(ks[jj][part + 4 * m]), acc);
      acc += __shfl_xor_sync(kFull, acc, 1);
      acc += __shfl_xor_sync(kFull, acc, 2);
      if ((jj & 3) == part) sc[r][jj] = acc;
    }
    const int64_t lag_const = p.kind == kLag ? lag_tile_const_index(p.half, i0, BM, j0, BN) : -1;
#pragma unroll 1
    for (int jj = part; jj < BN; jj += 4) {
      const int64_t j = j0 + jj;
      const bool masked =
          !row_ok || kmasked[jj] || (p.causal && j > i) || (p.band_masked && !band_inside(p.half, i, j));
      float x = sc[r][jj] * p.scale;
      if (!masked && use_prior) x = add_prior(p, a, b, h, i, j, lag_const, x);
      sc[r][jj] = masked ? -INFINITY : x;
    }
    __syncwarp();
    float tile_max = -INFINITY;
#pragma unroll 1
    for (int jj = 0; jj < BN; ++jj) tile_max = fmaxf(tile_max, sc[r][jj]);
    const float new_max = fmaxf(row_max, tile_max);
    if (new_max == -INFINITY) continue;  // nothing visible to this row yet (no barrier skipped: the loop is uniform)
    const float corr = expf(row_max - new_max);  // 0 when row_max was -inf
    row_sum *= corr;
#pragma unroll
    for (int m = 0; m < DQ; ++m) o[m] *= corr;
#pragma unroll 1
    for (int jj = 0; jj < BN; ++jj) {
      float pj = expf(sc[r][jj] - new_max);  // 0 for a masked entry
      row_sum += pj;
      if (p.dropout_p > 0.f && pj != 0.f) {
        const uint64_t idx = dropout_index(b, h, i, j0 + jj, p.Hq, p.Lq, p.Lk);
        pj = dropout_uniform(p.seed, idx) >= p.dropout_p ? pj * keep_scale : 0.f;
      }
      if (pj != 0.f) {
#pragma unroll
        for (int m = 0; m < DQ; ++m) o[m] = fmaf(pj, to_f(vs[jj][part + 4 * m]), o[m]);
      }
    }
    row_max = new_max;
  }

  if (!row_ok) return;
  T* orow = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Lq + i) * p.Dv;
  const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
#pragma unroll
  for (int m = 0; m < DQ; ++m) orow[part + 4 * m] = from_f<T>(o[m] * inv);
  if (part == 0) p.lse[(b * p.Hq + h) * p.Lq + i] = row_sum > 0.f ? row_max + logf(row_sum) : -INFINITY;
}

}  // namespace fwd
}  // namespace rapkern::cuda
