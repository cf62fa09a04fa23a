// Header-only code shared by the CPU attention kernels (attention_fwd.cpp, attention_bwd.cpp).
//
// Semantics are those of rapkern/priors.py and rapkern.testing.reference_attention; this file only reads
// the compact prior tensors tile by tile, it never builds anything of size Lq x Lk.
//
// Interface (stable: add, never change):
//   PriorKind                     0 none, 1 lag, 2 banded, 3 lowrank, 4 dense (the ints of csrc/ops.cpp).
//   View4                         a float32 (Bp, Hp, rows, cols) prior view: raw pointer + element strides,
//                                 stride 0 along a broadcast (size-1) leading dim. at(b, h) = base of (b, h).
//   Problem                       sizes, strides, raw pointers, alpha, scale, flags of one attention call.
//   make_problem(op, q, k, v, key_padding_mask, alpha, alpha_value, prior_kind, prior0, prior1,
//                mask_outside, causal, scale, dropout_p, seed)
//                                 TORCH_CHECKs every precondition of the contract shared by fwd and bwd
//                                 (messages name `op` and the argument), then fills a Problem. It also
//                                 establishes the kernels' layouts, so the Python call site needs no
//                                 conversion ops (a per-call cost): q/k/v with a non-unit last stride are
//                                 copied, a () alpha is read with stride 0, a prior's missing leading dims
//                                 count as 1 and a non-float32 alpha or prior is converted (the Problem
//                                 holds the copies).
//   check_prior_values(P)         ValueError (named as in rapkern/priors.py) if a compact prior holds NaN or
//                                 ±inf, or a dense bias NaN or +inf: the forward's up-front value check.
//   Problem::alpha_of(h)          alpha of query head h (float).
//   Problem::kv_head(h)           GQA: kv head of query head h.
//   Problem::q_ptr/k_ptr/v_ptr<T>(b, h, row)   typed pointers (h is the q head for q, the kv head for k, v).
//   key_range(P, i0, i1, &j_lo, &j_hi)
//                                 keys [j_lo, j_hi) that may be visible to query rows [i0, i1): causal prefix
//                                 and masked band (mask_outside); j_lo >= j_hi means none. Key blocks outside
//                                 it are skipped entirely (the block-skipping rule).
//   tile_has_prior(P, h, i0, bq, j0, bk)
//                                 false when adding the prior to that tile is a no-op (alpha 0 and no -inf
//                                 possible, band tile off the band, no prior).
//   prior_scratch_floats(P, bq, bk)
//                                 floats of per-thread scratch that add_prior_tile needs for tiles <= bq x bk.
//   add_prior_tile(P, b, h, i0, bq, j0, bk, s, lds, scratch)
//                                 s[r * lds + c] += alpha_h * B[i0 + r, j0 + c] for an fp32 tile (every kind):
//                                 lag: a constant when every lag in the tile is clamped, else one gathered
//                                 diagonal vector per tile; band: only the band's columns; low-rank: one gemm
//                                 with beta = 1; dense: read through strides, -inf stays -inf for every alpha.
//                                 With mask_outside the band's outside is NOT set here (see apply_masks).
//   lag_tile(P, b, h, i0, bq, j0, bk, g, &cst)
//                                 the lag prior of one tile, for kernels that fuse the add into another row
//                                 pass: true when every lag clamps onto one end entry (the tile adds the
//                                 constant cst = α·entry); else g[0, bq + bk - 1) holds the table entries
//                                 (not multiplied by α) so that row r of B is g + (bq - 1 - r).
//                                 add_prior_tile adds exactly fmadd(α, g, s) resp. s + cst (same rounding).
//   tile_needs_mask(P, b, i0, bq, j0, bk)   false when apply_masks would change nothing.
//   apply_masks(P, b, i0, bq, j0, bk, s, lds)
//                                 sets -inf where key j is masked for query i: causal (j > i), key padding,
//                                 banded mask_outside (|j - i| > w). (Dense -inf comes from add_prior_tile.)
//   dropout_uniform(seed, idx)    counter-based uniform in [0, 1) (splitmix64 of seed + (idx+1)·golden).
//   dropout_index(P, b, h, i, j)  ((b·Hq + h)·Lq + i)·Lk + j, the counter of element (b, h, i, j).
//   dropout_keep(P, b, h, i, j)   true iff the element is kept (uniform >= p).
//   dropout_tile(P, b, h, i0, bq, j0, bk, p, lds)
//                                 zeroes the dropped entries of a probability tile (no 1/(1-p) scaling).
//   load_f32(src, ld_src, rows, cols, dst, ld_dst)   fp32/fp16/bf16 rows -> fp32 scratch.
//   store_from_f32(src, ld_src, rows, cols, dst, ld_dst)   fp32 rows -> fp32/fp16/bf16.
//   gemm_nt(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)   row-major c[m x n] = alpha a[m x k] b[n x k]ᵀ + beta c.
//   gemm_nn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)   row-major c[m x n] = alpha a[m x k] b[k x n] + beta c.
//   gemm_tn(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)   row-major c[m x n] = alpha a[k x m]ᵀ b[k x n] + beta c.
//   pad16(n)                      n rounded up to a multiple of 16 floats (64 bytes).
//   ThreadScratch(n_threads, floats)   per-thread fp32 scratch; get(t) is 64-byte aligned for every t.
//                                 Carve sub-buffers with pad16 sizes: BLAS kernels may round differently
//                                 for differently aligned operands, so equal alignment on every thread is
//                                 part of being bitwise independent of the thread count.
#pragma once

