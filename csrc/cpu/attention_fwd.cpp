// CPU forward of biased attention: out = softmax(scale·QKᵀ + α_h·B + M) V, plus the row log-sum-exp.
//
// Algorithm: FlashAttention-2 on the CPU, laid out like PyTorch's own CPU flash kernel
// (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp). Work items are (b, hq, q-block), spread with
// at::parallel_for; each thread owns fp32 scratch for one q-block: the score tile, the running max and sum,
// and the output accumulator. Per key block: S = scale·Q Kᵀ (BLAS sgemm, see common.h), S += α·B (common.h,
// from the compact prior), masks, online softmax (at::vec exp), acc = acc·corr + P V (sgemm). Key blocks that
// no query of the block can see (causal prefix, banded mask_outside) are never visited, so a masked band
// costs O(L·w). Two fusions keep the prior nearly free: an unmasked lag tile adds its diagonal vector inside
// the row-max pass, and a low-rank prior rides in the score gemm as extra depth ([scale·Q | α·U][K | V]ᵀ).
// fp16/bf16 tiles are widened to fp32 scratch; all arithmetic is fp32.
//
// Every work item writes only its own rows of out and lse, so results are bitwise independent of the thread
// count. Scratch is O(threads · tile); nothing of size Lq x Lk is allocated.
#include "common.h"

namespace rapkern::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;

struct Blocks {
  int64_t bq, bk;
};

// Like PyTorch's CPU flash kernel: short query blocks for short sequences (more work items to spread),
// long ones for long sequences (fewer passes over K and V); 512-key blocks keep the score tile in L2.
// A masked band visits keys [i0 - w, i0 + bq + w) per query block, so its query block stays small next to
// the band (work per row ∝ bq + 2w instead of 2w + 1).
inline Blocks pick_blocks(const Problem& P) {
  int64_t bq = P.Lq >= 768 ? 256 : (P.Lq >= 192 ? 64 : 32);
  if (P.kind == kBanded && P.mask_outside) bq = std::min(bq, std::max<int64_t>(16, P.half / 4));
  int64_t bk = 512;
  return {std::max<int64_t>(1, std::min(bq, P.Lq)), std::max<int64_t>(1, std::min(bk, P.Lk))};
}

inline float row_max(const float* x, int64_t n) {
  int64_t c = 0;
  float m = kNegInf;
  if (n >= Vec::size()) {
    Vec vm(kNegInf);
    for (; c + Vec::size() <= n; c += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + c));
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x <- exp(x - m) in place; returns the sum (fixed summation order: vector lanes, then the tail).
inline float exp_sum_row(float* x, float m, int64_t n) {
  int64_t c = 0;
  float sum = 0.f;
  const Vec vm(m);
  if (n >= Vec::size()) {
    Vec vs(0.f);
    for (; c + Vec::size() <= n; c += Vec::size()) {
      Vec e = (Vec::loadu(x + c) - vm).exp_u20();
      vs = vs + e;
      e.store(x + c);
    }
    sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vs);
  }
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

// row += a·x (or += a when x is null), returning the row's max: the lag prior fused into the max pass.
inline float add_max_row(float* row, const float* x, float a, int64_t n) {
  int64_t c = 0;
  float m = kNegInf;
  const Vec va(a);
  if (n >= Vec::size()) {
    Vec vm(kNegInf);
    for (; c + Vec::size() <= n; c += Vec::size()) {
      Vec y = x ? at::vec::fmadd(va, Vec::loadu(x + c), Vec::loadu(row + c)) : Vec::loadu(row + c) + va;
      y.store(row + c);
      vm = at::vec::maximum(vm, y);
    }
    m = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return at::vec::maximum(p, q); }, vm);
  }
  for (; c < n; ++c) {
    row[c] = x ? row[c] + a * x[c] : row[c] + a;
    m = std::max(m, row[c]);
  }
  return m;
}

