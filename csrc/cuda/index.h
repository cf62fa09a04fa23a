// Index arithmetic of the CUDA kernels (issue 15), written once as __host__ __device__ functions so that the
// host can unit-test exactly what the device runs (tests/test_cuda_index.py builds a tiny host-only binding of
// this header with g++ and compares every function with rapkern/priors.py semantics and csrc/cpu/common.h).
//
// Plain C++17, no CUDA or torch includes: RK_HD expands to `__host__ __device__` under nvcc, to `inline` else.
//
//   key_range(causal, band_masked, w, Lk, i0, i1, &lo, &hi)
//                     keys [lo, hi) that may be visible to query rows [i0, i1) (causal prefix, masked band);
//                     lo >= hi means none. The block-skipping rule: equal to csrc/cpu/common.h key_range.
//   key_block_range(..., bk, &jb_lo, &jb_hi)   the same as key-block indices [jb_lo, jb_hi) of size bk.
//   lag_index(W, i, j)                 W + clamp(i - j, -W, W): the table entry of B[i, j].
//   lag_tile_const_index(W, i0, bq, j0, bk)
//                     the one table index (0 or 2W) every lag of the tile clamps onto, or -1 when the tile
//                     holds several entries (same test as common.h lag_tile).
//   band_offset(w, i, j)               w + (j - i): the column of values[i, :] holding B[i, j].
//   band_inside(w, i, j)               |j - i| <= w.
//   band_tile_meets(w, i0, bq, j0, bk) some (i, j) of the tile is inside the band (common.h tile_has_prior).
//   bcast_stride(size, stride)         0 when size == 1 (a broadcast leading dim), else stride.
//   PriorAddr + prior_offset(a, b, h, r, c)
//                     element offset of prior entry (b, h, r, c) of a (Bp, Hp, rows, cols) view whose leading
//                     strides went through bcast_stride (b, h are the problem's batch and q head).
//   partial_slot(b, h, qb, Hq, nqb)    slot of the prior-gradient partial of work item (b, q head h, q block qb).
//   partial_terms(B, Hq, nqb, Bp, Hp)  number of partials summed into one (bp, hp) entry.
//   partial_term_slot(t, bp, hp, B, Hq, nqb, Bp, Hp)
//                     slot of the t-th term of that sum: the fixed order is b ascending, then h, then qb (a
//                     broadcast dim runs over all its indices, a full one is fixed at bp resp. hp). The
//                     reduction sums terms t = 0, 1, ... in this order, so the result is bitwise reproducible.
//   query_range(causal, band_masked, w, Lq, j0, j1, &lo, &hi)
//                     query rows [lo, hi) that may see some key of [j0, j1) (the backward's dk/dv kernel).
//   work_items(mode, B, Hq, Hkv, Bp, Hp) / work_pairs(mode, o, ..., &b_lo, &b_hi, &h_lo, &h_hi)
//                     the backward's work items: mode kPerHead one per (b, q head); kPerKvHead one per (b, kv
//                     head) covering its GQA group; kPerSlab one per (bp, hp) slab of a prior view covering every
//                     (b, h) that maps onto it. Item o handles pairs b in [b_lo, b_hi) x h in [h_lo, h_hi),
//                     visited b ascending then h: the fixed order of its accumulations.
//   slab_index(b, h, Bp, Hp)           the (bp, hp) slab of a (Bp, Hp, ...) prior view that pair (b, h) reads.
//   diag_count(bm, bn) / diag_lag(t, i0, j0, bn) / diag_rows(t, bn, bm, &r_lo, &r_hi)
//                     the diagonals t of a bm x bn tile at (i0, j0): lag i - j = i0 - j0 + t - (bn - 1), entries
//                     (r, r - t + bn - 1) for r in [r_lo, r_hi). The lag gradient sums a tile per diagonal.
//   dropout_uniform(seed, idx)         the counter-based uniform of csrc/cpu/common.h (splitmix64), so a CUDA
//                                      and a CPU run with the same seed drop the same elements.
//   dropout_index(b, h, i, j, Hq, Lq, Lk)   ((b·Hq + h)·Lq + i)·Lk + j, the counter of element (b, h, i, j).
#pragma once

#include <cstdint>

#include "../dropout_hash.h"

#if defined(__CUDACC__)
#define RK_HD __host__ __device__ __forceinline__
#else
#define RK_HD inline
#endif