// at::vec compiles to its AVX2 implementation only when CPU_CAPABILITY_AVX2 is defined; torch's own kernels
// get it from their per-capability builds. When this translation unit is compiled for AVX2+FMA, use it, in
// a namespace of our own so the definitions cannot clash with another translation unit's at::vec.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY) && !defined(CPU_CAPABILITY_AVX2) && \
    !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY rapkern_avx2
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../dropout_hash.h"
#include "../contract.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>

// MKL (torch's BLAS on x86) threads a gemm called outside an OpenMP region, which happens when parallel_for
// runs a single chunk inline; its split of a product then depends on the thread count. Each work chunk asks for
// a sequential BLAS for its duration (weak: absent with other BLAS libraries, which then run as they are).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace rapkern::cpu {

using rapkern::check_no_bad_values;
using rapkern::check_prior_args;
using rapkern::check_qkv_sizes;
using rapkern::check_scalars;
using rapkern::dropout_uniform;
using rapkern::splitmix64;

struct SequentialBlas {
  int prev = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev);
  }
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

enum PriorKind : int64_t { kNone = 0, kLag = 1, kBanded = 2, kLowRank = 3, kDense = 4 };

struct View4 {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0, sc = 0;  // element strides (0 along a broadcast leading dim)
  int64_t bp = 1, hp = 1, rows = 0, cols = 0;
  const float* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, group = 1, Lq = 0, Lk = 0, D = 0, Dv = 0;
  at::ScalarType dtype = at::kFloat;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  const bool* kpm = nullptr;  // (B, Lk), True = masked; nullptr when absent
  int64_t kpm_sb = 0, kpm_sl = 0;
  const float* alpha = nullptr;  // (Hq,), nullptr -> alpha_value for every head
  int64_t alpha_s = 0;
  float alpha_value = 1.f;
  int64_t kind = kNone;
  View4 p0, p1;      // lag: p0 = table (rows 1); band: p0 = values; low-rank: p0 = u, p1 = v; dense: p0 = bias
  int64_t half = 0;  // lag: W; band: w; low-rank: r
  bool mask_outside = false, causal = false;
  float scale = 1.f;
  double dropout_p = 0.0;
  uint64_t seed = 0;

