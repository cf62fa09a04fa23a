// Host side of the CUDA forward, device-independent part: checks the contract of csrc/ops.cpp (messages name the
// argument) and fills a FwdParams, establishing the kernel's layouts with at:: ops as make_problem in
// csrc/cpu/common.h does on the CPU: q/k/v with a non-unit last stride are copied, priors and alpha are read as
// float32, a prior's missing leading dims count as 1 and its broadcast leading dims get stride 0; the prior's
// values are checked (ValueError with the messages of rapkern/priors.py).
//
// Used by attention_fwd_host.cpp (CUDA tensors) and by the host emulation test (tests/test_cuda_ext.py, CPU
// tensors, `expect_cuda = false`), so the emulated kernel runs on exactly the parameters the real one gets.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cuda/fwd_params.h"
#include "contract.h"

namespace rapkern::cuda {
namespace host {

constexpr const char* kOp = "rapkern::attention_fwd (CUDA)";


inline void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " must be on q's device ", q.device(), ", got ",
              t.device());
}

// t itself when its last dim has unit stride (or size <= 1), else a contiguous copy.
inline at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// A float32 (Bp, Hp, rows, cols) reading of a prior tensor with `trailing` trailing dims; `held` keeps a
// converted copy alive until the launch is queued (the caching allocator is stream-ordered).
inline const float* prior_view(const char* name, const at::Tensor& t_in, int64_t trailing, int64_t B, int64_t Hq,
                        const at::Tensor& q, std::vector<at::Tensor>& held, PriorAddr* addr, int64_t* rows,
                        int64_t* cols) {
  check_same_device(name, t_in, q);
  TORCH_CHECK(at::isFloatingType(t_in.scalar_type()), kOp, ": ", name, " must be a floating tensor, got ",
              t_in.scalar_type());
  const int64_t lead = t_in.dim() - trailing;
  TORCH_CHECK(lead >= 0 && lead <= 2, kOp, ": ", name, " must have ", trailing,
              " trailing dims after leading dims (), (Hp,) or (Bp, Hp), got shape ", t_in.sizes());
  at::Tensor t = t_in.scalar_type() == at::kFloat ? t_in : t_in.to(at::kFloat);
  for (int64_t d = lead; d < 2; ++d) t = t.unsqueeze(0);  // (Bp, Hp, ...) with the missing dims of size 1
  if (trailing == 1) t = t.unsqueeze(2);                   // lag table: (Bp, Hp, 1, 2W+1)
  held.push_back(t);
  const int64_t bp = t.size(0), hp = t.size(1);
  TORCH_CHECK((bp == 1 || bp == B) && (hp == 1 || hp == Hq), kOp, ": ", name, " leading dims (", bp, ", ", hp,
              ") must be (Bp, Hp) with Bp in {1, ", B, "} and Hp in {1, ", Hq, "}");
  addr->sb = bcast_stride(bp, t.stride(0));
  addr->sh = bcast_stride(hp, t.stride(1));
  addr->sr = trailing == 1 ? 0 : t.stride(2);
  addr->sc = t.stride(3);
  *rows = t.size(2);
  *cols = t.size(3);
  return t.data_ptr<float>();
}

// The forward's up-front value check (rapkern/priors.py _check_values; csrc/cpu/common.h check_values_of):
// compact priors must be finite, a dense bias may hold -inf (a mask) but no NaN or +inf. One reduction and a
// host read per prior tensor.
inline void check_values(const at::Tensor& t, const char* name, bool allow_neginf) {
  if (t.numel() == 0) return;
  const at::Tensor bad = allow_neginf ? at::logical_or(at::isnan(t), at::isposinf(t)) : at::logical_not(at::isfinite(t));
  check_no_bad_values(name, bad.sum().item<int64_t>(), allow_neginf);
}

