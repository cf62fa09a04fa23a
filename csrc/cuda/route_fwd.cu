// CUDA forward of rapkern::route_fwd (lda_route, issue 15): dense and top-k, one warp per query row
// (route_fwd_kernel.cuh says how). SIMT and simple: correctness first.
//
// UNVERIFIED ON A GPU: no GPU run has executed these kernels yet. Checked on a CPU: they compile for sm_80 and
// sm_90a with no spills (tests/test_cuda_ext.py's resource check covers every kernel of the module), and their
// own code runs under the host emulation against reference_lda_route (tests/test_cuda_routing.py).
#include <cuda_runtime.h>

#include "cuda/fwd_params.h"
#include "cuda/route_fwd_kernel.cuh"
#include "cuda/route_params.h"

namespace rapkern::cuda {
namespace {

template <typename T>
cudaError_t launch_typed(const RouteParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.G * ((p.N + kRouteRows - 1) / kRouteRows)));
  if (p.top_k == 0) {
    route::route_dense_kernel<T><<<grid, kRouteRows * 32, 0, stream>>>(p);
  } else {
    route::route_topk_kernel<T><<<grid, kRouteRows * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_route_fwd(const RouteParams& p, int dtype, cudaStream_t stream) {
  switch (dtype) {
    case kF32:
      return launch_typed<float>(p, stream);
    case kF16:
      return launch_typed<__half>(p, stream);
    case kBF16:
      return launch_typed<__nv_bfloat16>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace rapkern::cuda
