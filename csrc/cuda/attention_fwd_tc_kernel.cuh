// The tensor-core forward of attention_fwd.cu (fp16 / bf16, head dims 64 and 128; see there), FlashAttention-2
// style, on mma.sync m16n8k16 with fp32 accumulation (csrc/cuda/mma.h). In a header so that
// tests/test_cuda_fwd_tc.py can also compile it for the host under csrc/cuda/host_emulation.h (one std::thread per
// CUDA thread, warp barriers, shuffles and an emulated warp-collective mma) and check its numerics on a CPU.
// Everything here is device code; nothing in it may use more of CUDA than that emulation provides.
//
// CTA: NW = 4 warps, BM = 64 query rows (warp w owns rows 16w..16w+15 of the block), key tiles of BN = 64.
// Per CTA: the Q block is staged once through shared memory into A fragments held in registers
// (D/16 x 4 registers per lane). Per key tile: K and V (BN x D, input dtype, rows padded by 8 elements so the
// fragment reads hit distinct banks) and the tile's key-padding flags are staged in shared memory; each warp
//   S (16 x BN, fp32) = Q·Kᵀ: BN/8 n-tiles x D/16 k-steps of mma, K's B fragments by ldmatrix.x4 (two k-steps);
//   per accumulator element (row i, key j): scale, prior (fwd::add_prior, the scalar kernel's semantics),
//     causal / padding / band masks -> -inf;
//   online softmax per row, in base 2 (logits x log2 e, then exp2): a row's BN entries live in the 4 lanes of
//     one quad (2 per n-tile per lane), so the row max is a lane max then __shfl_xor_sync 1 and 2; the running
//     sum l stays a per-lane partial (reduced across the quad at the end); o and l are rescaled by
//     exp2(m_old - m_new);
//   dropout per element (the CPU kernels' hash and counter), kept p scaled by 1/(1 - p), l sums undropped p;
//   P rounded to the input dtype and re-read as A fragments (C layout of n-tiles 2c, 2c+1 = A layout of key
//     chunk c), O (16 x D, fp32) += P·V: BN/16 k-steps x D/8 n-tiles of mma, V's B fragments by
//     ldmatrix.x4.trans (two n-tiles).
// Rows with no visible key keep m = -inf (their exponentials use 0 as the shift, so p = 0, never NaN) and end
// with out 0, lse -inf.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>

#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/fwd_params.h"
#include "cuda/index.h"
#include "cuda/mma.h"

