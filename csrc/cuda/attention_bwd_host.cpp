// Host side of the CUDA backward of rapkern::attention_bwd (issue 15): bwd_problem.h checks the contract and
// prepares the buffers, attention_bwd.cu's passes run on the current stream, every launch checked.
// UNVERIFIED ON A GPU (see attention_bwd.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/bwd_params.h"
#include "cuda/bwd_problem.h"

namespace rapkern::cuda {
namespace {

bool p_blocks_fit(const FwdParams& f) {
  return cdiv(f.Lq, bwd_q_rows(f.D)) <= 65535 && cdiv(f.Lk, kBwdKB) <= 65535;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& alpha, double alpha_value,
    int64_t prior_kind, const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1,
    bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed, bool need_qkv_grad,
    bool need_prior_grad, bool need_alpha_grad) {
  const c10::cuda::CUDAGuard guard(q.device());
  host::BwdSetup S = host::make_bwd(dout, dlse, q, k, v, out, lse, key_padding_mask, alpha, alpha_value, prior_kind,
                                    prior0, prior1, mask_outside, causal, scale, dropout_p, seed, need_qkv_grad,
                                    need_prior_grad, need_alpha_grad, true);
  if (S.work) {
    const FwdParams& f = S.p.f;
    TORCH_CHECK(p_blocks_fit(f), host::kBwdOp, ": Lq = ", f.Lq, ", Lk = ", f.Lk,
                " exceed the grid's y limit (65535 blocks of ", bwd_q_rows(f.D), " queries / ", kBwdKB, " keys)");
    const auto dt = q.scalar_type();
    const int dtype = dt == at::kFloat ? kF32 : dt == at::kHalf ? kF16 : kBF16;
    C10_CUDA_CHECK(launch_attention_bwd(S.p, dtype, c10::cuda::getCurrentCUDAStream()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return host::bwd_result(S, q);
}

}  // namespace
}  // namespace rapkern::cuda

TORCH_LIBRARY_IMPL(rapkern, CUDA, m) { m.impl("attention_bwd", &rapkern::cuda::attention_bwd_cuda); }
