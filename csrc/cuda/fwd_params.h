// The forward kernel's parameters: plain data shared by the host side (attention_fwd_host.cpp, compiled by the
// host compiler with ATen) and the kernels (attention_fwd.cu, compiled by nvcc without ATen, which keeps the
// nvcc part of the build short). All pointers are device pointers; strides are in elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/index.h"

namespace rapkern::cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum PriorKind : int { kNone = 0, kLag = 1, kBanded = 2, kLowRank = 3, kDense = 4 };

struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // (B, Hq, Lq, Dv) contiguous, q's dtype
  float* lse = nullptr;  // (B, Hq, Lq) contiguous
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;  // last-dim stride 1 (the host establishes it)
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  int64_t B = 0, Hq = 0, Hkv = 0, group = 1, Lq = 0, Lk = 0, D = 0, Dv = 0;
  const bool* kpm = nullptr;  // (B, Lk), true = masked; nullptr when absent
  int64_t kpm_sb = 0, kpm_sl = 0;
  const float* alpha = nullptr;  // (Hq,) with stride alpha_s (0 for a () alpha); nullptr -> alpha_value
  int64_t alpha_s = 0;
  float alpha_value = 1.f;
  int kind = kNone;
  int64_t half = 0;  // lag: W; band: w; low-rank: rank r
  bool band_masked = false, causal = false;
  const float* p0 = nullptr;  // lag table (rows 1, sr 0) / band values / low-rank u / dense bias, float32
  const float* p1 = nullptr;  // low-rank v
  PriorAddr a0, a1;           // strides of p0 / p1 (leading strides 0 along broadcast dims)
  float scale = 1.f;
  float dropout_p = 0.f;
  uint64_t seed = 0;
};

// Launches the forward on `stream` for dtype `dtype` (DType) and head dim p.D == p.Dv in {64, 128}; returns the
// launch's error (cudaGetLastError). The host side checks every precondition before calling it.
cudaError_t launch_attention_fwd(const FwdParams& p, int dtype, cudaStream_t stream);

// Head dims with a compiled kernel.
inline bool fwd_head_dim_supported(int64_t d, int64_t dv) { return d == dv && (d == 64 || d == 128); }

}  // namespace rapkern::cuda
