// Warp-level tensor-core product mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (sm_80+),
// ldmatrix, and the helpers that fill the fragments, written once for every kernel that uses them
// (attention_fwd_tc_kernel.cuh, and the layout probe of tests/test_cuda_fwd_tc.py).
//
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type". With
// g = lane >> 2 (groupID) and t = lane % 4 (threadID_in_group):
//   A (16 x 16, row): 4 registers of two 16-bit elements (low half first), elements a0..a7:
//       row = g for a0, a1, a4, a5, g + 8 otherwise; col = 2t + (i & 1) (+ 8 for i >= 4).
//       So register r holds (row g + 8·(r & 1), cols 2t, 2t + 1 (+ 8 when r >= 2)).
//   B (16 x 8, col): 2 registers, elements b0..b3: row (k) = 2t + (i & 1) (+ 8 for i >= 2), col (n) = g.
//   C / D (16 x 8, f32): 4 floats c0..c3: row = g (c0, c1) or g + 8 (c2, c3), col = 2t + (i & 1).
// The C layout of two adjacent 16 x 8 tiles (keys 0-7 and 8-15) is the A layout of their 16 x 16 union, which
// is how a softmax P computed in accumulators becomes the A operand of the next product (FlashAttention-2).
//
// Under nvcc for the device: inline PTX. Under csrc/cuda/host_emulation.h (host compiler): a transcription of
// the instruction's semantics from the PTX layout formulas above, independent of the fill helpers: each lane
// publishes its A and B registers, a warp barrier, each lane rebuilds the full A (16 x 16) and B (16 x 8) from
// all 32 lanes' registers and computes its own four D elements as C + sum_k A[row][k]·B[k][col] (products of the
// exact 16-bit values in fp32, summed in k order; the hardware's order within a k-step is unspecified), another
// barrier. tests/test_cuda_fwd_tc.py checks helpers + emulation against torch matmul.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rapkern::cuda {
namespace mma {

// 16-bit bit patterns of the two input types, host and device.
__device__ __forceinline__ uint32_t bits(__half x) { return static_cast<__half_raw>(x).x; }
__device__ __forceinline__ uint32_t bits(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }

// One .f16x2 / .bf16x2 register: `lo` is the element with the smaller index.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return bits(lo) | (bits(hi) << 16);
}

template <typename T>
__device__ __forceinline__ T round_to(float x);
template <>
__device__ __forceinline__ __half round_to<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 round_to<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ int group_of(int lane) { return lane >> 2; }
__device__ __forceinline__ int thread_in_group(int lane) { return lane & 3; }

// Row / column (within the 16 x 8 tile) of accumulator element c[e], e < 4, held by `lane`.
__device__ __forceinline__ int c_row(int lane, int e) { return group_of(lane) + ((e >> 1) << 3); }
__device__ __forceinline__ int c_col(int lane, int e) { return 2 * thread_in_group(lane) + (e & 1); }

// A fragment of the 16 x 16 tile at `base` (row-major, leading dimension ld elements).
template <typename T>
__device__ __forceinline__ void a_from_row_major(uint32_t a[4], const T* base, int ld, int lane) {
  const int g = group_of(lane), c = 2 * thread_in_group(lane);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const T* p = base + (g + 8 * (r & 1)) * ld + c + 8 * (r >> 1);
    a[r] = pack2<T>(p[0], p[1]);
  }
}

// B fragment (k x n = 16 x 8) of a tile stored n-major: element (k, n) at base[n * ld + k] (K of Q·Kᵀ: keys are
// n, the head dim is k, rows of K contiguous in the head dim).
template <typename T>
__device__ __forceinline__ void b_from_n_major(uint32_t b[2], const T* base, int ld, int lane) {
  const T* p = base + group_of(lane) * ld + 2 * thread_in_group(lane);
  b[0] = pack2<T>(p[0], p[1]);
  b[1] = pack2<T>(p[8], p[9]);
}

// B fragment (16 x 8) of a tile stored k-major: element (k, n) at base[k * ld + n] (V of P·V: keys are k).
template <typename T>
__device__ __forceinline__ void b_from_k_major(uint32_t b[2], const T* base, int ld, int lane) {
  const int k = 2 * thread_in_group(lane);
  const T* p = base + k * ld + group_of(lane);
  b[0] = pack2<T>(p[0], p[ld]);
  b[1] = pack2<T>(p[8 * ld], p[9 * ld]);
}

// A fragment (16 x 16) from two accumulator tiles: `lo` holds columns 0-7, `hi` columns 8-15; rounded to T.
template <typename T>
__device__ __forceinline__ void a_from_accumulators(uint32_t a[4], const float lo[4], const float hi[4]) {
  a[0] = pack2<T>(round_to<T>(lo[0]), round_to<T>(lo[1]));
  a[1] = pack2<T>(round_to<T>(lo[2]), round_to<T>(lo[3]));
  a[2] = pack2<T>(round_to<T>(hi[0]), round_to<T>(hi[1]));
  a[3] = pack2<T>(round_to<T>(hi[2]), round_to<T>(hi[3]));
}

