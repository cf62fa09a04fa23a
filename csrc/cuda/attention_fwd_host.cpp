// Host side of the CUDA forward of rapkern::attention_fwd (issue 15): checks the contract of csrc/ops.cpp with
// messages naming the argument, establishes the kernel's layouts with at:: ops (as make_problem in
// csrc/cpu/common.h does on the CPU: q/k/v with a non-unit last stride are copied, priors and alpha read as
// float32, a prior's missing leading dims count as 1 and its broadcast leading dims get stride 0), checks the
// prior's values (ValueError, the messages of rapkern/priors.py), then launches attention_fwd.cu's kernel on
// the current stream.
//
// UNVERIFIED ON A GPU (see attention_fwd.cu). The CUDA backward (rapkern::attention_bwd) is not implemented:
// it stays unregistered for the CUDA key, so a backward through these kernels fails with the dispatcher's
// "could not run ... with arguments from the 'CUDA' backend"; rapkern's "cuda" backend declines inputs that
// need gradients ("backward not implemented yet").
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "cuda/fwd_params.h"
#include "cuda/fwd_problem.h"

namespace rapkern::cuda {
namespace {

using host::kOp;

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& alpha, double alpha_value,
    int64_t prior_kind, const std::optional<at::Tensor>& prior0, const std::optional<at::Tensor>& prior1,
    bool mask_outside, bool causal, double scale, double dropout_p, int64_t seed) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  std::vector<at::Tensor> held;  // copies the kernel reads (stream-ordered allocator: safe to free after launch)
  FwdParams p = host::make_fwd_params(q_in, k_in, v_in, key_padding_mask, alpha, alpha_value, prior_kind, prior0,
                                      prior1, mask_outside, causal, scale, dropout_p, seed, true, held);
  const auto dt = q_in.scalar_type();
  const at::TensorOptions opts = q_in.options();
  at::Tensor out = at::empty({p.B, p.Hq, p.Lq, p.Dv}, opts);
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, opts.dtype(at::kFloat));
  if (p.B * p.Hq * p.Lq == 0) return {out, lse};
  TORCH_CHECK(p.B * p.Hq <= 0x7fffffff, kOp, ": B * Hq = ", p.B * p.Hq, " exceeds the grid's x limit");
  TORCH_CHECK(cdiv(p.Lq, 64) <= 65535, kOp, ": Lq = ", p.Lq, " exceeds the grid's y limit (65535 blocks of 64)");
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const int dtype = dt == at::kFloat ? kF32 : dt == at::kHalf ? kF16 : kBF16;
  C10_CUDA_CHECK(launch_attention_fwd(p, dtype, c10::cuda::getCurrentCUDAStream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

}  // namespace
}  // namespace rapkern::cuda

TORCH_LIBRARY_IMPL(rapkern, CUDA, m) { m.impl("attention_fwd", &rapkern::cuda::attention_fwd_cuda); }
