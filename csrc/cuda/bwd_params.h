// The backward kernels' parameters and launch sequence: plain data shared by the host side
// (attention_bwd_host.cpp, bwd_problem.h) and the kernels (attention_bwd.cu, attention_bwd_kernel.cuh); all
// pointers are device pointers, strides in elements. bwd_passes() is the one list of launches that the CUDA
// launcher and the host emulation test both run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/fwd_params.h"
#include "cuda/index.h"

namespace rapkern::cuda {

struct BwdParams {
  FwdParams f;  // the problem as the forward saw it (f.out / f.lse unused)
  const void* dout = nullptr;  // (B, Hq, Lq, Dv), q's dtype, last stride 1
  int64_t do_sb = 0, do_sh = 0, do_sl = 0;
  const float* lse = nullptr;    // (B, Hq, Lq) contiguous: the forward's lse, -inf (no visible key) -> +inf
  const float* delta = nullptr;  // (B, Hq, Lq) contiguous: rowsum(dout * out) - dlse, 0 on rows without keys
  bool need_qkv = false;         // dq, dk, dv wanted (their pointers may be null for empty tensors)
  void* dq = nullptr;            // (B, Hq, Lq, D) contiguous, q's dtype
  void* dk = nullptr;            // (B, Hkv, Lk, D)
  void* dv = nullptr;            // (B, Hkv, Lk, Dv)
  float* drows = nullptr;  // band values / dense bias / low-rank u gradient: (Bp0, Hp0, rows, cols) contiguous
  float* dcols = nullptr;  // low-rank v gradient: (Bp1, Hp1, Lk, r) contiguous
  int64_t Bp0 = 1, Hp0 = 1, Bp1 = 1, Hp1 = 1;  // leading dims of the prior views
  float* dlag = nullptr;      // lag table gradient (Bp0, Hp0, 2W+1), written by the lag reduction
  float* dalpha = nullptr;    // (alpha_heads,): Hq, or 1 for a () alpha; written by the alpha reduction
  int64_t alpha_heads = 0;
  float* lag_part = nullptr;  // (B, Hq, nqb, 2W+1): raw diagonal sums of dS per q block (alpha not applied)
  float* dal_part = nullptr;  // (B, Hq, nqb): sum of dS * B per q block
  int64_t nqb = 0;            // query blocks of bwd_q_rows(D) rows
};

// One launch: kernel kQ (per query block: dq, prior rows, partials), kKV (per key block: dk, dv, low-rank v
// gradient) or kReduce (a partial buffer into its output, fixed order).
enum BwdKernel : int { kQ = 0, kKV = 1, kReduce = 2 };
enum ReduceWhat : int { kReduceLag = 0, kReduceAlpha = 1 };

struct BwdPass {
  int kernel = kQ;
  int mode = kPerHead;  // WorkMode (index.h)
  bool qkv = false;       // kQ: dq; kKV: dk, dv
  bool rows = false;      // kQ: band/dense/low-rank-u gradient; kKV: low-rank v gradient
  bool partials = false;  // kQ: lag partials and/or dalpha partials (mode kPerHead only)
  int reduce = kReduceLag;
  // kReduce: out[(bp, hp), e] = sum_t (alpha_h if with_alpha) * part[partial_term_slot(t, ...), e]
  const float* part = nullptr;
  float* out = nullptr;
  int64_t size = 0, Bp = 1, Hp = 1;
  bool with_alpha = false;
};

constexpr int kMaxBwdPasses = 6;

inline bool bwd_one_to_one(const BwdParams& p, int64_t Bp, int64_t Hp) { return Bp == p.f.B && Hp == p.f.Hq; }

// The launches for p in order (at most kMaxBwdPasses); which outputs are set decides which passes run. Prior
// rows/columns are computed in the dq/dk-dv pass when each (bp, hp) slab belongs to one (b, h) pair, else by a
// separate per-slab pass that visits the slab's pairs in a fixed order (deterministic, no partial of Lq x Lk).
inline int bwd_passes(const BwdParams& p, BwdPass* out) {
  int n = 0;
  const bool qkv = p.need_qkv;
  const bool partials = p.lag_part != nullptr || p.dal_part != nullptr;
  const bool rows = p.drows != nullptr;
  const bool rows_fused = rows && bwd_one_to_one(p, p.Bp0, p.Hp0);
  const bool cols = p.dcols != nullptr;
  const bool cols_fused = cols && qkv && bwd_one_to_one(p, p.Bp1, p.Hp1);
  auto add = [&](int kernel, int mode, bool q, bool r, bool part) {
    BwdPass s;
    s.kernel = kernel, s.mode = mode, s.qkv = q, s.rows = r, s.partials = part;
    out[n++] = s;
    return &out[n - 1];
  };
  if (qkv) add(kKV, kPerKvHead, true, cols_fused, false);
  if (cols && !cols_fused) add(kKV, kPerSlab, false, true, false);
  if (qkv || partials || rows_fused) add(kQ, kPerHead, qkv, rows_fused, partials);
  if (rows && !rows_fused) add(kQ, kPerSlab, false, true, false);
  if (p.lag_part != nullptr && p.dlag != nullptr) {
    BwdPass* s = add(kReduce, kPerHead, false, false, false);
    s->reduce = kReduceLag, s->part = p.lag_part, s->out = p.dlag, s->size = 2 * p.f.half + 1;
    s->Bp = p.Bp0, s->Hp = p.Hp0, s->with_alpha = true;
  }
  if (p.dal_part != nullptr && p.dalpha != nullptr) {
    BwdPass* s = add(kReduce, kPerHead, false, false, false);
    s->reduce = kReduceAlpha, s->part = p.dal_part, s->out = p.dalpha, s->size = 1;
    s->Bp = 1, s->Hp = p.alpha_heads;
  }
  return n;
}

// Grid of a pass (x: work items or reduction blocks, y: query/key blocks).
constexpr int kBwdBM = 64;   // query rows per kQ CTA at head dim 64 (bwd_q_rows)
constexpr int kBwdBN = 32;   // keys per kQ tile
constexpr int kBwdKB = 64;   // keys per kKV CTA
constexpr int kBwdQT = 16;   // queries per kKV tile
constexpr int kBwdNT = 256;  // threads per CTA (all kernels)

// Query rows per kQ CTA: the kernel gives each row D / 16 threads (16 head-dim columns each, so that the q and dq
// slices fit in registers at every head dim): 64 rows at head dim 64, 32 at 128.
RK_HD int64_t bwd_q_rows(int64_t D) { return D <= 64 ? kBwdBM : kBwdBM / 2; }

inline void bwd_grid(const BwdParams& p, const BwdPass& s, unsigned* gx, unsigned* gy) {
  if (s.kernel == kReduce) {
    *gx = static_cast<unsigned>(cdiv(s.Bp * s.Hp * s.size, kBwdNT));
    *gy = 1;
    return;
  }
  const int64_t Bp = s.kernel == kQ ? p.Bp0 : p.Bp1, Hp = s.kernel == kQ ? p.Hp0 : p.Hp1;
  *gx = static_cast<unsigned>(work_items(s.mode, p.f.B, p.f.Hq, p.f.Hkv, Bp, Hp));
  *gy = static_cast<unsigned>(s.kernel == kQ ? cdiv(p.f.Lq, bwd_q_rows(p.f.D)) : cdiv(p.f.Lk, kBwdKB));
}

// Launches every pass on `stream` for dtype `dtype` (DType); returns the first launch error.
cudaError_t launch_attention_bwd(const BwdParams& p, int dtype, cudaStream_t stream);

}  // namespace rapkern::cuda