  at::Tensor held[6];  // copies made by make_problem (q, k, v, alpha, prior0, prior1) that the pointers use

  float alpha_of(int64_t h) const { return alpha ? alpha[h * alpha_s] : alpha_value; }
  int64_t kv_head(int64_t h) const { return h / group; }
  template <typename T>
  const T* q_ptr(int64_t b, int64_t h, int64_t i) const {
    return static_cast<const T*>(q) + b * q_sb + h * q_sh + i * q_sl;
  }
  template <typename T>
  const T* k_ptr(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(k) + b * k_sb + hk * k_sh + j * k_sl;
  }
  template <typename T>
  const T* v_ptr(int64_t b, int64_t hk, int64_t j) const {
    return static_cast<const T*>(v) + b * v_sb + hk * v_sh + j * v_sl;
  }
};

// ---------------------------------------------------------------------------------------------- checks

inline void check_qkv_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D (B, H, L, D), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
}

// t itself when its last dim has unit stride (or size <= 1), else a contiguous copy kept in `held`.
inline const at::Tensor& unit_last(const at::Tensor& t, at::Tensor& held) {
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  held = t.contiguous();
  return held;
}

// t itself when float32, else a float32 copy kept in `held`.
inline const at::Tensor& as_f32(const at::Tensor& t, at::Tensor& held) {
  if (t.scalar_type() == at::kFloat) return t;
  held = t.to(at::kFloat);
  return held;
}

inline View4 make_view(const char* op, const char* name, const at::Tensor& t_in, int64_t trailing, int64_t B,
                       int64_t Hq, at::Tensor& held) {
  TORCH_CHECK(t_in.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t_in.device());
  TORCH_CHECK(at::isFloatingType(t_in.scalar_type()), op, ": ", name, " must be a floating tensor, got ",
              t_in.scalar_type());
  const int64_t lead = t_in.dim() - trailing;
  TORCH_CHECK(lead >= 0 && lead <= 2, op, ": ", name, " must have ", trailing,
              " trailing dims after leading dims (), (Hp,) or (Bp, Hp), got shape ", t_in.sizes());
  const at::Tensor& t = as_f32(t_in, held);
  const int64_t bp = lead == 2 ? t.size(0) : 1, hp = lead >= 1 ? t.size(lead - 1) : 1;
  const int64_t t_sb = lead == 2 ? t.stride(0) : 0, t_sh = lead >= 1 ? t.stride(lead - 1) : 0;
  TORCH_CHECK((bp == 1 || bp == B) && (hp == 1 || hp == Hq), op, ": ", name, " leading dims (", bp, ", ", hp,
              ") must be (Bp, Hp) with Bp in {1, ", B, "} and Hp in {1, ", Hq, "}");
  View4 w;
  w.data = t.data_ptr<float>();
  w.bp = bp;
  w.hp = hp;
  w.sb = bp == 1 ? 0 : t_sb;
  w.sh = hp == 1 ? 0 : t_sh;
  if (trailing == 1) {
    w.rows = 1;
    w.cols = t.size(lead);
    w.sr = 0;
    w.sc = t.stride(lead);
  } else {
    w.rows = t.size(lead);
    w.cols = t.size(lead + 1);
    w.sr = t.stride(lead);
    w.sc = t.stride(lead + 1);
  }
  return w;
}

