// The backward kernels of attention_bwd.cu (see there), in a header so that the host emulation test
// (tests/test_cuda_bwd.py, csrc/cuda/host_emulation.h) runs exactly this code on a CPU. Device code only, using
// no more of CUDA than the emulation provides (threads, __syncthreads, __syncwarp, __shfl_xor_sync).
//
// Both tile kernels recompute the forward's logits with fwd::add_prior (the same code, so the same rounding) and
//   p = exp(x - lse),  dp = dO·V,  kept = dropout mask (the forward's hash and counter),
//   pd = kept ? p / (1 - p_drop) : 0          (the matrix that multiplied V)
//   ds = p · ((kept ? dp / (1 - p_drop) : 0) - delta),   delta = rowsum(dO ∘ O) - dlse
// as csrc/cpu/attention_bwd.cpp does; rows without a visible key carry lse = +inf (p = 0) and delta = 0.
#pragma once

#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/bwd_params.h"

namespace rapkern::cuda {
namespace bwd {

using fwd::add_prior;
using fwd::from_f;
using fwd::kFull;
using fwd::to_f;

constexpr int BM = kBwdBM, BN = kBwdBN, KB = kBwdKB, QT = kBwdQT, NT = kBwdNT;
static_assert(NT == fwd::NT, "fwd::stage_key_tile spreads a tile over fwd::NT threads");

// Keys per tile of the dq kernel: 32, or 8 for float32 at head dim 128, where the dO rows, the K and V tiles
// and the score tile must share 48 KB of static shared memory.
// The sum over the TR lanes of a row (adjacent lanes of one warp), in a fixed order.
template <int TR>
__device__ __forceinline__ float row_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  x += __shfl_xor_sync(kFull, x, 2);
  if (TR == 8) x += __shfl_xor_sync(kFull, x, 4);
  return x;
}

template <typename T, int D>
constexpr int kQTileKeys = sizeof(T) == 4 && D == 128 ? 8 : BN;

__device__ __forceinline__ float alpha_of(const FwdParams& f, int64_t h) {
  return f.alpha ? f.alpha[h * f.alpha_s] : f.alpha_value;
}

// The raw prior value B[i, j] for dalpha (0 outside a band; a dense -inf entry counts as 0).
__device__ __forceinline__ float prior_value(const FwdParams& f, int64_t b, int64_t h, int64_t i, int64_t j) {
  switch (f.kind) {
    case kLag:
      return f.p0[prior_offset(f.a0, b, h, 0, lag_index(f.half, i, j))];
    case kBanded:
      return band_inside(f.half, i, j) ? f.p0[prior_offset(f.a0, b, h, i, band_offset(f.half, i, j))] : 0.f;
    case kLowRank: {
      float acc = 0.f;
      const float* u = f.p0 + prior_offset(f.a0, b, h, i, 0);
      const float* v = f.p1 + prior_offset(f.a1, b, h, j, 0);
      for (int64_t c = 0; c < f.half; ++c) acc = fmaf(u[c * f.a0.sc], v[c * f.a1.sc], acc);
      return acc;
    }
    case kDense: {
      const float x = f.p0[prior_offset(f.a0, b, h, i, j)];
      return x == -INFINITY ? 0.f : x;
    }
    default:
      return 0.f;
  }
}

// The logit of (i, j) as the forward computes it from the raw score s, or -inf when masked.
__device__ __forceinline__ float logit(const FwdParams& f, float a, bool use_prior, int64_t b, int64_t h, int64_t i,
                                       int64_t j, bool masked, int64_t lag_const, float s) {
  if (masked) return -INFINITY;
  const float x = s * f.scale;
  return use_prior ? add_prior(f, a, b, h, i, j, lag_const, x) : x;
}

__device__ __forceinline__ bool dropout_keep(const FwdParams& f, int64_t b, int64_t h, int64_t i, int64_t j) {
  return f.dropout_p <= 0.f || dropout_uniform(f.seed, dropout_index(b, h, i, j, f.Hq, f.Lq, f.Lk)) >= f.dropout_p;
}

// ------------------------------------------------------------------------------------------- dq kernel

// One CTA per (work item, block of RB = bwd_q_rows(D) query rows); the TR = D / 16 threads of row r own its
// head-dim columns part + TR·m (their q and dq slices in registers, their dO slice in shared memory). Per key
// tile of TN keys (K, V staged in shared memory): raw scores into sc, the row's lane jj % TR == part turns entry
// jj into the logit, then for every jj the row's lanes compute dp (shuffles), ds and their dq slice; ds goes back
// into sc for the prior gradients:
//   rows (band / dense: slab entry += alpha ds by the entry's owner lane; low-rank: du[i, c] += alpha ds v[j, c],
//   c = part + TR·n), partials (lag: per tile diagonal sums into this item's lag partial; dalpha: ds * B summed per
//   thread, then over the CTA in thread order). Every output element has one writer; all orders are fixed.
template <typename T, int D>
__global__ void __launch_bounds__(NT, 1) attention_bwd_q_kernel(const BwdParams p, const BwdPass s) {
  constexpr int TR = D / 16;       // threads per query row
  constexpr int RB = NT / TR;      // query rows per CTA (bwd_q_rows(D))
  constexpr int DQ = D / TR;       // head-dim columns per thread
  constexpr int TN = kQTileKeys<T, D>;
  static_assert(TR == 4 || TR == 8, "head dim 64 or 128");
  static_assert(TN % TR == 0 && RB + TN - 1 <= NT, "tile shape");
  __shared__ T dos[RB][D];  // the block's dO rows: in registers they would spill (q and dq stay there)
  __shared__ T ks[TN][D];
  __shared__ T vs[TN][D];
  __shared__ bool kmasked[TN];
  __shared__ float sc[RB][TN + 1];
  __shared__ float clamped[RB + TN];
  __shared__ float red[NT];

  const FwdParams& f = p.f;
  const int64_t qb = blockIdx.y, i0 = qb * RB;
  const int tid = threadIdx.x, r = tid / TR, part = tid % TR;
  const int64_t i = i0 + r;
  const bool row_ok = i < f.Lq;
  int64_t b_lo, b_hi, h_lo, h_hi;
  work_pairs(s.mode, blockIdx.x, f.B, f.Hq, f.Hkv, p.Bp0, p.Hp0, &b_lo, &b_hi, &h_lo, &h_hi);
  int64_t jb_lo = 0, jb_hi = 0;
  key_block_range(f.causal, f.band_masked, f.half, f.Lk, i0, imin(i0 + RB, f.Lq), TN, &jb_lo, &jb_hi);
  const float keep_scale = f.dropout_p > 0.f ? 1.f / (1.f - f.dropout_p) : 1.f;
  const bool want_lag = s.partials && p.lag_part != nullptr;
  const bool want_dal = s.partials && p.dal_part != nullptr;
  const int64_t rows_size = f.kind == kBanded ? f.Lq * (2 * f.half + 1) : f.kind == kDense ? f.Lq * f.Lk
                                                                                              : f.Lq * f.half;

  for (int64_t b = b_lo; b < b_hi; ++b) {
    for (int64_t h = h_lo; h < h_hi; ++h) {
      const int64_t hk = h / f.group, bh = b * f.Hq + h;
      const float a = alpha_of(f, h);
      const bool use_prior = f.kind == kDense || (f.kind != kNone && a != 0.f);
      const T* qrow = static_cast<const T*>(f.q) + b * f.q_sb + h * f.q_sh + (row_ok ? i : 0) * f.q_sl;
      const T* dorow = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + (row_ok ? i : 0) * p.do_sl;
      float q[DQ], dq[DQ];
#pragma unroll
      for (int m = 0; m < DQ; ++m) {
        q[m] = row_ok ? to_f(qrow[part + TR * m]) : 0.f;
        dq[m] = 0.f;
      }
#pragma unroll  // no barrier: a thread only ever reads its own dos slots
      for (int m = 0; m < DQ; ++m) dos[r][part + TR * m] = row_ok ? dorow[part + TR * m] : from_f<T>(0.f);
      const float L = row_ok ? p.lse[bh * f.Lq + i] : INFINITY;
      const float dl = row_ok ? p.delta[bh * f.Lq + i] : 0.f;
      float dal = 0.f;
      float* drow = s.rows ? p.drows + slab_index(b, h, p.Bp0, p.Hp0) * rows_size : nullptr;
      float* lag_part = want_lag ? p.lag_part + partial_slot(b, h, qb, f.Hq, p.nqb) * (2 * f.half + 1) : nullptr;
      const T* kbase = static_cast<const T*>(f.k) + b * f.k_sb + hk * f.k_sh;
      const T* vbase = static_cast<const T*>(f.v) + b * f.v_sb + hk * f.v_sh;

      for (int64_t jb = jb_lo; jb < jb_hi; ++jb) {
        const int64_t j0 = jb * TN;
        __syncthreads();  // the previous tile's readers are done
        fwd::stage_key_tile<T, D, TN>(f, kbase, vbase, b, j0, tid, ks, vs, kmasked);
        __syncthreads();
#pragma unroll 1
        for (int jj = 0; jj < TN; ++jj) {
          float acc = 0.f;
#pragma unroll
          for (int m = 0; m < DQ; ++m) acc = fmaf(q[m], to_f(ks[jj][part + TR * m]), acc);
          acc = row_sum<TR>(acc);
          if (jj % TR == part) sc[r][jj] = acc;
        }
        const int64_t lag_const = f.kind == kLag ? lag_tile_const_index(f.half, i0, RB, j0, TN) : -1;
#pragma unroll 1
        for (int jj = part; jj < TN; jj += TR) {
          const int64_t j = j0 + jj;
          const bool masked =
              !row_ok || kmasked[jj] || (f.causal && j > i) || (f.band_masked && !band_inside(f.half, i, j));
          sc[r][jj] = logit(f, a, use_prior, b, h, i, j, masked, lag_const, sc[r][jj]);
        }
        __syncwarp();
#pragma unroll 1
        for (int jj = 0; jj < TN; ++jj) {
          const float x = sc[r][jj];
          float dp = 0.f;
#pragma unroll
          for (int m = 0; m < DQ; ++m) dp = fmaf(to_f(dos[r][part + TR * m]), to_f(vs[jj][part + TR * m]), dp);
          dp = row_sum<TR>(dp);
          const float pr = expf(x - L);  // 0 when masked or the row sees no key (L = +inf)
          float ds = 0.f;
          if (pr != 0.f) {
            const bool keep = dropout_keep(f, b, h, i, j0 + jj);
            ds = pr * ((keep ? dp * keep_scale : 0.f) - dl);
          }
          if (s.qkv && ds != 0.f) {
#pragma unroll
            for (int m = 0; m < DQ; ++m) dq[m] = fmaf(ds, to_f(ks[jj][part + TR * m]), dq[m]);
          }
          __syncwarp();  // every lane has read sc[r][jj] before its owner overwrites it with ds
          if (jj % TR == part) sc[r][jj] = ds;
        }
        __syncwarp();
        // Entry-owned gradients: band / dense slab entries, dalpha terms.
        if (row_ok && (want_dal || (s.rows && (f.kind == kBanded || f.kind == kDense)))) {
#pragma unroll 1
          for (int jj = part; jj < TN; jj += TR) {
            const float ds = sc[r][jj];
            if (ds == 0.f) continue;
            const int64_t j = j0 + jj;
            if (want_dal) dal = fmaf(ds, prior_value(f, b, h, i, j), dal);
            if (s.rows && f.kind == kBanded && band_inside(f.half, i, j))
              drow[i * (2 * f.half + 1) + band_offset(f.half, i, j)] += a * ds;
            if (s.rows && f.kind == kDense) drow[i * f.Lk + j] += a * ds;
          }
        }
        // Low-rank u: du[i, c] += alpha * sum_j ds[i, j] v[j, c] for this lane's columns c = part + 4n.
        if (row_ok && s.rows && f.kind == kLowRank) {
          const float* vp = f.p1 + prior_offset(f.a1, b, h, 0, 0);
#pragma unroll 1
          for (int64_t c = part; c < f.half; c += TR) {
            float acc = 0.f;
            for (int jj = 0; jj < TN; ++jj) {
              const float ds = sc[r][jj];
              if (ds != 0.f) acc = fmaf(ds, vp[(j0 + jj) * f.a1.sr + c * f.a1.sc], acc);
            }
            drow[i * f.half + c] += a * acc;
          }
        }
        // Lag: the tile's diagonal sums (rows in order); diagonal t's unclamped lag has its own table entry,
        // the clamped ones (all onto entry 0 or 2W) are added by thread 0 in diagonal order.
        if (want_lag) {
          __syncthreads();
          const int64_t W = f.half;
          if (tid < RB + TN - 1) {
            int64_t r_lo, r_hi;
            diag_rows(tid, TN, RB, &r_lo, &r_hi);
            float acc = 0.f;
            for (int64_t rr = r_lo; rr < r_hi; ++rr) acc += sc[rr][rr - tid + TN - 1];
            const int64_t lag = diag_lag(tid, i0, j0, TN);
            if (lag > -W && lag < W) {
              if (acc != 0.f) lag_part[lag_index(W, lag, 0)] += acc;
              clamped[tid] = 0.f;
            } else {
              clamped[tid] = acc;
            }
          }
          __syncthreads();
          if (tid == 0) {
            for (int t = 0; t < RB + TN - 1; ++t) {
              if (clamped[t] == 0.f) continue;
              lag_part[diag_lag(t, i0, j0, TN) >= W ? 2 * W : 0] += clamped[t];
            }
          }
        }
      }

      if (s.qkv && row_ok) {
        T* out = static_cast<T*>(p.dq) + (bh * f.Lq + i) * f.D;
#pragma unroll
        for (int m = 0; m < DQ; ++m) out[part + TR * m] = from_f<T>(dq[m] * f.scale);
      }
      if (want_dal) {  // mode kPerHead: one pair; the CTA's sum in thread order
        __syncthreads();
        red[tid] = dal;
        __syncthreads();
        if (tid == 0) {
          float acc = 0.f;
          for (int t = 0; t < NT; ++t) acc += red[t];
          p.dal_part[partial_slot(b, h, qb, f.Hq, p.nqb)] = acc;
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- dk / dv kernel

// One CTA per (work item, block of KB keys); thread t owns key j = j0 + t / 4 and head-dim columns (t % 4) + 4m,
// holding its k and v slices and dk, dv accumulators in registers. Per tile of QT query rows (q, dO staged in
// shared memory) each key's four lanes compute s and dp (shuffles), the logit, p, ds, and update their slices:
// dv += pd·dO, dk += ds·q (scale applied at the end). rows: low-rank v gradient dv_p[j, c] += alpha ds u[i, c]
// for c = part + 4n (one writer per element, pairs and queries in fixed order).
template <typename T, int D>
__global__ void __launch_bounds__(NT, 1) attention_bwd_kv_kernel(const BwdParams p, const BwdPass s) {
  constexpr int DQ = D / 4;
  __shared__ T qs[QT][D];
  __shared__ T dos[QT][D];
  __shared__ float Ls[QT], dls[QT];

  const FwdParams& f = p.f;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * KB;
  const int tid = threadIdx.x, jr = tid >> 2, part = tid & 3;
  const int64_t j = j0 + jr;
  const bool col_ok = j < f.Lk;
  int64_t b_lo, b_hi, h_lo, h_hi;
  work_pairs(s.mode, blockIdx.x, f.B, f.Hq, f.Hkv, p.Bp1, p.Hp1, &b_lo, &b_hi, &h_lo, &h_hi);
  int64_t it_lo = 0, it_hi = 0;
  query_range(f.causal, f.band_masked, f.half, f.Lq, j0, imin(j0 + KB, f.Lk), &it_lo, &it_hi);
  const float keep_scale = f.dropout_p > 0.f ? 1.f / (1.f - f.dropout_p) : 1.f;
  float dk[DQ], dv[DQ];
#pragma unroll
  for (int m = 0; m < DQ; ++m) dk[m] = dv[m] = 0.f;

  for (int64_t b = b_lo; b < b_hi; ++b) {
    const bool km = !col_ok || (f.kpm != nullptr && f.kpm[b * f.kpm_sb + j * f.kpm_sl]);
    for (int64_t h = h_lo; h < h_hi; ++h) {
      const int64_t hk = h / f.group, bh = b * f.Hq + h;
      const float a = alpha_of(f, h);
      const bool use_prior = f.kind == kDense || (f.kind != kNone && a != 0.f);
      const T* krow = static_cast<const T*>(f.k) + b * f.k_sb + hk * f.k_sh + (col_ok ? j : 0) * f.k_sl;
      const T* vrow = static_cast<const T*>(f.v) + b * f.v_sb + hk * f.v_sh + (col_ok ? j : 0) * f.v_sl;
      float kr[DQ], vr[DQ];
#pragma unroll
      for (int m = 0; m < DQ; ++m) {
        kr[m] = col_ok ? to_f(krow[part + 4 * m]) : 0.f;
        vr[m] = col_ok ? to_f(vrow[part + 4 * m]) : 0.f;
      }
      const T* qbase = static_cast<const T*>(f.q) + b * f.q_sb + h * f.q_sh;
      const T* dobase = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
      float* dcol = s.rows ? p.dcols + (slab_index(b, h, p.Bp1, p.Hp1) * f.Lk + j) * f.half : nullptr;
      const float* urow0 = s.rows ? f.p0 + prior_offset(f.a0, b, h, 0, 0) : nullptr;

      for (int64_t it0 = it_lo; it0 < it_hi; it0 += QT) {
        __syncthreads();  // the previous tile's readers are done
        for (int e = tid; e < QT * D; e += NT) {
          const int ii = e / D, d = e % D;
          const int64_t i = it0 + ii;
          qs[ii][d] = i < it_hi ? qbase[i * f.q_sl + d] : from_f<T>(0.f);
          dos[ii][d] = i < it_hi ? dobase[i * p.do_sl + d] : from_f<T>(0.f);
        }
        if (tid < QT) {
          const int64_t i = it0 + tid;
          Ls[tid] = i < it_hi ? p.lse[bh * f.Lq + i] : INFINITY;
          dls[tid] = i < it_hi ? p.delta[bh * f.Lq + i] : 0.f;
        }
        __syncthreads();
        const int64_t lag_const = f.kind == kLag ? lag_tile_const_index(f.half, it0, QT, j0, KB) : -1;
#pragma unroll 1
        for (int ii = 0; ii < QT; ++ii) {
          const int64_t i = it0 + ii;
          float sv = 0.f, dp = 0.f;
#pragma unroll
          for (int m = 0; m < DQ; ++m) {
            sv = fmaf(kr[m], to_f(qs[ii][part + 4 * m]), sv);
            dp = fmaf(vr[m], to_f(dos[ii][part + 4 * m]), dp);
          }
          sv += __shfl_xor_sync(kFull, sv, 1);
          sv += __shfl_xor_sync(kFull, sv, 2);
          dp += __shfl_xor_sync(kFull, dp, 1);
          dp += __shfl_xor_sync(kFull, dp, 2);
          const bool masked = km || i >= it_hi || (f.causal && j > i) ||
                              (f.band_masked && !band_inside(f.half, i, j));
          const float x = logit(f, a, use_prior, b, h, i, j, masked, lag_const, sv);
          const float pr = expf(x - Ls[ii]);
          if (pr == 0.f) continue;  // no barrier or shuffle follows in this iteration
          const bool keep = dropout_keep(f, b, h, i, j);
          const float pd = keep ? pr * keep_scale : 0.f;
          const float ds = pr * ((keep ? dp * keep_scale : 0.f) - dls[ii]);
          if (s.qkv) {
#pragma unroll
            for (int m = 0; m < DQ; ++m) {
              dv[m] = fmaf(pd, to_f(dos[ii][part + 4 * m]), dv[m]);
              dk[m] = fmaf(ds, to_f(qs[ii][part + 4 * m]), dk[m]);
            }
          }
          if (s.rows && ds != 0.f) {
            const float* u = urow0 + i * f.a0.sr;
            for (int64_t c = part; c < f.half; c += 4) dcol[c] += a * ds * u[c * f.a0.sc];
          }
        }
      }
    }
  }
  if (s.qkv && col_ok) {
    const int64_t hk = h_lo / f.group;  // mode kPerKvHead: one kv head
    T* dkrow = static_cast<T*>(p.dk) + ((b_lo * f.Hkv + hk) * f.Lk + j) * f.D;
    T* dvrow = static_cast<T*>(p.dv) + ((b_lo * f.Hkv + hk) * f.Lk + j) * f.Dv;
#pragma unroll
    for (int m = 0; m < DQ; ++m) {
      dkrow[part + 4 * m] = from_f<T>(dk[m] * f.scale);
      dvrow[part + 4 * m] = from_f<T>(dv[m]);
    }
  }
}

// ------------------------------------------------------------------------------------------- reduction

// out[(bp, hp), e] = sum over t of (alpha_h if with_alpha) * part[partial_term_slot(t, bp, hp, ...), e], in t
// order (index.h), accumulated in double: one thread per output element, so bitwise reproducible.
__global__ void __launch_bounds__(NT) attention_bwd_reduce_kernel(const BwdParams p, const BwdPass s) {
  const FwdParams& f = p.f;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * NT + threadIdx.x;
  if (idx >= s.Bp * s.Hp * s.size) return;
  const int64_t e = idx % s.size, hp = (idx / s.size) % s.Hp, bp = idx / (s.size * s.Hp);
  const int64_t n = partial_terms(f.B, f.Hq, p.nqb, s.Bp, s.Hp);
  double acc = 0.0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = partial_term_slot(t, bp, hp, f.B, f.Hq, p.nqb, s.Bp, s.Hp);
    const double x = s.part[slot * s.size + e];
    acc += s.with_alpha ? static_cast<double>(alpha_of(f, (slot / p.nqb) % f.Hq)) * x : x;
  }
  s.out[idx] = static_cast<float>(acc);
}

}  // namespace bwd
}  // namespace rapkern::cuda
