// CUDA backward of rapkern::route_bwd (lda_route, issue 15): route_bwd_kernel.cuh's row and cluster kernels.
// UNVERIFIED ON A GPU (as route_fwd.cu): checked on a CPU by compiling without spills and by running the kernels'
// code under the host emulation against the float64 reference's autograd (tests/test_cuda_routing.py).
#include <cuda_runtime.h>

#include "cuda/dtype_dispatch.h"
#include "cuda/route_bwd_kernel.cuh"
#include "cuda/route_params.h"

namespace rapkern::cuda {

cudaError_t launch_route_bwd(const RouteBwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 rows(static_cast<unsigned>(p.f.G * ((p.f.N + kRouteRows - 1) / kRouteRows)));
    const dim3 clusters(static_cast<unsigned>(p.f.G * ((p.f.n + kRouteRows - 1) / kRouteRows)));
    route::route_bwd_rows_kernel<T><<<rows, kRouteRows * 32, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    route::route_bwd_clusters_kernel<T><<<clusters, kRouteRows * 32, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace rapkern::cuda
