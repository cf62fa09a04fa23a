// CPU backward of biased attention: dq, dk, dv, the compact prior's gradient and dα, from (dout, dlse).
//
// Algorithm: FlashAttention-2's backward laid out like PyTorch's CPU flash backward
// (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp, cpu_flash_attention_backward). Work items are
// (b, kv head), spread with at::parallel_for; an item loops over its query heads (GQA group), query blocks and
// visible key blocks, recomputing each tile exactly as the forward does (csrc/cpu/common.h: S = scale·Q Kᵀ,
// S += α·B, masks), then P = exp(S − lse), dP = dO Vᵀ (dropout mask regenerated from the hash),
// dS = P ∘ (dP − δ) with δ = rowsum(dO ∘ O) − dlse, and dV += Pᵀ dO, dQ += scale·dS K, dK += scale·dSᵀ Q
// (cpublas gemms on fp32 tiles; fp16/bf16 operands are widened to fp32 scratch).
//
// Prior and α gradients are reduced from the dS tile inside the same pass (dL/dB = α·dS, dL/dα = Σ dS ∘ B):
//   lag      diagonal sums of dS (one vectorized add per tile row) into a per-lag accumulator, folded onto the
//            2W+1 clamped entries per head; dα from the same sums (Σ_lag sum_lag · table[clamp(lag)]).
//   band     per row the 2w+1 in-band entries; dα from the same entries.
//   low-rank du = dS v_p and dv_p = dSᵀ u (gemms); dα = Σ (dS v_p) ∘ u.
//   dense    α·dS into the bias rows; dα = Σ dS ∘ B over finite B (0·(−inf) counts as 0).
//
// Determinism: an item owns its dq rows and its dk/dv (and, when no other item maps onto the same (bp, hp),
// its prior-gradient slab, written in place). Everything shared between items goes to per-(b, h) partial
// buffers of compact size (lag: 2W+1 doubles; low-rank: (Lq + Lk)·r floats; dα: one double) reduced afterwards
// in a fixed order, so results are bitwise independent of the thread count. No atomics.
//
// Broadcast band/dense biases (Bp < B, or Hp = 1 with several kv heads): per-(b, h) partials would take
// B·Hq·Lq·(2w+1) resp. B·Hq·Lq·Lk floats. A band takes them while they stay under 256 MB; a dense bias (and a
// band beyond that) instead gets a second pass over (bp, hp, query block) that owns those bias rows,
// recomputes dS for every (b, h) mapping onto them (fixed order) and accumulates α·dS: deterministic and
// O(threads · tile) memory, at the cost of recomputing S and dP (two of the five tile gemms) once more.
//
// Memory: per thread O(tile + Lk·(D + Dv)) fp32 scratch (widened K/V for fp16/bf16 only) plus O(Lq + Lk);
// outputs dq/dk/dv are accumulated in fp32 and cast at the end. Nothing of size Lq x Lk is allocated.
#include "common.h"

#include <cstdlib>

namespace rapkern::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr const char* kOp = "rapkern::attention_bwd";

// Backward-only operands: dout, out, lse, dlse and what to compute.
struct Grads {
  const void* dout = nullptr;
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  const void* out = nullptr;
  int64_t o_sb = 0, o_sh = 0, o_sl = 0;
  const float* lse = nullptr;  // (B, Hq, Lq) contiguous
  const float* dlse = nullptr;
  int64_t dl_sb = 0, dl_sh = 0, dl_sl = 0;
  bool need_qkv = false, need_prior = false, need_alpha = false;
};

// Where the gradient slab (rows x cols floats) of query head h in batch b goes: the output itself when a
// single work item writes each (bp, hp) slab (alpha applied in place), else a (B, Hq) partial buffer that
// reduce_slabs() folds into the output with alpha in a fixed order.
struct Slab {
  float* base = nullptr;
  bool direct = false;
  int64_t size = 0, bp = 1, hp = 1, Hq = 1;
  float* at(int64_t b, int64_t h) const {
    return direct ? base + ((bp == 1 ? 0 : b) * hp + (hp == 1 ? 0 : h)) * size : base + (b * Hq + h) * size;
  }
};

inline bool owned_by_one_item(const Problem& P, const View4& w) {
  return w.bp == P.B && (w.hp == P.Hq || P.Hkv == 1);
}

struct Blocks {
  int64_t bq, bk;
};

