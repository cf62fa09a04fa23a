// Host side of the CUDA backward, device-independent part (used by attention_bwd_host.cpp for CUDA tensors and
// by the host emulation test for CPU tensors, `expect_cuda = false`): checks the op contract (csrc/ops.cpp;
// the forward's checks via fwd_problem.h plus dout/out/lse/dlse), allocates the outputs and the partial
// buffers, and prepares delta = rowsum(dout ∘ out) − dlse and the lse with −inf (no visible key) turned into
// +inf, with at:: ops (deterministic: no atomics in ATen's row sums).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cuda/bwd_params.h"
#include "cuda/fwd_problem.h"

namespace rapkern::cuda {
namespace host {

constexpr const char* kBwdOp = "rapkern::attention_bwd (CUDA)";

struct BwdSetup {
  BwdParams p;
  std::vector<at::Tensor> held;  // everything the pointers in p use
  at::Tensor dq, dk, dv, dp0, dp1, dalpha;
  bool work = false;  // some pass has something to do
};

inline void check_like_out(const char* name, const at::Tensor& t, const at::Tensor& q, const FwdParams& f) {
  check_same_device(name, t, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kBwdOp, ": ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == f.B && t.size(1) == f.Hq && t.size(2) == f.Lq && t.size(3) == f.Dv,
              kBwdOp, ": ", name, " must have shape (B, Hq, Lq, Dv) = (", f.B, ", ", f.Hq, ", ", f.Lq, ", ", f.Dv,
              "), got ", t.sizes());
}

inline at::Tensor check_row_stat(const char* name, const at::Tensor& t, const at::Tensor& q, const FwdParams& f) {
  check_same_device(name, t, q);
  TORCH_CHECK(t.scalar_type() == at::kFloat, kBwdOp, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == f.B && t.size(1) == f.Hq && t.size(2) == f.Lq, kBwdOp, ": ", name,
              " must have shape (B, Hq, Lq) = (", f.B, ", ", f.Hq, ", ", f.Lq, "), got ", t.sizes());
  return t;
}

// (Bp, Hp) of a prior tensor with `trailing` trailing dims (missing leading dims count as 1).
inline void prior_lead(const at::Tensor& t, int64_t trailing, int64_t* bp, int64_t* hp) {
  const int64_t lead = t.dim() - trailing;
  *bp = lead == 2 ? t.size(0) : 1;
  *hp = lead >= 1 ? t.size(lead - 1) : 1;
}

inline BwdSetup make_bwd(const at::Tensor& dout_in, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                         const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_in, const at::Tensor& lse,
                         const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& alpha,
                         double alpha_value, int64_t prior_kind, const std::optional<at::Tensor>& prior0,
                         const std::optional<at::Tensor>& prior1, bool mask_outside, bool causal, double scale,
                         double dropout_p, int64_t seed, bool need_qkv_grad, bool need_prior_grad,
                         bool need_alpha_grad, bool expect_cuda) {
  BwdSetup S;
  BwdParams& p = S.p;
  p.f = make_fwd_params(q, k, v, key_padding_mask, alpha, alpha_value, prior_kind, prior0, prior1, mask_outside,
                        causal, scale, dropout_p, seed, expect_cuda, S.held);
  const FwdParams& f = p.f;
  check_like_out("dout", dout_in, q, f);
  check_like_out("out", out_in, q, f);
  check_row_stat("lse", lse, q, f);
  if (dlse.has_value()) check_row_stat("dlse", *dlse, q, f);
  TORCH_CHECK(!need_prior_grad || prior_kind != kNone, kBwdOp,
              ": need_prior_grad requires a prior (prior_kind 1..4)");
  const at::Tensor dout = unit_last(dout_in);
  S.held.push_back(dout);
  p.dout = dout.data_ptr();
  p.do_sb = dout.stride(0), p.do_sh = dout.stride(1), p.do_sl = dout.stride(2);

  const auto f32 = q.options().dtype(at::kFloat);
  const at::Tensor dead = at::isneginf(lse);
  at::Tensor delta = (dout.to(at::kFloat) * out_in.to(at::kFloat)).sum(-1);
  if (dlse.has_value()) delta = delta - *dlse;
  delta = at::where(dead, at::zeros({}, f32), delta).contiguous();
  const at::Tensor lse_eff = at::where(dead, at::full({}, INFINITY, f32), lse).contiguous();
  S.held.insert(S.held.end(), {delta, lse_eff});
  p.delta = delta.data_ptr<float>();
  p.lse = lse_eff.data_ptr<float>();
  p.nqb = cdiv(f.Lq, bwd_q_rows(f.D));

  const bool any = f.B * f.Hq * f.Lq > 0 || f.B * f.Hkv * f.Lk > 0;
  if (need_qkv_grad) {
    S.dq = at::empty({f.B, f.Hq, f.Lq, f.D}, q.options());
    S.dk = at::empty({f.B, f.Hkv, f.Lk, f.D}, q.options());
    S.dv = at::empty({f.B, f.Hkv, f.Lk, f.Dv}, q.options());
    p.dq = S.dq.data_ptr(), p.dk = S.dk.data_ptr(), p.dv = S.dv.data_ptr();
    p.need_qkv = true;
    S.work = any;
  }
  const bool has_prior = prior_kind != kNone;
  if (need_prior_grad) {
    S.dp0 = at::zeros(prior0->sizes(), f32);
    if (prior_kind == kLag) {
      prior_lead(*prior0, 1, &p.Bp0, &p.Hp0);
      S.held.push_back(at::zeros({f.B, f.Hq, p.nqb, 2 * f.half + 1}, f32));
      p.lag_part = S.held.back().data_ptr<float>();
      p.dlag = S.dp0.data_ptr<float>();
    } else {
      prior_lead(*prior0, 2, &p.Bp0, &p.Hp0);
      p.drows = S.dp0.data_ptr<float>();
    }
    if (prior_kind == kLowRank) {
      S.dp1 = at::zeros(prior1->sizes(), f32);
      prior_lead(*prior1, 2, &p.Bp1, &p.Hp1);
      p.dcols = S.dp1.data_ptr<float>();
    }
    S.work = S.work || any;
  }
  if (need_alpha_grad) {
    const bool shared = alpha.has_value() && alpha->dim() == 0;  // one alpha for every head
    p.alpha_heads = shared ? 1 : f.Hq;
    S.dalpha = at::zeros(shared ? std::vector<int64_t>{} : std::vector<int64_t>{f.Hq}, f32);
    if (has_prior) {
      S.held.push_back(at::zeros({f.B, f.Hq, p.nqb}, f32));
      p.dal_part = S.held.back().data_ptr<float>();
      p.dalpha = S.dalpha.data_ptr<float>();
      S.work = S.work || any;
    }
  }
  return S;
}

inline at::Tensor empty_f32(const at::Tensor& q) { return at::empty({0}, q.options().dtype(at::kFloat)); }

// The op's result tuple (empty tensors for what was not asked).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_result(
    const BwdSetup& S, const at::Tensor& q) {
  auto or_empty = [&](const at::Tensor& t, bool f32) {
    return t.defined() ? t : (f32 ? empty_f32(q) : at::empty({0}, q.options()));
  };
  return {or_empty(S.dq, false), or_empty(S.dk, false), or_empty(S.dv, false), or_empty(S.dp0, true),
          or_empty(S.dp1, true), or_empty(S.dalpha, true)};
}

}  // namespace host
}  // namespace rapkern::cuda
