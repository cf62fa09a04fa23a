// The kernels' element types by the DType code of fwd_params.h: with_dtype(dtype, f) calls f(T{}) for T in
// {float, __half, __nv_bfloat16}, so a launcher instantiates its kernels once per dtype in one place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "cuda/fwd_params.h"

namespace rapkern::cuda {

template <typename F>
cudaError_t with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32:
      return f(float{});
    case kF16:
      return f(__half{});
    case kBF16:
      return f(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rapkern::cuda