// PyTorch's split sizes (short query blocks for short sequences, 512 keys); a masked band visits bq + 2w keys
// per block for 2w + 1 useful ones, so its query blocks stay near w rows.
inline Blocks pick_blocks(const Problem& P) {
  int64_t bq = P.Lq >= 768 ? 256 : (P.Lq >= 192 ? 64 : 32);
  if (P.kind == kBanded && P.mask_outside) bq = std::min<int64_t>(bq, std::max<int64_t>(16, P.half));
  return {std::max<int64_t>(1, std::min(bq, P.Lq)), std::max<int64_t>(1, std::min<int64_t>(512, P.Lk))};
}

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }  // keeps scratch pieces 64-byte aligned

// A (rows x cols) fp32 operand for cpublas: the input itself when it is fp32 with a usable row stride,
// otherwise widened/packed into `scratch` (contiguous).
template <typename T>
inline const float* operand(const T* src, int64_t ld_src, int64_t rows, int64_t cols, float* scratch,
                            int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (ld_src >= cols || rows == 1) {
      *ld = std::max<int64_t>(ld_src, cols);
      return src;
    }
  }
  load_f32(src, ld_src, rows, cols, scratch, cols);
  *ld = cols;
  return scratch;
}

inline float vsum(const float* x, int64_t n) {
  int64_t c = 0;
  float s = 0.f;
  if (n >= Vec::size()) {
    Vec acc(0.f);
    for (; c + Vec::size() <= n; c += Vec::size()) acc = acc + Vec::loadu(x + c);
    s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  }
  for (; c < n; ++c) s += x[c];
  return s;
}

inline void vadd(float* y, const float* x, int64_t n) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(y + c) + Vec::loadu(x + c)).store(y + c);
  for (; c < n; ++c) y[c] += x[c];
}

// Per query row: lse with -inf (no visible key) turned into +inf so that exp(s - lse) = 0 everywhere, and
// delta = rowsum(dout ∘ out) − dlse (0 for such rows). Returns false when no row of the block sees a key.
template <typename T>
bool row_stats(const Problem& P, const Grads& G, int64_t b, int64_t h, int64_t i0, int64_t bq, float* lse_r,
               float* delta) {
  const float* l = G.lse + (b * P.Hq + h) * P.Lq + i0;
  bool any = false;
  for (int64_t r = 0; r < bq; ++r) {
    const bool dead = l[r] == kNegInf;
    any = any || !dead;
    lse_r[r] = dead ? std::numeric_limits<float>::infinity() : l[r];
    if (dead) {
      delta[r] = 0.f;
      continue;
    }
    const T* dout = static_cast<const T*>(G.dout) + b * G.do_sb + h * G.do_sh + (i0 + r) * G.do_sl;
    const T* out = static_cast<const T*>(G.out) + b * G.o_sb + h * G.o_sh + (i0 + r) * G.o_sl;
    float acc = 0.f;
    for (int64_t c = 0; c < P.Dv; ++c) acc += static_cast<float>(dout[c]) * static_cast<float>(out[c]);
    if (G.dlse) acc -= G.dlse[b * G.dl_sb + h * G.dl_sh + (i0 + r) * G.dl_sl];
    delta[r] = acc;
  }
  return any;
}

// The tile's P (dropout applied and rescaled: the matrix that multiplied V) into s and dS into ds, both
// (bq x bk) with leading dimension bk. qf/kf/vf/dof are fp32 operands with their leading dimensions.
inline void tile_ds(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                    const float* qf, int64_t ldq, const float* kf, int64_t ldk, const float* vf, int64_t ldv,
                    const float* dof, int64_t lddo, const float* lse_r, const float* delta, float* s, float* ds,
                    float* prior_scratch) {
  gemm_nt(bq, bk, P.D, P.scale, qf, ldq, kf, ldk, 0.f, s, bk);
  add_prior_tile(P, b, h, i0, bq, j0, bk, s, bk, prior_scratch);
  if (tile_needs_mask(P, b, i0, bq, j0, bk)) apply_masks(P, b, i0, bq, j0, bk, s, bk);
  gemm_nt(bq, bk, P.Dv, 1.f, dof, lddo, vf, ldv, 0.f, ds, bk);
  if (P.dropout_p > 0) {
    const float thr = static_cast<float>(P.dropout_p);
    const float inv = static_cast<float>(1.0 / (1.0 - P.dropout_p));
    for (int64_t r = 0; r < bq; ++r) {
      float* sr = s + r * bk;
      float* dr = ds + r * bk;
      const float L = lse_r[r], d = delta[r];
      const uint64_t base = dropout_index(P, b, h, i0 + r, j0);
      for (int64_t c = 0; c < bk; ++c) {
        const float p = std::exp(sr[c] - L);
        const bool keep = dropout_uniform(P.seed, base + c) >= thr;
        dr[c] = p * ((keep ? dr[c] * inv : 0.f) - d);
        sr[c] = keep ? p * inv : 0.f;
      }
    }
    return;
  }
  for (int64_t r = 0; r < bq; ++r) {
    float* sr = s + r * bk;
    float* dr = ds + r * bk;
    const float L = lse_r[r], d = delta[r];
    const Vec vL(L), vd(d);
    int64_t c = 0;
    for (; c + Vec::size() <= bk; c += Vec::size()) {
      const Vec p = (Vec::loadu(sr + c) - vL).exp_u20();
      p.store(sr + c);
      (p * (Vec::loadu(dr + c) - vd)).store(dr + c);
    }
    for (; c < bk; ++c) {
      const float p = std::exp(sr[c] - L);
      sr[c] = p;
      dr[c] = p * (dr[c] - d);
    }
  }
}

