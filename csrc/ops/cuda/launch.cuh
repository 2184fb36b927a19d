#pragma once
// Launch sizing and block-wide scans shared by the CUDA kernels.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace graspext::ops {

constexpr int kThreadsPerBlock = 256;

// Blocks for a grid-stride loop over n elements: enough to fill every SM several times over, no more.
inline int grid_size(int64_t n, int threads) {
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t max_blocks = static_cast<int64_t>(sm_count) * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, max_blocks)));
}

// Exclusive prefix sum of one value per thread over the block (kThreads a multiple of 32, at most 1024);
// `scratch` holds kThreads / 32 values in shared memory, `total` (optional) receives the block's sum. Every
// thread of the block must call it.
template <int kThreads, typename T>
__device__ T block_exclusive_sum(T value, T* scratch, T* total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "kThreads must be a multiple of 32, at most 1024");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  T inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const T up = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    constexpr int kWarps = kThreads / 32;
    T w = lane < kWarps ? scratch[lane] : T(0);
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
      const T up = __shfl_up_sync(0xffffffffu, w, offset);
      if (lane >= offset) w += up;
    }
    if (lane < kWarps) scratch[lane] = w;  // inclusive sums over warps
  }
  __syncthreads();
  const T warp_before = warp > 0 ? scratch[warp - 1] : T(0);
  if (total) *total = scratch[kThreads / 32 - 1];
  __syncthreads();  // scratch may be reused by the caller's next scan
  return warp_before + inclusive - value;
}

}  // namespace graspext::ops