namespace rapkern::cuda {
namespace fwd_tc {

constexpr int BM = 64;        // query rows per CTA
constexpr int BN = 64;        // keys per tile
constexpr int NW = 4;         // warps per CTA, 16 query rows each
constexpr int NT = NW * 32;   // threads per CTA
constexpr int PAD = 8;        // elements added to each shared row (16 bytes)
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Copies rows [r0, r0 + rows_valid) of a (rows, D) tile with row stride `sl` (elements, last stride 1) into
// dst[BN][D + PAD]; rows past rows_valid become 0. 16-byte chunks when every row start is 16-byte aligned.
template <typename T, int D>
__device__ __forceinline__ void stage_rows(T (*dst)[D + PAD], const T* base, int64_t sl, int64_t r0,
                                           int64_t rows_valid, int tid) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte chunk
  const bool vec = (reinterpret_cast<uintptr_t>(base) % 16 == 0) && (sl % kVec == 0);
  if (vec) {
    for (int e = tid; e < BN * (D / kVec); e += NT) {
      const int rr = e / (D / kVec), c = (e % (D / kVec)) * kVec;
      uint4 val{0u, 0u, 0u, 0u};
      if (rr < rows_valid) val = *reinterpret_cast<const uint4*>(base + (r0 + rr) * sl + c);
      *reinterpret_cast<uint4*>(&dst[rr][c]) = val;
    }
  } else {
    for (int e = tid; e < BN * D; e += NT) {
      const int rr = e / D, c = e % D;
      dst[rr][c] = rr < rows_valid ? base[(r0 + rr) * sl + c] : fwd::from_f<T>(0.f);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(NT) attention_fwd_tc_kernel(const FwdParams p) {
  static_assert(BM == NW * 16 && BM == BN, "the Q block is staged through the K buffer");
  static_assert(D % 32 == 0, "head dim a multiple of 32 (pairs of k-steps and of n-tiles per ldmatrix.x4)");
  constexpr int LDS = D + PAD;
  constexpr int KD = D / 16;   // k-steps of Q·Kᵀ
  constexpr int NS = BN / 8;   // n-tiles of S
  constexpr int NO = D / 8;    // n-tiles of O
  __shared__ __align__(16) T ks[BN][LDS];
  __shared__ __align__(16) T vs[BN][LDS];
  __shared__ bool kmasked[BN];

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t i_lo = i0 + 16 * warp + mma::group_of(lane);  // this lane's rows: i_lo (c0, c1), i_lo + 8 (c2, c3)
  const int64_t rows[2] = {i_lo, i_lo + 8};

  // Q block -> A fragments (through the K buffer; rows past Lq are 0).
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  stage_rows<T, D>(ks, qbase, p.q_sl, i0, imin(BM, p.Lq - i0), tid);
  __syncthreads();
  uint32_t qa[KD][4];
#pragma unroll
  for (int kc = 0; kc < KD; ++kc) mma::a_from_row_major<T>(qa[kc], &ks[16 * warp][16 * kc], LDS, lane);

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this lane's partial
  const float a = p.alpha ? p.alpha[h * p.alpha_s] : p.alpha_value;
  const bool use_prior = p.kind == kDense || (p.kind != kNone && a != 0.f);
  const float keep_scale = p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;

  int64_t jb_lo = 0, jb_hi = 0;
  key_block_range(p.causal, p.band_masked, p.half, p.Lk, i0, imin(i0 + BM, p.Lq), BN, &jb_lo, &jb_hi);
  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + hk * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + hk * p.v_sh;

  for (int64_t jb = jb_lo; jb < jb_hi; ++jb) {
    const int64_t j0 = jb * BN;
    __syncthreads();  // the previous tile's (or the Q block's) readers are done
    const int64_t nvalid = imin(BN, p.Lk - j0);
    stage_rows<T, D>(ks, kbase, p.k_sl, j0, nvalid, tid);
    stage_rows<T, D>(vs, vbase, p.v_sl, j0, nvalid, tid);
    if (tid < BN) {
      const int64_t j = j0 + tid;
      kmasked[tid] = j >= p.Lk || (p.kpm != nullptr && p.kpm[b * p.kpm_sb + j * p.kpm_sl]);
    }
    __syncthreads();

    float s[NS][4];
#pragma unroll
    for (int n = 0; n < NS; ++n) {
      s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KD; kc += 2) {  // two k-steps per ldmatrix.x4
        uint32_t kb0[2], kb1[2];
        mma::b2_from_n_major_ldsm<T>(kb0, kb1, &ks[8 * n][16 * kc], LDS, lane);
        mma::mma_16816<T>(s[n], qa[kc], kb0);
        mma::mma_16816<T>(s[n], qa[kc + 1], kb1);
      }
    }

    // Logits per accumulator element, and the tile's row max (over the quad).
    const int64_t lag_const = p.kind == kLag ? lag_tile_const_index(p.half, i0, BM, j0, BN) : -1;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int jj = 8 * n + mma::c_col(lane, e);
        const int64_t i = rows[e >> 1], j = j0 + jj;
        const bool masked = i >= p.Lq || kmasked[jj] || (p.causal && j > i) ||
                            (p.band_masked && !band_inside(p.half, i, j));
        float x = s[n][e] * p.scale;
        if (!masked && use_prior) x = fwd::add_prior(p, a, b, h, i, j, lag_const, x);
        s[n][e] = masked ? -INFINITY : x * kLog2e;  // base-2 logits: the exponentials below are exp2
        tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
      }
    }
    float shift[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFull, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(kFull, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      shift[r] = new_max == -INFINITY ? 0.f : new_max;  // nothing visible yet: every p below is exp(-inf) = 0
      const float corr = exp2f(row_max[r] - shift[r]);   // 0 when row_max was -inf (o and l are 0 then)
      row_sum[r] *= corr;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[n][2 * r] *= corr;
        o[n][2 * r + 1] *= corr;
      }
      row_max[r] = new_max;
    }

    // P = exp(S - m) in place (l sums it before dropout), dropout, then O += P·V.
#pragma unroll
    for (int n = 0; n < NS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = exp2f(s[n][e] - shift[e >> 1]);
        row_sum[e >> 1] += pe;
        if (p.dropout_p > 0.f && pe != 0.f) {
          const uint64_t idx = dropout_index(b, h, rows[e >> 1], j0 + 8 * n + mma::c_col(lane, e), p.Hq, p.Lq, p.Lk);
          pe = dropout_uniform(p.seed, idx) >= p.dropout_p ? pe * keep_scale : 0.f;
        }
        s[n][e] = pe;
      }
    }
#pragma unroll
    for (int c = 0; c < BN / 16; ++c) {
      uint32_t pa[4];
      mma::a_from_accumulators<T>(pa, s[2 * c], s[2 * c + 1]);
#pragma unroll
      for (int n = 0; n < NO; n += 2) {  // two n-tiles per ldmatrix.x4.trans
        uint32_t vb0[2], vb1[2];
        mma::b2_from_k_major_ldsm<T>(vb0, vb1, &vs[16 * c][8 * n], LDS, lane);
        mma::mma_16816<T>(o[n], pa, vb0);
        mma::mma_16816<T>(o[n + 1], pa, vb1);
      }
    }
  }

  // Epilogue: l summed over the quad; out = o / l (0 for an empty row), lse = ln 2 · (m + log2 l) (-inf for one).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(kFull, row_sum[r], 2);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = rows[r];
    if (i >= p.Lq) continue;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    T* orow = out + ((b * p.Hq + h) * p.Lq + i) * p.Dv;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int col = 8 * n + mma::c_col(lane, 2 * r);  // even: the pair (col, col + 1) is one 32-bit store
      *reinterpret_cast<uint32_t*>(orow + col) =
          mma::pack2<T>(mma::round_to<T>(o[n][2 * r] * inv), mma::round_to<T>(o[n][2 * r + 1] * inv));
    }
    if (mma::thread_in_group(lane) == 0) {
      const float lse = (row_max[r] + log2f(row_sum[r])) * kLn2;
      p.lse[(b * p.Hq + h) * p.Lq + i] = row_sum[r] > 0.f ? lse : -INFINITY;
    }
  }
}

}  // namespace fwd_tc
}  // namespace rapkern::cuda
