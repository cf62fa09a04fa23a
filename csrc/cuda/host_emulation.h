// A host-only emulation of the few CUDA features the kernels of csrc/cuda use, so that a kernel's own code can
// run on a CPU in tests (tests/test_cuda_ext.py and tests/test_cuda_fwd_tc.py, "emulated"): each CTA runs as
// `threads` std::threads (one per CUDA thread), __syncthreads is a barrier over the CTA, __syncwarp one over a
// warp of 32, __shfl_xor_sync exchanges values through per-CTA slots between two warp barriers, __shared__
// variables are function statics (CTAs run one after another). The warp-collective mma.sync and ldmatrix of
// csrc/cuda/mma.h are emulated there on top of `Cta::words` (kWords 32-bit registers per thread) and
// `Cta::addrs` (one address per thread), published between two warp barriers. Semantics only, not timing; and it
// cannot find what only a GPU shows (memory races the barriers hide, bank conflicts, ptxas bugs, the hardware's
// mma rounding): compute-sanitizer on a GPU still has to.
//
// Include it before the kernel header, in a translation unit compiled by the host compiler (C++20).
#pragma once

#if defined(__CUDACC__)
#error "host_emulation.h is for host compilers only"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)
#define RAPKERN_HOST_EMULATION 1

namespace rapkern::cuda::emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

struct Cta {
  static constexpr int kWords = 8;  // 32-bit slots per thread for warp-collective ops (mma.h: 4 A + 2 B registers)
  explicit Cta(int threads)
      : all(threads), slots(threads), words(static_cast<size_t>(threads) * kWords), addrs(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> slots;
  std::vector<uint32_t> words;
  std::vector<const void*> addrs;  // one address per thread for warp-collective loads (mma.h ldmatrix)
};

inline thread_local Dim thread_idx, block_idx;
inline Cta* current = nullptr;

// Runs kernel(args...) over grid (x, y) with `threads` threads per CTA (a multiple of 32), one CTA at a time.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, Dim grid, int threads, const Args&... args) {
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Cta cta(threads);
      current = &cta;
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          thread_idx = Dim{static_cast<unsigned>(t), 0, 0};
          block_idx = Dim{bx, by, 0};
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
      current = nullptr;
    }
  }
}

}  // namespace rapkern::cuda::emu

#define threadIdx (::rapkern::cuda::emu::thread_idx)
#define blockIdx (::rapkern::cuda::emu::block_idx)

inline void __syncthreads() { ::rapkern::cuda::emu::current->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  ::rapkern::cuda::emu::current->warps[threadIdx.x / 32]->arrive_and_wait();
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto* cta = ::rapkern::cuda::emu::current;
  const unsigned t = threadIdx.x;
  cta->slots[t] = v;
  __syncwarp();
  const float other = cta->slots[t ^ static_cast<unsigned>(lane_mask)];
  __syncwarp();
  return other;
}