// Band and dense gradients of one tile: dst rows (the (b, h) slab, row-major) += f·dS on the prior's entries;
// *dal += Σ dS ∘ B (finite B only). dst or dal may be null.
inline void row_prior_grad(const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
                           const float* ds, float* dst, float f, double* dal) {
  const float* base = P.p0.at(b, h);
  const int64_t sr = P.p0.sr, sc = P.p0.sc;
  double acc = 0.0;
  if (P.kind == kBanded) {
    const int64_t w = P.half, width = 2 * w + 1;
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = i0 + r;
      const int64_t c_lo = std::max<int64_t>(i - w - j0, 0), c_hi = std::min<int64_t>(i + w - j0 + 1, bk);
      if (c_lo >= c_hi) continue;
      const float* d = ds + r * bk;
      const int64_t e0 = w + j0 - i;  // entry of column c is e0 + c
      if (dst) {
        float* y = dst + i * width + e0;
        for (int64_t c = c_lo; c < c_hi; ++c) y[c] += f * d[c];
      }
      if (dal) {
        const float* x = base + i * sr + e0 * sc;
        float a = 0.f;
        for (int64_t c = c_lo; c < c_hi; ++c) a += d[c] * x[c * sc];
        acc += a;
      }
    }
  } else {  // dense
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = i0 + r;
      const float* d = ds + r * bk;
      if (dst) axpy_row(dst + i * P.Lk + j0, d, f, bk);
      if (dal) {
        const float* x = base + i * sr + j0 * sc;
        float a = 0.f;
        int64_t c = 0;
        if (sc == 1 && bk >= Vec::size()) {
          const Vec vninf(kNegInf), zero(0.f);
          Vec va(0.f);
          for (; c + Vec::size() <= bk; c += Vec::size()) {
            const Vec xb = Vec::loadu(x + c);
            va = va + Vec::blendv(Vec::loadu(d + c) * xb, zero, xb == vninf);
          }
          a = at::vec::vec_reduce_all<float>([](Vec& u, Vec& v) { return u + v; }, va);
        }
        for (; c < bk; ++c) {
          const float xb = x[c * sc];
          if (xb != kNegInf) a += d[c] * xb;
        }
        acc += a;
      }
    }
  }
  if (dal) *dal += acc;
}

struct Outs {
  float* dq = nullptr;  // (B, Hq, Lq, D) fp32
  float* dk = nullptr;  // (B, Hkv, Lk, D) fp32
  float* dv = nullptr;  // (B, Hkv, Lk, Dv) fp32
  double* lag = nullptr;  // (B, Hq, 2W+1) raw diagonal sums (alpha applied in the reduction)
  Slab rows;              // band/dense: in place (direct), a band's partials, or null (second pass)
  Slab du, dvp;           // low-rank
  double* dalpha = nullptr;  // (B, Hq)
};

