// CUDA forward of rapkern::attention_fwd (issue 15): a simple tiled SIMT kernel, correctness first.
//
// UNVERIFIED ON A GPU: no GPU run has executed these kernels yet (no device in the session that wrote them).
// What is checked on a CPU: the module compiles and links for sm_80 and sm_90a with no spills and static shared
// memory <= 48 KB (cuobjdump), the index arithmetic (index.h) is unit-tested on the host, and the kernel's own
// code (attention_fwd_kernel.cuh) runs under a host emulation of CUDA threads, barriers and shuffles
// (host_emulation.h) against the float64 reference (tests/test_cuda_ext.py). Memory races, real warp
// scheduling and the compiled SASS are only checked by the @pytest.mark.gpu tests and compute-sanitizer on a
// GPU; run those before trusting it.
//
// Work decomposition: one CTA of 256 threads per (b·Hq + h, block of BM = 64 query rows). Thread t owns query row
// r = t / 4 of the block and the head-dim columns d = (t % 4) + 4m (m < D/4) of that row: it holds the row's q
// slice and the output accumulator slice in registers. Per key tile of BN = 32 keys: K and V tiles are staged in
// shared memory in the input dtype (BN x D each: <= 32 KB for fp32 at D = 128, static), each thread computes the
// partial dot products of its slice with the 32 keys, the four threads of a row sum them with warp shuffles into
// a shared score tile, each finishes 8 of its row's entries (scale, prior, masks), then all four update the
// online softmax (running max m, sum l) and their output slices with the V tile.
// fp32 accumulation throughout; out = acc / l in the input dtype, lse = m + log(l) (float32), and a row with no
// visible key gives out 0, lse -inf.
//
// Block skipping: key tiles outside key_block_range (causal prefix, masked band; index.h, equal to the CPU
// kernels' rule) are never loaded. Dropout: element (b, h, i, j) is dropped iff dropout_uniform(seed,
// dropout_index(...)) < p (the CPU kernels' hash and counter), kept ones scaled by 1/(1-p) in the output
// accumulator only (l sums the undropped probabilities: dropout acts after the softmax).
//
// Not tensor cores: FlashAttention-2-class speed (mma.sync/CuTe) is future work of issue 15.
#include <cuda_runtime.h>

#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/fwd_params.h"

namespace rapkern::cuda {
namespace {

using fwd::attention_fwd_kernel;
using fwd::BM;
using fwd::NT;

template <typename T>
cudaError_t launch_typed(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>(cdiv(p.Lq, BM)));
  if (p.D == 64) {
    attention_fwd_kernel<T, 64><<<grid, NT, 0, stream>>>(p);
  } else if (p.D == 128) {
    attention_fwd_kernel<T, 128><<<grid, NT, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;  // the host checked fwd_head_dim_supported
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_fwd(const FwdParams& p, int dtype, cudaStream_t stream) {
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
