// CUDA backward of rapkern::attention_bwd (issue 15): tiled SIMT kernels like the forward, correctness first.
//
// UNVERIFIED ON A GPU: no GPU run has executed these kernels yet. On a CPU they compile for sm_80/sm_90a without
// spills and within 48 KB of static shared memory (cuobjdump, tests/test_cuda_ext.py), their index arithmetic is
// unit-tested (tests/test_cuda_index.py) and the kernels' own code (attention_bwd_kernel.cuh) runs under the host
// emulation (host_emulation.h) against the float64 reference (tests/test_cuda_bwd.py).
//
// FlashAttention-2's split (as the Triton backend): a dk/dv kernel per (b, kv head, block of 64 keys) looping over
// the GQA group and the query rows that can see the block, a dq kernel per (b, q head, block of 64 queries, 32 at
// head dim 128: bwd_q_rows) looping over the visible key tiles; both recompute the logits with the forward's code.
// Prior gradients:
//   band / dense / low-rank u rows: written by the dq kernel when each prior slab belongs to one (b, h) pair,
//     else by a second launch of it per (bp, hp) slab that visits the slab's pairs in a fixed order;
//   low-rank v rows: likewise by the dk/dv kernel;
//   lag table and dalpha: per (b, h, query block) partials written by the dq kernel, then reduced in a fixed
//     order (index.h partial_term_slot) by a one-thread-per-output kernel, alpha applied per term.
// No float atomics anywhere; every output element has one writer, so results are bitwise reproducible.
// delta = rowsum(dO ∘ O) - dlse and the +inf lse of rows without keys are prepared on the host (bwd_problem.h).
#include <cuda_runtime.h>

#include "cuda/attention_bwd_kernel.cuh"
#include "cuda/bwd_params.h"
#include "cuda/dtype_dispatch.h"

namespace rapkern::cuda {
namespace {

template <typename T, int D>
void launch_pass(const BwdParams& p, const BwdPass& s, dim3 grid, cudaStream_t stream) {
  if (s.kernel == kQ) {
    bwd::attention_bwd_q_kernel<T, D><<<grid, bwd::NT, 0, stream>>>(p, s);
  } else if (s.kernel == kKV) {
    bwd::attention_bwd_kv_kernel<T, D><<<grid, bwd::NT, 0, stream>>>(p, s);
  } else {
    bwd::attention_bwd_reduce_kernel<<<grid, bwd::NT, 0, stream>>>(p, s);
  }
}

template <typename T>
cudaError_t launch_typed(const BwdParams& p, cudaStream_t stream) {
  BwdPass passes[kMaxBwdPasses];
  const int n = bwd_passes(p, passes);
  for (int k = 0; k < n; ++k) {
    unsigned gx = 0, gy = 0;
    bwd_grid(p, passes[k], &gx, &gy);
    if (gx == 0 || gy == 0) continue;
    const dim3 grid(gx, gy);
    if (p.f.D == 64) {
      launch_pass<T, 64>(p, passes[k], grid, stream);
    } else if (p.f.D == 128) {
      launch_pass<T, 128>(p, passes[k], grid, stream);
    } else {
      return cudaErrorInvalidValue;  // the host checked fwd_head_dim_supported
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_attention_bwd(const BwdParams& p, int dtype, cudaStream_t stream) {
  return with_dtype(dtype, [&](auto zero) { return launch_typed<decltype(zero)>(p, stream); });
}

}  // namespace rapkern::cuda