template <typename T>
void main_pass(const Problem& P, const Grads& G, const Outs& O) {
  const Blocks blk = pick_blocks(P);
  const int64_t bq_max = blk.bq, bk_max = blk.bk;
  const int64_t D = P.D, Dv = P.Dv, Lk = P.Lk, Lq = P.Lq;
  const bool reduced = !std::is_same_v<T, float>;
  const bool kf_packed = reduced || (P.k_sl < D && Lk > 1);
  const bool vf_packed = reduced || (P.v_sl < Dv && Lk > 1);
  const bool want_pg = G.need_prior || G.need_alpha;
  const bool lag = P.kind == kLag && want_pg;
  const bool lowrank = P.kind == kLowRank && want_pg;
  const bool rowkind = (P.kind == kBanded || P.kind == kDense) && want_pg;
  const int64_t rank = P.kind == kLowRank ? P.half : 0;
  const int64_t W = P.kind == kLag ? P.half : 0;

  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t pos = off;
    off += round16(n);
    return pos;
  };
  const int64_t o_kf = kf_packed ? take(Lk * D) : -1;
  const int64_t o_vf = vf_packed ? take(Lk * Dv) : -1;
  const int64_t o_qf = take(bq_max * D), o_dof = take(bq_max * Dv);
  const int64_t o_lse = take(bq_max), o_delta = take(bq_max);
  const int64_t o_s = take(bq_max * bk_max), o_ds = take(bq_max * bk_max);
  const int64_t o_ps = take(prior_scratch_floats(P, bq_max, bk_max));
  const int64_t o_h = take(lag ? bq_max + bk_max : 0);
  const int64_t o_ub = take(lowrank ? bq_max * rank : 0), o_dur = take(lowrank ? bq_max * rank : 0);
  const int64_t o_vpk = take(lowrank ? Lk * rank : 0), o_dvr = take(lowrank ? Lk * rank : 0);
  const int64_t per_thread = off;
  const int64_t n_lags = lag ? Lq + Lk - 1 : 0;

  at::parallel_for(0, P.B * P.Hkv, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;
    at::Tensor buf = at::empty({per_thread}, at::TensorOptions().dtype(at::kFloat));
    std::vector<double> lagacc(static_cast<size_t>(n_lags));
    float* F = buf.data_ptr<float>();
    float* lse_r = F + o_lse;
    float* delta = F + o_delta;
    float* s = F + o_s;
    float* ds = F + o_ds;
    float* ps = F + o_ps;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / P.Hkv, hk = item % P.Hkv;
      int64_t ldk = 0, ldv = 0;
      const float* kf = nullptr;
      const float* vf = nullptr;
      if (Lk > 0) {
        kf = operand(P.k_ptr<T>(b, hk, 0), P.k_sl, Lk, D, kf_packed ? F + o_kf : nullptr, &ldk);
        vf = operand(P.v_ptr<T>(b, hk, 0), P.v_sl, Lk, Dv, vf_packed ? F + o_vf : nullptr, &ldv);
      }
      float* dk = O.dk ? O.dk + (b * P.Hkv + hk) * Lk * D : nullptr;
      float* dv = O.dv ? O.dv + (b * P.Hkv + hk) * Lk * Dv : nullptr;
      for (int64_t g = 0; g < P.group; ++g) {
        const int64_t h = hk * P.group + g;
        const float a = P.alpha_of(h);
        double dal = 0.0;
        if (lag) std::fill(lagacc.begin(), lagacc.end(), 0.0);
        float* vpk = F + o_vpk;
        float* dvr = F + o_dvr;
        if (lowrank) {
          pack_rows(P.p1.at(b, h), P.p1.sr, P.p1.sc, 0, Lk, rank, vpk);
          std::fill(dvr, dvr + Lk * rank, 0.f);
        }
        float* dst_rows = rowkind && G.need_prior && O.rows.base ? O.rows.at(b, h) : nullptr;
        const float f_rows = O.rows.direct ? a : 1.f;
        for (int64_t i0 = 0; i0 < Lq; i0 += bq_max) {
          const int64_t bq = std::min(bq_max, Lq - i0);
          int64_t j_lo, j_hi;
          key_range(P, i0, i0 + bq, &j_lo, &j_hi);
          if (j_lo >= j_hi) continue;
          if (!row_stats<T>(P, G, b, h, i0, bq, lse_r, delta)) continue;
          int64_t ldq = 0, lddo = 0;
          const float* qf = operand(P.q_ptr<T>(b, h, i0), P.q_sl, bq, D, F + o_qf, &ldq);
          const T* dout = static_cast<const T*>(G.dout) + b * G.do_sb + h * G.do_sh + i0 * G.do_sl;
          const float* dof = operand(dout, G.do_sl, bq, Dv, F + o_dof, &lddo);
          float* ub = F + o_ub;
          if (lowrank) pack_rows(P.p0.at(b, h), P.p0.sr, P.p0.sc, i0, bq, rank, ub);
          float* dq = O.dq ? O.dq + ((b * P.Hq + h) * Lq + i0) * D : nullptr;
          for (int64_t j0 = j_lo; j0 < j_hi; j0 += bk_max) {
            const int64_t bk = std::min(bk_max, j_hi - j0);
            tile_ds(P, b, h, i0, bq, j0, bk, qf, ldq, kf + j0 * ldk, ldk, vf + j0 * ldv, ldv, dof, lddo, lse_r,
                    delta, s, ds, ps);
            if (lag) {
              // lag of (r, c) is lag_max - m with m = c - r + bq - 1 (the common.h tile convention)
              const int64_t lag_max = i0 + bq - 1 - j0, lag_min = i0 - (j0 + bk - 1);
              double* la = lagacc.data() + (Lk - 1) + lag_max;  // la[-m] accumulates lag lag_max - m
              if (lag_min >= W || lag_max <= -W) {  // every lag of the tile clamps onto one end entry
                float tot = 0.f;
                for (int64_t r = 0; r < bq; ++r) tot += vsum(ds + r * bk, bk);
                la[0] += tot;
              } else {
                float* hb = F + o_h;
                const int64_t n = bq + bk - 1;
                std::fill(hb, hb + n, 0.f);
                for (int64_t r = 0; r < bq; ++r) vadd(hb + (bq - 1 - r), ds + r * bk, bk);
                for (int64_t m = 0; m < n; ++m) la[-m] += hb[m];
              }
            } else if (rowkind) {
              row_prior_grad(P, b, h, i0, bq, j0, bk, ds, dst_rows, f_rows, G.need_alpha ? &dal : nullptr);
            } else if (lowrank) {
              float* dur = F + o_dur;
              gemm_nn(bq, rank, bk, 1.f, ds, bk, vpk + j0 * rank, rank, 0.f, dur, rank);
              if (G.need_alpha) {
                float acc = 0.f;
                for (int64_t r = 0; r < bq; ++r)
                  for (int64_t e = 0; e < rank; ++e) acc += dur[r * rank + e] * ub[r * rank + e];
                dal += acc;
              }
              if (G.need_prior) {
                float* du = O.du.at(b, h) + i0 * rank;
                axpy_row(du, dur, O.du.direct ? a : 1.f, bq * rank);
                gemm_tn(bk, rank, bq, 1.f, ds, bk, ub, rank, 1.f, dvr + j0 * rank, rank);
              }
            }
            if (G.need_qkv) {
              gemm_tn(bk, Dv, bq, 1.f, s, bk, dof, lddo, 1.f, dv + j0 * Dv, Dv);
              gemm_nn(bq, D, bk, P.scale, ds, bk, kf + j0 * ldk, ldk, 1.f, dq, D);
              gemm_tn(bk, D, bq, P.scale, ds, bk, qf, ldq, 1.f, dk + j0 * D, D);
            }
          }
        }
        if (lag) {
          const float* t = P.p0.at(b, h);
          double* part = O.lag ? O.lag + (b * P.Hq + h) * (2 * W + 1) : nullptr;
          for (int64_t idx = 0; idx < n_lags; ++idx) {
            const double x = lagacc[idx];
            if (x == 0.0) continue;
            const int64_t e = W + std::min(std::max(idx - (Lk - 1), -W), W);
            if (part) part[e] += x;
            dal += x * static_cast<double>(t[e * P.p0.sc]);
          }
        }
        if (lowrank && G.need_prior) axpy_row(O.dvp.at(b, h), dvr, O.dvp.direct ? a : 1.f, Lk * rank);
        if (O.dalpha) O.dalpha[b * P.Hq + h] = dal;
      }
    }
  });
}

