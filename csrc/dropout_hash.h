// The dropout RNG shared by the CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/): a counter-based hash,
// so the same seed drops the same elements on every device and the backward regenerates the forward's mask.
// Element (b, h, i, j) has counter ((b·Hq + h)·Lq + i)·Lk + j and is kept iff dropout_uniform(seed, counter) >= p.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RAPKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RAPKERN_HOST_DEVICE inline
#endif

namespace rapkern {

RAPKERN_HOST_DEVICE uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The idx-th output of splitmix64 seeded with `seed`, as a float in [0, 1) with 24 random bits.
RAPKERN_HOST_DEVICE float dropout_uniform(uint64_t seed, uint64_t idx) {
  const uint64_t z = splitmix64(seed + (idx + 1) * 0x9E3779B97F4A7C15ULL);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

}  // namespace rapkern