namespace rapkern::cuda {

using rapkern::dropout_uniform;
using rapkern::splitmix64;

RK_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
RK_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
RK_HD int64_t iclamp(int64_t x, int64_t lo, int64_t hi) { return imin(imax(x, lo), hi); }
RK_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------- block skipping

RK_HD void key_range(bool causal, bool band_masked, int64_t w, int64_t Lk, int64_t i0, int64_t i1, int64_t* lo,
                     int64_t* hi) {
  int64_t l = 0, h = Lk;
  if (causal) h = imin(h, i1);  // key j visible to row i only when j <= i
  if (band_masked) {
    l = imax(l, i0 - w);
    h = imin(h, i1 + w);  // last row i1 - 1 sees up to i1 - 1 + w
  }
  *lo = l;
  *hi = imax(l, h);
}

RK_HD void key_block_range(bool causal, bool band_masked, int64_t w, int64_t Lk, int64_t i0, int64_t i1,
                           int64_t bk, int64_t* jb_lo, int64_t* jb_hi) {
  int64_t lo = 0, hi = 0;
  key_range(causal, band_masked, w, Lk, i0, i1, &lo, &hi);
  *jb_lo = lo / bk;
  *jb_hi = lo < hi ? cdiv(hi, bk) : lo / bk;
}

// ------------------------------------------------------------------------------------------- lag and band

RK_HD int64_t lag_index(int64_t W, int64_t i, int64_t j) { return W + iclamp(i - j, -W, W); }

RK_HD int64_t lag_tile_const_index(int64_t W, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  const int64_t lag_min = i0 - (j0 + bk - 1), lag_max = (i0 + bq - 1) - j0;
  if (lag_min >= W) return 2 * W;
  if (lag_max <= -W) return 0;
  return -1;
}

RK_HD int64_t band_offset(int64_t w, int64_t i, int64_t j) { return w + (j - i); }

RK_HD bool band_inside(int64_t w, int64_t i, int64_t j) { return j - i <= w && i - j <= w; }

RK_HD bool band_tile_meets(int64_t w, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  const int64_t dmin = j0 - (i0 + bq - 1), dmax = (j0 + bk - 1) - i0;
  return dmax >= -w && dmin <= w;
}

// ------------------------------------------------------------------------------------------- prior addressing

RK_HD int64_t bcast_stride(int64_t size, int64_t stride) { return size == 1 ? 0 : stride; }

struct PriorAddr {
  int64_t sb = 0, sh = 0, sr = 0, sc = 0;  // element strides; sb/sh already 0 along a broadcast dim
};

RK_HD int64_t prior_offset(const PriorAddr& a, int64_t b, int64_t h, int64_t r, int64_t c) {
  return b * a.sb + h * a.sh + r * a.sr + c * a.sc;
}

// ------------------------------------------------------------------------------------------- reduction order

RK_HD int64_t partial_slot(int64_t b, int64_t h, int64_t qb, int64_t Hq, int64_t nqb) {
  return (b * Hq + h) * nqb + qb;
}

RK_HD int64_t partial_terms(int64_t B, int64_t Hq, int64_t nqb, int64_t Bp, int64_t Hp) {
  return (Bp == 1 ? B : 1) * (Hp == 1 ? Hq : 1) * nqb;
}

RK_HD int64_t partial_term_slot(int64_t t, int64_t bp, int64_t hp, int64_t B, int64_t Hq, int64_t nqb, int64_t Bp,
                                int64_t Hp) {
  (void)B;
  const int64_t nh = Hp == 1 ? Hq : 1;
  const int64_t qb = t % nqb;
  const int64_t hh = (t / nqb) % nh;
  const int64_t bb = t / (nqb * nh);
  const int64_t b = Bp == 1 ? bb : bp;
  const int64_t h = Hp == 1 ? hh : hp;
  return partial_slot(b, h, qb, Hq, nqb);
}

// ------------------------------------------------------------------------------------------- backward work items

RK_HD void query_range(bool causal, bool band_masked, int64_t w, int64_t Lq, int64_t j0, int64_t j1, int64_t* lo,
                       int64_t* hi) {
  int64_t l = 0, h = Lq;
  if (causal) l = imax(l, j0);  // row i sees key j only when j <= i
  if (band_masked) {
    l = imax(l, j0 - w);
    h = imin(h, j1 + w);  // key j1 - 1 is seen by rows up to j1 - 1 + w
  }
  *lo = l;
  *hi = imax(l, h);
}

enum WorkMode : int { kPerHead = 0, kPerKvHead = 1, kPerSlab = 2 };

RK_HD int64_t work_items(int mode, int64_t B, int64_t Hq, int64_t Hkv, int64_t Bp, int64_t Hp) {
  return mode == kPerHead ? B * Hq : mode == kPerKvHead ? B * Hkv : Bp * Hp;
}

RK_HD void work_pairs(int mode, int64_t o, int64_t B, int64_t Hq, int64_t Hkv, int64_t Bp, int64_t Hp,
                      int64_t* b_lo, int64_t* b_hi, int64_t* h_lo, int64_t* h_hi) {
  if (mode == kPerHead) {
    *b_lo = o / Hq, *b_hi = *b_lo + 1, *h_lo = o % Hq, *h_hi = *h_lo + 1;
  } else if (mode == kPerKvHead) {
    const int64_t g = Hq / Hkv;
    *b_lo = o / Hkv, *b_hi = *b_lo + 1, *h_lo = (o % Hkv) * g, *h_hi = *h_lo + g;
  } else {
    const int64_t bp = o / Hp, hp = o % Hp;
    *b_lo = Bp == 1 ? 0 : bp, *b_hi = Bp == 1 ? B : bp + 1;
    *h_lo = Hp == 1 ? 0 : hp, *h_hi = Hp == 1 ? Hq : hp + 1;
  }
}

RK_HD int64_t slab_index(int64_t b, int64_t h, int64_t Bp, int64_t Hp) {
  return (Bp == 1 ? 0 : b) * Hp + (Hp == 1 ? 0 : h);
}

RK_HD int64_t diag_count(int64_t bm, int64_t bn) { return bm + bn - 1; }

RK_HD int64_t diag_lag(int64_t t, int64_t i0, int64_t j0, int64_t bn) { return i0 - j0 + t - (bn - 1); }

RK_HD void diag_rows(int64_t t, int64_t bn, int64_t bm, int64_t* r_lo, int64_t* r_hi) {
  *r_lo = imax(0, t - (bn - 1));  // column r - t + bn - 1 >= 0 ... < bn
  *r_hi = imin(bm, t + 1);
}

// ------------------------------------------------------------------------------------------- dropout

// splitmix64 / dropout_uniform: csrc/dropout_hash.h (namespace rapkern), shared with the CPU kernels.

RK_HD uint64_t dropout_index(int64_t b, int64_t h, int64_t i, int64_t j, int64_t Hq, int64_t Lq, int64_t Lk) {
  return ((static_cast<uint64_t>(b) * Hq + h) * Lq + i) * Lk + j;
}

}  // namespace rapkern::cuda