// Band/dense prior gradient of a bias broadcast over batch or heads: items (bp, hp, query block) own their rows
// of the output and sum alpha_h·dS over every (b, h) that maps onto them, in a fixed order.
template <typename T>
void row_owner_pass(const Problem& P, const Grads& G, float* dprior) {
  const Blocks blk = pick_blocks(P);
  const int64_t bq_max = blk.bq, bk_max = blk.bk;
  const int64_t D = P.D, Dv = P.Dv, Lq = P.Lq;
  const int64_t n_qb = (Lq + bq_max - 1) / bq_max;
  const int64_t bp = P.p0.bp, hp = P.p0.hp;
  const int64_t slab = P.p0.rows * P.p0.cols;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t pos = off;
    off += round16(n);
    return pos;
  };
  const int64_t o_kf = take(bk_max * D), o_vf = take(bk_max * Dv);
  const int64_t o_qf = take(bq_max * D), o_dof = take(bq_max * Dv);
  const int64_t o_lse = take(bq_max), o_delta = take(bq_max);
  const int64_t o_s = take(bq_max * bk_max), o_ds = take(bq_max * bk_max);
  const int64_t o_ps = take(prior_scratch_floats(P, bq_max, bk_max));
  const int64_t per_thread = off;

  at::parallel_for(0, bp * hp * n_qb, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;
    at::Tensor buf = at::empty({per_thread}, at::TensorOptions().dtype(at::kFloat));
    float* F = buf.data_ptr<float>();
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qb, ph = (item / n_qb) % hp, pb = item / (n_qb * hp);
      const int64_t i0 = qb * bq_max, bq = std::min(bq_max, Lq - i0);
      int64_t j_lo, j_hi;
      key_range(P, i0, i0 + bq, &j_lo, &j_hi);
      if (j_lo >= j_hi) continue;
      float* dst = dprior + (pb * hp + ph) * slab;
      for (int64_t b = (bp == 1 ? 0 : pb); b < (bp == 1 ? P.B : pb + 1); ++b) {
        for (int64_t h = (hp == 1 ? 0 : ph); h < (hp == 1 ? P.Hq : ph + 1); ++h) {
          if (!row_stats<T>(P, G, b, h, i0, bq, F + o_lse, F + o_delta)) continue;
          const int64_t hk = P.kv_head(h);
          int64_t ldq = 0, lddo = 0, ldk = 0, ldv = 0;
          const float* qf = operand(P.q_ptr<T>(b, h, i0), P.q_sl, bq, D, F + o_qf, &ldq);
          const T* dout = static_cast<const T*>(G.dout) + b * G.do_sb + h * G.do_sh + i0 * G.do_sl;
          const float* dof = operand(dout, G.do_sl, bq, Dv, F + o_dof, &lddo);
          for (int64_t j0 = j_lo; j0 < j_hi; j0 += bk_max) {
            const int64_t bk = std::min(bk_max, j_hi - j0);
            const float* kf = operand(P.k_ptr<T>(b, hk, j0), P.k_sl, bk, D, F + o_kf, &ldk);
            const float* vf = operand(P.v_ptr<T>(b, hk, j0), P.v_sl, bk, Dv, F + o_vf, &ldv);
            tile_ds(P, b, h, i0, bq, j0, bk, qf, ldq, kf, ldk, vf, ldv, dof, lddo, F + o_lse, F + o_delta,
                    F + o_s, F + o_ds, F + o_ps);
            row_prior_grad(P, b, h, i0, bq, j0, bk, F + o_ds, dst, P.alpha_of(h), nullptr);
          }
        }
      }
    }
  });
}