inline Problem make_problem(const char* op, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& alpha, double alpha_value, int64_t prior_kind,
                            const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1,
                            bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed) {
  TORCH_CHECK(q_in.device().is_cpu(), op, ": q must be a CPU tensor, got device ", q_in.device());
  auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": q dtype must be float32, float16 or bfloat16, got ", dt);
  check_qkv_like(op, "q", q_in, q_in);
  check_qkv_like(op, "k", k_in, q_in);
  check_qkv_like(op, "v", v_in, q_in);
  Problem P;
  const at::Tensor& q = unit_last(q_in, P.held[0]);
  const at::Tensor& k = unit_last(k_in, P.held[1]);
  const at::Tensor& v = unit_last(v_in, P.held[2]);
  P.dtype = dt;
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Lq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Lk = k.size(2);
  P.Dv = v.size(3);
  check_qkv_sizes(op, q, k, v);
  P.group = P.Hq / P.Hkv;
  P.q = q.data_ptr();
  P.k = k.data_ptr();
  P.v = v.data_ptr();
  P.q_sb = q.stride(0), P.q_sh = q.stride(1), P.q_sl = q.stride(2);
  P.k_sb = k.stride(0), P.k_sh = k.stride(1), P.k_sl = k.stride(2);
  P.v_sb = v.stride(0), P.v_sh = v.stride(1), P.v_sl = v.stride(2);

  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu(), op, ": key_padding_mask must be a CPU tensor, got device ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == P.B && m.size(1) == P.Lk, op,
                ": key_padding_mask must have shape (B, Lk) = (", P.B, ", ", P.Lk, "), got ", m.sizes());
    P.kpm = m.data_ptr<bool>();
    P.kpm_sb = m.stride(0);
    P.kpm_sl = m.stride(1);
  }
  if (alpha.has_value()) {
    const auto& a = *alpha;
    TORCH_CHECK(a.device().is_cpu(), op, ": alpha must be a CPU tensor, got device ", a.device());
    TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": alpha must be a floating tensor, got ",
                a.scalar_type());
    TORCH_CHECK(a.dim() == 0 || (a.dim() == 1 && a.size(0) == P.Hq), op, ": alpha must have shape () or (Hq,) = (",
                P.Hq, ",), got ", a.sizes());
    const at::Tensor& a32 = as_f32(a, P.held[3]);
    P.alpha = a32.data_ptr<float>();
    P.alpha_s = a32.dim() == 0 ? 0 : a32.stride(0);
  }
  P.alpha_value = static_cast<float>(alpha_value);

  check_prior_args(op, prior_kind, prior0, prior1, mask_outside);
  P.kind = prior_kind;
  if (prior_kind == kLag) {
    P.p0 = make_view(op, "prior0 (lag table)", *prior0, 1, P.B, P.Hq, P.held[4]);
    TORCH_CHECK(P.p0.cols % 2 == 1, op, ": prior0 (lag table) last dim must be odd (2W+1), got ", P.p0.cols);
    P.half = (P.p0.cols - 1) / 2;
  } else if (prior_kind == kBanded) {
    P.p0 = make_view(op, "prior0 (band values)", *prior0, 2, P.B, P.Hq, P.held[4]);
    TORCH_CHECK(P.p0.cols % 2 == 1, op, ": prior0 (band values) last dim must be odd (2w+1), got ", P.p0.cols);
    TORCH_CHECK(P.p0.rows == P.Lq, op, ": prior0 (band values) must have Lq = ", P.Lq, " rows, got ",
                P.p0.rows);
    P.half = (P.p0.cols - 1) / 2;
  } else if (prior_kind == kLowRank) {
    P.p0 = make_view(op, "prior0 (low-rank u)", *prior0, 2, P.B, P.Hq, P.held[4]);
    P.p1 = make_view(op, "prior1 (low-rank v)", *prior1, 2, P.B, P.Hq, P.held[5]);
    TORCH_CHECK(P.p0.rows == P.Lq, op, ": prior0 (low-rank u) must have Lq = ", P.Lq, " rows, got ", P.p0.rows);
    TORCH_CHECK(P.p1.rows == P.Lk, op, ": prior1 (low-rank v) must have Lk = ", P.Lk, " rows, got ", P.p1.rows);
    TORCH_CHECK(P.p0.cols == P.p1.cols, op, ": prior0 (u) and prior1 (v) must have the same rank, got ",
                P.p0.cols, " and ", P.p1.cols);
    P.half = P.p0.cols;
  } else if (prior_kind == kDense) {
    P.p0 = make_view(op, "prior0 (dense bias)", *prior0, 2, P.B, P.Hq, P.held[4]);
    TORCH_CHECK(P.p0.rows == P.Lq && P.p0.cols == P.Lk, op, ": prior0 (dense bias) must end in (Lq, Lk) = (",
                P.Lq, ", ", P.Lk, "), got (", P.p0.rows, ", ", P.p0.cols, ")");
  }
  P.mask_outside = mask_outside;
  P.causal = causal;
  P.scale = static_cast<float>(scale);
  check_scalars(op, alpha_value, scale, dropout_p);
  P.dropout_p = dropout_p;
  P.seed = static_cast<uint64_t>(seed);
  return P;
}