// Checks every argument and fills `p` (out/lse pointers excluded); `held` keeps the copies the pointers use.
inline FwdParams make_fwd_params(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& alpha, double alpha_value,
    int64_t prior_kind, const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1,
    bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed, bool expect_cuda,
    std::vector<at::Tensor>& held) {
  TORCH_CHECK(!expect_cuda || q_in.is_cuda(), kOp, ": q must be a CUDA tensor, got device ", q_in.device());
  const auto dt = q_in.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp,
              ": q dtype must be float32, float16 or bfloat16, got ", dt);
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q_in}, {"k", &k_in}, {"v", &v_in}}) {
    check_same_device(name, *t, q_in);
    TORCH_CHECK(t->dim() == 4, kOp, ": ", name, " must be 4-D (B, H, L, D), got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == dt, kOp, ": ", name, " must have q's dtype ", dt, " (no implicit casts), got ",
                t->scalar_type());
  }
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  held.insert(held.end(), {q, k, v});

  FwdParams p;
  p.B = q.size(0), p.Hq = q.size(1), p.Lq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Lk = k.size(2), p.Dv = v.size(3);
  check_qkv_sizes(kOp, q, k, v);
  TORCH_CHECK(fwd_head_dim_supported(p.D, p.Dv), kOp, ": head dims D = ", p.D, ", Dv = ", p.Dv,
              " are not compiled; the CUDA kernels serve D == Dv in {64, 128} (use backend='triton' for others)");
  p.group = p.Hq / p.Hkv;
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);

  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    check_same_device("key_padding_mask", m, q);
    TORCH_CHECK(m.scalar_type() == at::kBool, kOp, ": key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.Lk, kOp,
                ": key_padding_mask must have shape (B, Lk) = (", p.B, ", ", p.Lk, "), got ", m.sizes());
    p.kpm = m.data_ptr<bool>();
    p.kpm_sb = m.stride(0), p.kpm_sl = m.stride(1);
  }
  if (alpha.has_value()) {
    const auto& a = *alpha;
    check_same_device("alpha", a, q);
    TORCH_CHECK(at::isFloatingType(a.scalar_type()), kOp, ": alpha must be a floating tensor, got ", a.scalar_type());
    TORCH_CHECK(a.dim() == 0 || (a.dim() == 1 && a.size(0) == p.Hq), kOp, ": alpha must have shape () or (Hq,) = (",
                p.Hq, ",), got ", a.sizes());
    const at::Tensor a32 = a.scalar_type() == at::kFloat ? a : a.to(at::kFloat);
    held.push_back(a32);
    p.alpha = a32.data_ptr<float>();
    p.alpha_s = a32.dim() == 0 ? 0 : a32.stride(0);
  }
  p.alpha_value = static_cast<float>(alpha_value);

  check_prior_args(kOp, prior_kind, prior0, prior1, mask_outside);
  p.kind = static_cast<int>(prior_kind);
  int64_t rows = 0, cols = 0, rows1 = 0, cols1 = 0;
  if (prior_kind == kLag) {
    p.p0 = prior_view("prior0 (lag table)", *prior0, 1, p.B, p.Hq, q, held, &p.a0, &rows, &cols);
    TORCH_CHECK(cols % 2 == 1, kOp, ": prior0 (lag table) last dim must be odd (2W+1), got ", cols);
    p.half = (cols - 1) / 2;
    check_values(held.back(), "RelativeLagPrior.table", false);
  } else if (prior_kind == kBanded) {
    p.p0 = prior_view("prior0 (band values)", *prior0, 2, p.B, p.Hq, q, held, &p.a0, &rows, &cols);
    TORCH_CHECK(cols % 2 == 1, kOp, ": prior0 (band values) last dim must be odd (2w+1), got ", cols);
    TORCH_CHECK(rows == p.Lq, kOp, ": prior0 (band values) must have Lq = ", p.Lq, " rows, got ", rows);
    p.half = (cols - 1) / 2;
    check_values(held.back(), "BandedPrior.values", false);
  } else if (prior_kind == kLowRank) {
    p.p0 = prior_view("prior0 (low-rank u)", *prior0, 2, p.B, p.Hq, q, held, &p.a0, &rows, &cols);
    check_values(held.back(), "LowRankPrior.u", false);
    p.p1 = prior_view("prior1 (low-rank v)", *prior1, 2, p.B, p.Hq, q, held, &p.a1, &rows1, &cols1);
    check_values(held.back(), "LowRankPrior.v", false);
    TORCH_CHECK(rows == p.Lq, kOp, ": prior0 (low-rank u) must have Lq = ", p.Lq, " rows, got ", rows);
    TORCH_CHECK(rows1 == p.Lk, kOp, ": prior1 (low-rank v) must have Lk = ", p.Lk, " rows, got ", rows1);
    TORCH_CHECK(cols == cols1, kOp, ": prior0 (u) and prior1 (v) must have the same rank, got ", cols, " and ",
                cols1);
    p.half = cols;
  } else if (prior_kind == kDense) {
    p.p0 = prior_view("prior0 (dense bias)", *prior0, 2, p.B, p.Hq, q, held, &p.a0, &rows, &cols);
    TORCH_CHECK(rows == p.Lq && cols == p.Lk, kOp, ": prior0 (dense bias) must end in (Lq, Lk) = (", p.Lq, ", ",
                p.Lk, "), got (", rows, ", ", cols, ")");
    check_values(held.back(), "DensePrior.bias", true);
  }
  p.band_masked = prior_kind == kBanded && mask_outside;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in [0, 1), got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);

  return p;
}

}  // namespace host
}  // namespace rapkern::cuda