#if !defined(__CUDACC__) && defined(RAPKERN_HOST_EMULATION)
namespace emu_detail {
inline float value(uint32_t reg, int half, __half) {
  __half_raw r;
  r.x = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xffffu);
  return __half2float(__half(r));
}
inline float value(uint32_t reg, int half, __nv_bfloat16) {
  const uint32_t u = (half ? reg >> 16 : reg & 0xffffu) << 16;  // bf16 is the top half of a float32
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
}  // namespace emu_detail
#endif

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA, "Warp-level matrix load instruction: ldmatrix"):
// four 8 x 8 matrices of 16-bit elements from shared memory; lane l supplies the address of row l % 8 of matrix
// l / 8 (16-byte aligned). Register m of lane l receives, of matrix m, without .trans the pair (row l / 4,
// cols 2(l % 4), 2(l % 4) + 1), with .trans the pair (rows 2(l % 4), 2(l % 4) + 1, col l / 4) (low half first).
// Warp-collective. Under the emulation: each lane publishes its address, a warp barrier, each lane reads its
// elements through the addresses of the lanes that own its rows, another barrier.
template <bool Trans>
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const void* row_addr) {
#if defined(__CUDA_ARCH__)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_addr));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  }
#elif !defined(__CUDACC__) && defined(RAPKERN_HOST_EMULATION)
  auto* cta = ::rapkern::cuda::emu::current;
  const unsigned t = threadIdx.x, lane = t & 31u, warp0 = t - lane;
  cta->addrs[t] = row_addr;
  __syncwarp();
  auto at = [&](unsigned row_lane, unsigned col) {  // element `col` of the row whose address lane row_lane gave
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(cta->addrs[warp0 + row_lane]) + 2 * col, sizeof v);
    return static_cast<uint32_t>(v);
  };
  for (unsigned m = 0; m < 4; ++m) {
    if constexpr (Trans) {
      const unsigned row = 2 * (lane % 4), col = lane / 4;
      r[m] = at(8 * m + row, col) | (at(8 * m + row + 1, col) << 16);
    } else {
      const unsigned row = lane / 4, col = 2 * (lane % 4);
      r[m] = at(8 * m + row, col) | (at(8 * m + row, col + 1) << 16);
    }
  }
  __syncwarp();
#endif
}

// B fragments of two consecutive k-steps, n-major tile (as b_from_n_major) at base (k-steps at base and base + 16),
// by one ldmatrix.x4: matrices = (k 0-7, k 8-15) of the first step, then of the second. Rows 16-byte aligned.
template <typename T>
__device__ __forceinline__ void b2_from_n_major_ldsm(uint32_t b0[2], uint32_t b1[2], const T* base, int ld,
                                                     int lane) {
  uint32_t r[4];
  ldsm_x4<false>(r, base + (lane & 7) * ld + 8 * (lane >> 3));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// B fragments of two consecutive n-tiles, k-major tile (as b_from_k_major) at base (n-tiles at base and
// base + 8), by one ldmatrix.x4.trans: matrices = (k 0-7, k 8-15) of the first n-tile, then of the second.
template <typename T>
__device__ __forceinline__ void b2_from_k_major_ldsm(uint32_t b0[2], uint32_t b1[2], const T* base, int ld,
                                                     int lane) {
  uint32_t r[4];
  ldsm_x4<true>(r, base + (8 * ((lane >> 3) & 1) + (lane & 7)) * ld + 8 * (lane >> 4));
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// d += A·B for one m16n8k16 step (T = __half or __nv_bfloat16, fp32 accumulation). Warp-collective: all 32 lanes
// of the warp must call it together (same as the instruction).
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816: f16 or bf16");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif !defined(__CUDACC__) && defined(RAPKERN_HOST_EMULATION)
  auto* cta = ::rapkern::cuda::emu::current;
  constexpr int W = ::rapkern::cuda::emu::Cta::kWords;
  const unsigned t = threadIdx.x, lane = t & 31u, warp0 = t - lane;
  uint32_t* words = cta->words.data();
  for (int r = 0; r < 4; ++r) words[t * W + r] = a[r];
  for (int r = 0; r < 2; ++r) words[t * W + 4 + r] = b[r];
  __syncwarp();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {  // the PTX formulas, element by element, low half first
    const int gid = l >> 2, tig = l % 4;
    const uint32_t* w = words + (warp0 + l) * W;
    for (int i = 0; i < 8; ++i) {
      const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = emu_detail::value(w[i / 2], i % 2, T{});
    }
    for (int i = 0; i < 4; ++i) {
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][gid] = emu_detail::value(w[4 + i / 2], i % 2, T{});
    }
  }
  const int gid = static_cast<int>(lane) >> 2, tig = static_cast<int>(lane) % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? gid : gid + 8, col = tig * 2 + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[i] += acc;
  }
  __syncwarp();
#endif
}

}  // namespace mma
}  // namespace rapkern::cuda