// Entries of a float32 view that a prior may not hold: non-finite, or for a dense bias NaN or +inf (-inf is a
// mask there). One pass, parallel over rows for a large dense bias.
inline int64_t count_bad_values(const View4& w, bool allow_neginf) {
  const int64_t nrows = w.bp * w.hp * w.rows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(w.cols, 1));
  return at::parallel_reduce(
      0, nrows, grain, int64_t{0},
      [&](int64_t r0, int64_t r1, int64_t acc) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / (w.hp * w.rows), h = (r / w.rows) % w.hp, i = r % w.rows;
          const float* row = w.data + b * w.sb + h * w.sh + i * w.sr;
          for (int64_t c = 0; c < w.cols; ++c) {
            const float x = row[c * w.sc];
            acc += allow_neginf ? (std::isnan(x) || x == -kNegInf) : !std::isfinite(x);
          }
        }
        return acc;
      },
      std::plus<int64_t>());
}

inline void check_values_of(const View4& w, const char* name, bool allow_neginf) {
  check_no_bad_values(name, count_bad_values(w, allow_neginf), allow_neginf);
}

// The up-front value check of rapkern/priors.py (_check_values), with its names and messages: alpha·(±inf) has
// no meaning for alpha = 0, so compact priors must be finite; a dense bias may hold -inf (a mask).
inline void check_prior_values(const Problem& P) {
  switch (P.kind) {
    case kLag:
      check_values_of(P.p0, "RelativeLagPrior.table", false);
      break;
    case kBanded:
      check_values_of(P.p0, "BandedPrior.values", false);
      break;
    case kLowRank:
      check_values_of(P.p0, "LowRankPrior.u", false);
      check_values_of(P.p1, "LowRankPrior.v", false);
      break;
    case kDense:
      check_values_of(P.p0, "DensePrior.bias", true);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------- blocks

inline void key_range(const Problem& P, int64_t i0, int64_t i1, int64_t* j_lo, int64_t* j_hi) {
  int64_t lo = 0, hi = P.Lk;
  if (P.causal) hi = std::min(hi, i1);  // key j visible to row i only when j <= i
  if (P.kind == kBanded && P.mask_outside) {
    lo = std::max(lo, i0 - P.half);
    hi = std::min(hi, i1 - 1 + P.half + 1);
  }
  *j_lo = lo;
  *j_hi = std::max(lo, hi);
}

inline bool tile_has_prior(const Problem& P, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  switch (P.kind) {
    case kNone:
      return false;
    case kDense:
      return true;  // -inf entries mask even with alpha 0
    case kBanded: {
      if (P.alpha_of(h) == 0.f) return false;
      // band meets tile iff some (i, j) has |j - i| <= w
      int64_t dmin = j0 - (i0 + bq - 1), dmax = (j0 + bk - 1) - i0;
      return dmax >= -P.half && dmin <= P.half;
    }
    default:
      return P.alpha_of(h) != 0.f;
  }
}

inline int64_t prior_scratch_floats(const Problem& P, int64_t bq, int64_t bk) {
  if (P.kind == kLag) return bq + bk;
  if (P.kind == kLowRank) return (bq + bk) * P.half;
  return 0;
}

// s[r, c] += a * x[c] for c < n (vectorized).
inline void axpy_row(float* s, const float* x, float a, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  int64_t c = 0;
  const Vec va(a);
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec y = at::vec::fmadd(va, Vec::loadu(x + c), Vec::loadu(s + c));
    y.store(s + c);
  }
  for (; c < n; ++c) s[c] += a * x[c];
}

inline void add_const_row(float* s, float a, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  int64_t c = 0;
  const Vec va(a);
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(s + c) + va).store(s + c);
  for (; c < n; ++c) s[c] += a;
}