inline void scale_row(float* x, float a, int64_t n) {
  int64_t c = 0;
  const Vec va(a);
  for (; c + Vec::size() <= n; c += Vec::size()) (Vec::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// A (rows x cols) operand for cpublas: the input itself when it is fp32 with a usable row stride,
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

// Low-rank prior folded into the score gemm: S = [scale·Q | α·U] [K | V_lr]ᵀ, one gemm of depth D + r
// (a second skinny gemm of depth r costs far more than its r/D share of the flops). dst row c =
// [sx·x[c, :D] | sy·y[r0 + c, :r]].
template <typename T>
inline void pack_concat(const T* x, int64_t ldx, float sx, const View4& Y, const float* y, int64_t r0, float sy,
                        int64_t rows, int64_t D, float* dst) {
  const int64_t r = Y.cols, ld = D + r;
  for (int64_t c = 0; c < rows; ++c) {
    const T* xr = x + c * ldx;
    float* d = dst + c * ld;
    for (int64_t e = 0; e < D; ++e) d[e] = sx * static_cast<float>(xr[e]);
    const float* yr = y + (r0 + c) * Y.sr;
    for (int64_t e = 0; e < r; ++e) d[D + e] = sy * yr[e * Y.sc];
  }
}

template <typename T>
void fwd_kernel(const Problem& P, T* out, float* lse) {
  const Blocks blk = pick_blocks(P);
  const int64_t bq_max = blk.bq, bk_max = blk.bk;
  const int64_t n_qb = (P.Lq + bq_max - 1) / bq_max;
  const int64_t D = P.D, Dv = P.Dv;
  // per-thread scratch: score tile, running max and sum, accumulator, widened q/k/v tiles, prior scratch
  const int64_t n_s = pad16(bq_max * bk_max), n_m = pad16(bq_max), n_acc = pad16(bq_max * Dv);
  const bool concat = P.kind == kLowRank;
  const int64_t Dc = concat ? D + P.half : D;  // score-gemm depth
  const int64_t n_q = pad16(bq_max * Dc), n_k = pad16(bk_max * Dc), n_v = pad16(bk_max * Dv);
  const int64_t n_p = pad16(prior_scratch_floats(P, bq_max, bk_max));
  const ThreadScratch scratch(at::get_num_threads(), n_s + 2 * n_m + n_acc + n_q + n_k + n_v + n_p);
  const float drop_scale = P.dropout_p > 0 ? static_cast<float>(1.0 / (1.0 - P.dropout_p)) : 1.f;

  at::parallel_for(0, P.B * P.Hq * n_qb, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlas sequential;  // bitwise independent of the thread count (common.h)
    float* s = scratch.get(at::get_thread_num());
    float* m = s + n_s;
    float* l = m + n_m;
    float* acc = l + n_m;
    float* qs = acc + n_acc;
    float* ks = qs + n_q;
    float* vs = ks + n_k;
    float* ps = vs + n_v;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t qb = item % n_qb, bh = item / n_qb;
      const int64_t h = bh % P.Hq, b = bh / P.Hq, hk = P.kv_head(h);
      const int64_t i0 = qb * bq_max, bq = std::min(bq_max, P.Lq - i0);
      int64_t j_lo, j_hi;
      key_range(P, i0, i0 + bq, &j_lo, &j_hi);
      std::fill(m, m + bq, kNegInf);
      std::fill(l, l + bq, 0.f);
      int64_t ldq = Dc;
      const float* qt = qs;
      if (j_lo < j_hi) {
        if (concat) {
          pack_concat(P.q_ptr<T>(b, h, i0), P.q_sl, P.scale, P.p0, P.p0.at(b, h), i0, P.alpha_of(h), bq, D, qs);
        } else {
          qt = operand(P.q_ptr<T>(b, h, i0), P.q_sl, bq, D, qs, &ldq);
        }
      }
      bool first = true;
      for (int64_t j0 = j_lo; j0 < j_hi; j0 += bk_max) {
        const int64_t bk = std::min(bk_max, j_hi - j0);
        int64_t ldk = Dc, ldv = 0;
        if (concat) {
          pack_concat(P.k_ptr<T>(b, hk, j0), P.k_sl, 1.f, P.p1, P.p1.at(b, h), j0, 1.f, bk, D, ks);
          gemm_nt(bq, bk, Dc, 1.f, qt, ldq, ks, ldk, 0.f, s, bk);
        } else {
          const float* kt = operand(P.k_ptr<T>(b, hk, j0), P.k_sl, bk, D, ks, &ldk);
          gemm_nt(bq, bk, D, P.scale, qt, ldq, kt, ldk, 0.f, s, bk);
        }
        // A lag tile that needs no mask adds its prior inside the max pass (one pass over S fewer).
        const bool needs_mask = tile_needs_mask(P, b, i0, bq, j0, bk);
        const bool fuse_lag = P.kind == kLag && !needs_mask && tile_has_prior(P, h, i0, bq, j0, bk);
        bool lag_const = false;
        float lag_cst = 0.f;
        if (fuse_lag) {
          lag_const = lag_tile(P, b, h, i0, bq, j0, bk, ps, &lag_cst);
        } else {
          if (!concat) add_prior_tile(P, b, h, i0, bq, j0, bk, s, bk, ps);
          if (needs_mask) apply_masks(P, b, i0, bq, j0, bk, s, bk);
        }
        const float a_h = P.alpha_of(h);
        for (int64_t r = 0; r < bq; ++r) {
          float* row = s + r * bk;
          const float row_m = !fuse_lag ? row_max(row, bk)
                              : lag_const ? add_max_row(row, nullptr, lag_cst, bk)
                                          : add_max_row(row, ps + (bq - 1 - r), a_h, bk);
          const float m_new = std::max(m[r], row_m);
          if (m_new == kNegInf) {  // nothing visible yet: p = 0, keep acc (0 or untouched)
            std::fill(row, row + bk, 0.f);
            continue;
          }
          const float sum = exp_sum_row(row, m_new, bk);
          const float corr = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          l[r] = l[r] * corr + sum;
          m[r] = m_new;
          if (!first && corr != 1.f) scale_row(acc + r * Dv, corr, Dv);
        }
        if (P.dropout_p > 0) dropout_tile(P, b, h, i0, bq, j0, bk, s, bk);
        const float* vt = operand(P.v_ptr<T>(b, hk, j0), P.v_sl, bk, Dv, vs, &ldv);
        gemm_nn(bq, Dv, bk, 1.f, s, bk, vt, ldv, first ? 0.f : 1.f, acc, Dv);
        first = false;
      }
      T* o = out + ((b * P.Hq + h) * P.Lq + i0) * Dv;
      float* ls = lse + (b * P.Hq + h) * P.Lq + i0;
      for (int64_t r = 0; r < bq; ++r) {
        float* a = acc + r * Dv;
        if (first || l[r] == 0.f) {  // no visible key: out 0, lse -inf
          std::fill(a, a + Dv, 0.f);
          ls[r] = kNegInf;
        } else {
          scale_row(a, drop_scale / l[r], Dv);
          ls[r] = m[r] + std::log(l[r]);
        }
      }
      store_from_f32(acc, Dv, bq, Dv, o, Dv);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     const std::optional<at::Tensor>& alpha, double alpha_value,
                                                     int64_t prior_kind, const std::optional<at::Tensor>& prior0,
                                                     const std::optional<at::Tensor>& prior1, bool mask_outside,
                                                     bool causal, double scale, double dropout_p, int64_t seed) {
  const Problem P = make_problem("rapkern::attention_fwd", q, k, v, key_padding_mask, alpha, alpha_value,
                                 prior_kind, prior0, prior1, mask_outside, causal, scale, dropout_p, seed);
  check_prior_values(P);
  at::Tensor out = at::empty({P.B, P.Hq, P.Lq, P.Dv}, q.options());
  at::Tensor lse = at::empty({P.B, P.Hq, P.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  switch (P.dtype) {
    case at::kFloat:
      fwd_kernel<float>(P, out.data_ptr<float>(), lse.data_ptr<float>());
      break;
    case at::kHalf:
      fwd_kernel<c10::Half>(P, out.data_ptr<c10::Half>(), lse.data_ptr<float>());
      break;
    case at::kBFloat16:
      fwd_kernel<c10::BFloat16>(P, out.data_ptr<c10::BFloat16>(), lse.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "rapkern::attention_fwd: unsupported dtype ", P.dtype);
  }
  return {out, lse};
}

}  // namespace
}  // namespace rapkern::cpu

TORCH_LIBRARY_IMPL(rapkern, CPU, m) { m.impl("attention_fwd", &rapkern::cpu::attention_fwd_cpu); }
