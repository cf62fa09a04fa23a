// CUDA forward of rapkern::route_fwd (lda_route, issue 15): dense and top-k, one warp per query row
// (route_fwd_kernel.cuh says how). SIMT and simple: correctness first.
//
// UNVERIFIED ON A GPU: no GPU run has executed these kernels yet. Checked on a CPU: they compile for sm_80 and
// sm_90a with no spills (tests/test_cuda_ext.py's resource check covers every kernel of the module), and their
// own code runs under the host emulation against reference_lda_route (tests/test_cuda_routing.py).
#include <cuda_runtime.h>

#include "cuda/dtype_dispatch.h"
#include "cuda/route_fwd_kernel.cuh"
#include "cuda/route_params.h"

namespace rapkern::cuda {

cudaError_t launch_route_fwd(const RouteParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(p.G * ((p.N + kRouteRows - 1) / kRouteRows)));
    if (p.top_k == 0) {
      route::route_dense_kernel<T><<<grid, kRouteRows * 32, 0, stream>>>(p);
    } else {
      route::route_topk_kernel<T><<<grid, kRouteRows * 32, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace rapkern::cuda