// Packs rows [r0, r0 + n) of a (rows x cols) strided matrix into dst (n x cols, contiguous).
inline void pack_rows(const float* base, int64_t sr, int64_t sc, int64_t r0, int64_t n, int64_t cols,
                      float* dst) {
  for (int64_t r = 0; r < n; ++r) {
    const float* src = base + (r0 + r) * sr;
    float* d = dst + r * cols;
    if (sc == 1) {
      std::copy(src, src + cols, d);
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = src[c * sc];
    }
  }
}

// fp32 gemm on row-major operands. torch's cpublas::gemm (and its dispatch stub) is not exported from
// libtorch_cpu, so call the BLAS it wraps (MKL's sgemm_, exported by the x86 wheels) when the symbol is present
// (weak reference: a build without it still loads), otherwise at::addmm_out on views of the buffers.
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                                             const int* k, const float* alpha, const float* a, const int* lda,
                                             const float* b, const int* ldb, const float* beta, float* c,
                                             const int* ldc);

// Column-major C (m x n) = alpha op(A) op(B) + beta C.
inline void sgemm_col(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.f ? 0.f : beta * c[j * ldc + i];
    return;
  }
  // BLAS wants each leading dim >= the stored rows even when that dim has one column.
  lda = std::max<int64_t>(lda, ta ? k : m);
  ldb = std::max<int64_t>(ldb, tb ? n : k);
  ldc = std::max<int64_t>(ldc, m);
  if (sgemm_ != nullptr) {
    const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    sgemm_(&tA, &tB, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {  // portable fallback through ATen (its own BLAS), on views of the raw buffers
    auto opt = at::TensorOptions().dtype(at::kFloat);
    at::Tensor A = ta ? at::from_blob(const_cast<float*>(a), {m, k}, {lda, 1}, opt)
                      : at::from_blob(const_cast<float*>(a), {m, k}, {1, lda}, opt);
    at::Tensor Bm = tb ? at::from_blob(const_cast<float*>(b), {k, n}, {ldb, 1}, opt)
                       : at::from_blob(const_cast<float*>(b), {k, n}, {1, ldb}, opt);
    at::Tensor C = at::from_blob(c, {m, n}, {1, ldc}, opt);
    at::addmm_out(C, C, A, Bm, beta, alpha);
  }
}

inline void gemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_col(true, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

inline void gemm_nn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_col(false, false, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

inline void gemm_tn(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                    int64_t ldb, float beta, float* c, int64_t ldc) {
  sgemm_col(false, true, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

struct ThreadScratch {
  ThreadScratch(int64_t n_threads, int64_t floats) : stride_(pad16(floats)) {
    buf_ = at::empty({n_threads * stride_ + 16}, at::TensorOptions().dtype(at::kFloat));
    float* p = buf_.data_ptr<float>();
    base_ = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
  }
  float* get(int64_t thread) const { return base_ + thread * stride_; }

 private:
  int64_t stride_;
  at::Tensor buf_;
  float* base_ = nullptr;
};

inline bool lag_tile(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                     float* g, float* cst) {
  const int64_t W = P.half;
  const float* t = P.p0.at(b, h);
  const int64_t st = P.p0.sc;
  const int64_t lag_min = i0 - (j0 + bk - 1), lag_max = (i0 + bq - 1) - j0;
  if (lag_min >= W || lag_max <= -W) {  // every lag clamps onto one end entry
    *cst = P.alpha_of(h) * t[(lag_min >= W ? 2 * W : 0) * st];
    return true;
  }
  // lag of (r, c) = lag_max - (bq - 1 - r + c): g[m] = table[W + clamp(lag_max - m, -W, W)]
  const int64_t n = bq + bk - 1;
  for (int64_t m = 0; m < n; ++m) g[m] = t[(W + std::min(std::max(lag_max - m, -W), W)) * st];
  return false;
}

inline void add_prior_tile(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                           float* s, int64_t lds, float* scratch) {
  if (!tile_has_prior(P, h, i0, bq, j0, bk)) return;
  const float a = P.alpha_of(h);
  switch (P.kind) {
    case kLag: {
      float cst = 0.f;
      if (lag_tile(P, b, h, i0, bq, j0, bk, scratch, &cst)) {
        for (int64_t r = 0; r < bq; ++r) add_const_row(s + r * lds, cst, bk);
      } else {
        for (int64_t r = 0; r < bq; ++r) axpy_row(s + r * lds, scratch + (bq - 1 - r), a, bk);
      }
      return;
    }
    case kBanded: {
      const int64_t w = P.half;
      const float* base = P.p0.at(b, h);
      for (int64_t r = 0; r < bq; ++r) {
        const int64_t i = i0 + r;
        const int64_t c_lo = std::max<int64_t>(i - w - j0, 0), c_hi = std::min<int64_t>(i + w - j0 + 1, bk);
        if (c_lo >= c_hi) continue;
        const float* row = base + i * P.p0.sr + (w + j0 + c_lo - i) * P.p0.sc;  // values[i, w + j - i]
        if (P.p0.sc == 1) {
          axpy_row(s + r * lds + c_lo, row, a, c_hi - c_lo);
        } else {
          for (int64_t c = 0; c < c_hi - c_lo; ++c) s[r * lds + c_lo + c] += a * row[c * P.p0.sc];
        }
      }
      return;
    }
    case kLowRank: {
      const int64_t rank = P.half;
      const View4& U = P.p0;
      const View4& V = P.p1;
      const float* ub = U.data + (U.bp == 1 ? 0 : b * U.sb) + (U.hp == 1 ? 0 : h * U.sh);
      const float* vb = V.data + (V.bp == 1 ? 0 : b * V.sb) + (V.hp == 1 ? 0 : h * V.sh);
      const float* ut;
      const float* vt;
      int64_t ldu, ldv;
      if (U.sc == 1 && U.sr >= rank) {
        ut = ub + i0 * U.sr, ldu = U.sr;
      } else {
        pack_rows(ub, U.sr, U.sc, i0, bq, rank, scratch);
        ut = scratch, ldu = rank;
      }
      if (V.sc == 1 && V.sr >= rank) {
        vt = vb + j0 * V.sr, ldv = V.sr;
      } else {
        pack_rows(vb, V.sr, V.sc, j0, bk, rank, scratch + bq * rank);
        vt = scratch + bq * rank, ldv = rank;
      }
      if (rank > 0) gemm_nt(bq, bk, rank, a, ut, ldu, vt, ldv, 1.f, s, lds);
      return;
    }
    case kDense: {
      const float* base = P.p0.at(b, h) + i0 * P.p0.sr + j0 * P.p0.sc;
      const int64_t sc = P.p0.sc;
      for (int64_t r = 0; r < bq; ++r) {
        const float* x = base + r * P.p0.sr;
        float* y = s + r * lds;
        if (sc == 1) {
          using Vec = at::vec::Vectorized<float>;
          const Vec va(a), vninf(kNegInf);
          int64_t c = 0;
          for (; c + Vec::size() <= bk; c += Vec::size()) {
            Vec xb = Vec::loadu(x + c);
            Vec sum = at::vec::fmadd(va, xb, Vec::loadu(y + c));
            Vec::blendv(sum, vninf, xb == vninf).store(y + c);
          }
          for (; c < bk; ++c) y[c] = x[c] == kNegInf ? kNegInf : y[c] + a * x[c];
        } else {
          for (int64_t c = 0; c < bk; ++c) {
            const float xb = x[c * sc];
            y[c] = xb == kNegInf ? kNegInf : y[c] + a * xb;
          }
        }
      }
      return;
    }
    default:
      return;
  }
}

// ---------------------------------------------------------------------------------------------- masks

inline bool tile_needs_mask(const Problem& P, int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  if (P.causal && j0 + bk - 1 > i0) return true;
  if (P.kind == kBanded && P.mask_outside) {
    const int64_t w = P.half;
    if (j0 < i0 + bq - 1 - w || j0 + bk - 1 > i0 + w) return true;
  }
  if (P.kpm) {
    const bool* m = P.kpm + b * P.kpm_sb;
    for (int64_t c = 0; c < bk; ++c)
      if (m[(j0 + c) * P.kpm_sl]) return true;
  }
  return false;
}

inline void fill_row(float* s, float val, int64_t n) {
  for (int64_t c = 0; c < n; ++c) s[c] = val;
}

inline void apply_masks(const Problem& P, int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* s,
                        int64_t lds) {
  if (P.causal && j0 + bk - 1 > i0) {
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t first = std::max<int64_t>(i0 + r - j0 + 1, 0);  // first masked column
      if (first < bk) fill_row(s + r * lds + first, kNegInf, bk - first);
    }
  }
  if (P.kind == kBanded && P.mask_outside) {
    const int64_t w = P.half;
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = i0 + r;
      const int64_t c_lo = std::min<int64_t>(std::max<int64_t>(i - w - j0, 0), bk);
      const int64_t c_hi = std::max<int64_t>(std::min<int64_t>(i + w - j0 + 1, bk), c_lo);
      fill_row(s + r * lds, kNegInf, c_lo);
      fill_row(s + r * lds + c_hi, kNegInf, bk - c_hi);
    }
  }
  if (P.kpm) {
    const bool* m = P.kpm + b * P.kpm_sb;
    for (int64_t c = 0; c < bk; ++c) {
      if (!m[(j0 + c) * P.kpm_sl]) continue;
      for (int64_t r = 0; r < bq; ++r) s[r * lds + c] = kNegInf;
    }
  }
}

// ---------------------------------------------------------------------------------------------- dropout

inline uint64_t dropout_index(const Problem& P, int64_t b, int64_t h, int64_t i, int64_t j) {
  return ((static_cast<uint64_t>(b) * P.Hq + h) * P.Lq + i) * P.Lk + j;
}

inline bool dropout_keep(const Problem& P, int64_t b, int64_t h, int64_t i, int64_t j) {
  return dropout_uniform(P.seed, dropout_index(P, b, h, i, j)) >= static_cast<float>(P.dropout_p);
}

inline void dropout_tile(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                         float* p, int64_t lds) {
  const float thr = static_cast<float>(P.dropout_p);
  for (int64_t r = 0; r < bq; ++r) {
    const uint64_t base = dropout_index(P, b, h, i0 + r, j0);
    float* row = p + r * lds;
    for (int64_t c = 0; c < bk; ++c)
      if (dropout_uniform(P.seed, base + c) < thr) row[c] = 0.f;
  }
}

// ---------------------------------------------------------------------------------------------- dtypes

template <typename T>
inline void load_f32(const T* src, int64_t ld_src, int64_t rows, int64_t cols, float* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = src + r * ld_src;
    float* y = dst + r * ld_dst;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(x, x + cols, y);
    } else {
      for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<float>(x[c]);
    }
  }
}

template <typename T>
inline void store_from_f32(const float* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = src + r * ld_src;
    T* y = dst + r * ld_dst;
    if constexpr (std::is_same_v<T, float>) {
      std::copy(x, x + cols, y);
    } else {
      for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<T>(x[c]);
    }
  }
}

}  // namespace rapkern::cpu