// out[bp, hp, :] = Σ_{b -> bp} Σ_{h -> hp} alpha_h · part[b, h, :], summed in (b, h) order.
template <typename S>
void reduce_slabs(const Problem& P, const S* part, int64_t size, int64_t bp, int64_t hp, float* out) {
  constexpr int64_t kChunk = 4096;
  const int64_t n_chunks = (size + kChunk - 1) / kChunk;
  at::parallel_for(0, bp * hp * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(kChunk);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ch = item % n_chunks, ph = (item / n_chunks) % hp, pb = item / (n_chunks * hp);
      const int64_t e0 = ch * kChunk, n = std::min(kChunk, size - e0);
      std::fill(acc.begin(), acc.begin() + n, 0.0);
      for (int64_t b = (bp == 1 ? 0 : pb); b < (bp == 1 ? P.B : pb + 1); ++b) {
        for (int64_t h = (hp == 1 ? 0 : ph); h < (hp == 1 ? P.Hq : ph + 1); ++h) {
          const double a = P.alpha_of(h);
          const S* x = part + (b * P.Hq + h) * size + e0;
          for (int64_t e = 0; e < n; ++e) acc[e] += a * static_cast<double>(x[e]);
        }
      }
      float* y = out + (pb * hp + ph) * size + e0;
      for (int64_t e = 0; e < n; ++e) y[e] = static_cast<float>(acc[e]);
    }
  });
}

inline void check_like_out(const char* name, const at::Tensor& t, const at::Tensor& q, const Problem& P) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == P.B && t.size(1) == P.Hq && t.size(2) == P.Lq && t.size(3) == P.Dv,
              kOp, ": ", name, " must have shape (B, Hq, Lq, Dv) = (", P.B, ", ", P.Hq, ", ", P.Lq, ", ", P.Dv,
              "), got ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, kOp, ": ", name, " must have last-dim stride 1, got strides ",
              t.strides());
}

