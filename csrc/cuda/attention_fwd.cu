// CUDA forward of rapkern::attention_fwd (issue 15): a tensor-core kernel for fp16/bf16 and a tiled SIMT kernel
// for fp32, correctness first.
//
// UNVERIFIED ON A GPU: no GPU run has executed these kernels yet (no device in the sessions that wrote them).
// What is checked on a CPU: the module compiles and links for sm_80 and sm_90a with no spills and static shared
// memory <= 48 KB (cuobjdump), the index arithmetic (index.h) is unit-tested on the host, and both kernels' own
// code runs under a host emulation of CUDA threads, barriers, shuffles and the warp-collective mma.sync / ldmatrix
// (host_emulation.h, mma.h) against the float64 reference (tests/test_cuda_ext.py, tests/test_cuda_fwd_tc.py).
// Memory races, real warp scheduling, the compiled SASS and the hardware's mma are only checked by the
// @pytest.mark.gpu tests and compute-sanitizer on a GPU; run those before trusting it.
//
// Dispatch: fp16 / bf16 (D = Dv in {64, 128}) -> attention_fwd_tc_kernel; fp32 -> attention_fwd_kernel.
// RAPKERN_CUDA_FWD_SIMT=1 in the environment (read at each launch) sends fp16/bf16 to the SIMT kernel too: a
// diagnostic for the unverified tensor-core path (the GPU tests compare both on the device).
//
// Tensor-core kernel (attention_fwd_tc_kernel.cuh, FlashAttention-2 style): one CTA of 4 warps (128 threads) per
// (b·Hq + h, block of BM = 64 query rows); warp w owns rows 16w..16w+15. The Q block's A fragments stay in
// registers; per key tile of BN = 64 keys, K and V are staged in shared memory (input dtype, rows padded by 8
// elements: 2 x 64 x 136 x 2 B = 34 KB static at D = 128), S = Q·Kᵀ by mma.sync m16n8k16 (fp32 accumulators;
// K's B fragments by ldmatrix.x4, V's by ldmatrix.x4.trans), scale / prior / masks / online softmax (base 2) on
// the accumulator fragments (a row lives in one quad of lanes), P rounded to the input dtype becomes the A
// operand of O += P·V (FA2: the C layout of S is the A layout of P). Global loads are plain (16-byte vectors
// when rows are aligned), not cp.async, and not double-buffered: the next speed-ups once a GPU has checked it.
//
// SIMT kernel (attention_fwd_kernel.cuh): one CTA of 256 threads per (b·Hq + h, block of BM = 64 query rows).
// Thread t owns query row r = t / 4 of the block and the head-dim columns d = (t % 4) + 4m (m < D/4) of that
// row: it holds the row's q slice and the output accumulator slice in registers. Per key tile of BN = 32 keys: K
// and V tiles are staged in shared memory in the input dtype (BN x D each: <= 32 KB for fp32 at D = 128,
// static), each thread computes the partial dot products of its slice with the 32 keys, the four threads of a
// row sum them with warp shuffles into a shared score tile, each finishes 8 of its row's entries (scale, prior,
// masks), then all four update the online softmax (running max m, sum l) and their output slices with the V
// tile.
//
// Both: fp32 accumulation; out = acc / l in the input dtype, lse = m + log(l) (float32), and a row with no
// visible key gives out 0, lse -inf. Block skipping: key tiles outside key_block_range (causal prefix, masked
// band; index.h, equal to the CPU kernels' rule) are never loaded. Dropout: element (b, h, i, j) is dropped iff
// dropout_uniform(seed, dropout_index(...)) < p (the CPU kernels' hash and counter), kept ones scaled by
// 1/(1-p) in the output accumulator only (l sums the undropped probabilities: dropout acts after the softmax).
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda/attention_fwd_kernel.cuh"
#include "cuda/attention_fwd_tc_kernel.cuh"
#include "cuda/dtype_dispatch.h"
#include "cuda/fwd_params.h"

namespace rapkern::cuda {
namespace {

using fwd::attention_fwd_kernel;
using fwd::BM;
using fwd::NT;

bool simt_forced() {
  const char* v = std::getenv("RAPKERN_CUDA_FWD_SIMT");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

template <typename T>
cudaError_t launch_tc(const FwdParams& p, cudaStream_t stream) {
  using fwd_tc::attention_fwd_tc_kernel;
  const dim3 grid(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>(cdiv(p.Lq, fwd_tc::BM)));
  if (p.D == 64) {
    attention_fwd_tc_kernel<T, 64><<<grid, fwd_tc::NT, 0, stream>>>(p);
  } else if (p.D == 128) {
    attention_fwd_tc_kernel<T, 128><<<grid, fwd_tc::NT, 0, stream>>>(p);
  } else {
    return cudaErrorInvalidValue;  // the host checked fwd_head_dim_supported
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const FwdParams& p, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (!simt_forced()) return launch_tc<T>(p, stream);
  }
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
  return with_dtype(dtype, [&](auto zero) { return launch_typed<decltype(zero)>(p, stream); });
}

}  // namespace rapkern::cuda