// Cap on a broadcast band's partial buffers (bytes); RAPKERN_CPU_BAND_PARTIAL_MB overrides (tests use 0 to
// exercise the second pass).
inline int64_t band_partial_bytes() {
  const char* env = std::getenv("RAPKERN_CPU_BAND_PARTIAL_MB");
  return (env ? std::atoll(env) : 256) << 20;
}

template <typename T>
void run(const Problem& P, const Grads& G, const Outs& O, float* dprior_rows_second_pass) {
  main_pass<T>(P, G, O);
  if (dprior_rows_second_pass) row_owner_pass<T>(P, G, dprior_rows_second_pass);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& alpha, double alpha_value,
    int64_t prior_kind, const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1,
    bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed, bool need_qkv_grad,
    bool need_prior_grad, bool need_alpha_grad) {
  const Problem P = make_problem(kOp, q, k, v, key_padding_mask, alpha, alpha_value, prior_kind, prior0, prior1,
                                 mask_outside, causal, scale, dropout_p, seed);
  check_like_out("dout", dout, q, P);
  check_like_out("out", out, q, P);
  TORCH_CHECK(lse.device().is_cpu(), kOp, ": lse must be a CPU tensor, got device ", lse.device());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, kOp, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.Hq && lse.size(2) == P.Lq, kOp,
              ": lse must have shape (B, Hq, Lq) = (", P.B, ", ", P.Hq, ", ", P.Lq, "), got ", lse.sizes());
  TORCH_CHECK(lse.is_contiguous(), kOp, ": lse must be contiguous, got strides ", lse.strides());
  TORCH_CHECK(!need_prior_grad || prior_kind != kNone, kOp, ": need_prior_grad requires a prior (prior_kind 1..4)");

  Grads G;
  G.dout = dout.data_ptr();
  G.do_sb = dout.stride(0), G.do_sh = dout.stride(1), G.do_sl = dout.stride(2);
  G.out = out.data_ptr();
  G.o_sb = out.stride(0), G.o_sh = out.stride(1), G.o_sl = out.stride(2);
  G.lse = lse.data_ptr<float>();
  if (dlse.has_value()) {
    const auto& t = *dlse;
    TORCH_CHECK(t.device().is_cpu(), kOp, ": dlse must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, kOp, ": dlse must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == P.B && t.size(1) == P.Hq && t.size(2) == P.Lq, kOp,
                ": dlse must have shape (B, Hq, Lq) = (", P.B, ", ", P.Hq, ", ", P.Lq, "), got ", t.sizes());
    G.dlse = t.data_ptr<float>();
    G.dl_sb = t.stride(0), G.dl_sh = t.stride(1), G.dl_sl = t.stride(2);
  }
  G.need_qkv = need_qkv_grad;
  G.need_prior = need_prior_grad;
  G.need_alpha = need_alpha_grad;

  const auto f32 = q.options().dtype(at::kFloat);
  const auto empty = [&]() { return at::empty({0}, f32); };
  at::Tensor dq32, dk32, dv32, dp0, dp1, dalpha, lag_part, dal_part, du_part, dvp_part, rows_part;
  Outs O;
  if (need_qkv_grad) {
    dq32 = at::zeros({P.B, P.Hq, P.Lq, P.D}, f32);
    dk32 = at::zeros({P.B, P.Hkv, P.Lk, P.D}, f32);
    dv32 = at::zeros({P.B, P.Hkv, P.Lk, P.Dv}, f32);
    O.dq = dq32.data_ptr<float>();
    O.dk = dk32.data_ptr<float>();
    O.dv = dv32.data_ptr<float>();
  }
  float* second_pass = nullptr;
  if (need_prior_grad) {
    dp0 = at::zeros(prior0->sizes(), f32);
    if (prior_kind == kLag) {
      lag_part = at::zeros({P.B, P.Hq, P.p0.cols}, f32.dtype(at::kDouble));
      O.lag = lag_part.data_ptr<double>();
    } else if (prior_kind == kBanded || prior_kind == kDense) {
      const int64_t slab = P.p0.rows * P.p0.cols;
      O.rows = Slab{dp0.data_ptr<float>(), owned_by_one_item(P, P.p0), slab, P.p0.bp, P.p0.hp, P.Hq};
      if (!O.rows.direct) {
        // A broadcast band's per-(b, h) partials are B·Hq copies of its compact size: taken while that stays
        // small (a dense bias's never are), else the second pass.
        if (prior_kind == kBanded && P.B * P.Hq * slab * 4 <= band_partial_bytes()) {
          rows_part = at::zeros({P.B, P.Hq, slab}, f32);
          O.rows.base = rows_part.data_ptr<float>();
        } else {
          O.rows.base = nullptr;
          second_pass = dp0.data_ptr<float>();
        }
      }
    } else if (prior_kind == kLowRank) {
      dp1 = at::zeros(prior1->sizes(), f32);
      const int64_t su = P.Lq * P.half, sv = P.Lk * P.half;
      O.du = Slab{dp0.data_ptr<float>(), owned_by_one_item(P, P.p0), su, P.p0.bp, P.p0.hp, P.Hq};
      O.dvp = Slab{dp1.data_ptr<float>(), owned_by_one_item(P, P.p1), sv, P.p1.bp, P.p1.hp, P.Hq};
      if (!O.du.direct) {
        du_part = at::zeros({P.B, P.Hq, su}, f32);
        O.du.base = du_part.data_ptr<float>();
      }
      if (!O.dvp.direct) {
        dvp_part = at::zeros({P.B, P.Hq, sv}, f32);
        O.dvp.base = dvp_part.data_ptr<float>();
      }
    }
  }
  if (need_alpha_grad) {
    dal_part = at::zeros({P.B, P.Hq}, f32.dtype(at::kDouble));
    O.dalpha = dal_part.data_ptr<double>();
  }

  const bool work = need_qkv_grad || (prior_kind != kNone && (need_prior_grad || need_alpha_grad));
  if (work && P.B * P.Hq * P.Lq > 0) {
    switch (P.dtype) {
      case at::kFloat:
        run<float>(P, G, O, second_pass);
        break;
      case at::kHalf:
        run<c10::Half>(P, G, O, second_pass);
        break;
      case at::kBFloat16:
        run<c10::BFloat16>(P, G, O, second_pass);
        break;
      default:
        TORCH_CHECK(false, kOp, ": unsupported dtype ", P.dtype);
    }
  }

  if (need_prior_grad) {
    if (prior_kind == kLag) {
      reduce_slabs(P, lag_part.data_ptr<double>(), P.p0.cols, P.p0.bp, P.p0.hp, dp0.data_ptr<float>());
    } else if (rows_part.defined()) {
      reduce_slabs(P, rows_part.data_ptr<float>(), O.rows.size, P.p0.bp, P.p0.hp, dp0.data_ptr<float>());
    } else if (prior_kind == kLowRank) {
      if (!O.du.direct)
        reduce_slabs(P, du_part.data_ptr<float>(), O.du.size, P.p0.bp, P.p0.hp, dp0.data_ptr<float>());
      if (!O.dvp.direct)
        reduce_slabs(P, dvp_part.data_ptr<float>(), O.dvp.size, P.p1.bp, P.p1.hp, dp1.data_ptr<float>());
    }
  }
  if (need_alpha_grad) {
    dalpha = at::zeros({P.Hq}, f32);
    const double* part = dal_part.data_ptr<double>();
    float* y = dalpha.data_ptr<float>();
    for (int64_t h = 0; h < P.Hq; ++h) {
      double acc = 0.0;
      for (int64_t b = 0; b < P.B; ++b) acc += part[b * P.Hq + h];
      y[h] = static_cast<float>(acc);
    }
    if (alpha.has_value() && alpha->dim() == 0) dalpha = dalpha.sum();  // one alpha shared by every head
  }
  at::Tensor dq, dk, dv;
  if (need_qkv_grad) {
    dq = P.dtype == at::kFloat ? dq32 : dq32.to(q.scalar_type());
    dk = P.dtype == at::kFloat ? dk32 : dk32.to(q.scalar_type());
    dv = P.dtype == at::kFloat ? dv32 : dv32.to(q.scalar_type());
  } else {
    dq = at::empty({0}, q.options());
    dk = at::empty({0}, q.options());
    dv = at::empty({0}, q.options());
  }
  return {dq, dk, dv, dp0.defined() ? dp0 : empty(), dp1.defined() ? dp1 : empty(),
          dalpha.defined() ? dalpha : empty()};
}

}  // namespace
}  // namespace rapkern::cpu

TORCH_LIBRARY_IMPL(rapkern, CPU, m) { m.impl("attention_bwd", &rapkern::cpu::attention_bwd_cpu); }
