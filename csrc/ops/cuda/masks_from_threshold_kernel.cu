// CUDA exact-count masks from a threshold, with the CPU kernel's semantics: everything strictly beyond the
// threshold is removed, then ties in global order (tensor by tensor, index by index) until exactly
// num_remove are. Each block owns a fixed chunk of one tensor: pass 1 counts per chunk, a device-side scan
// of the tie counts gives every chunk its share of ties, pass 2 ranks the ties inside the chunk with a block
// scan and writes the mask. One host synchronisation reads the totals, to raise the CPU's errors.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/cuda/launch.cuh"

namespace graspext::ops {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 16;
constexpr int64_t kChunk = kThreads * kPerThread;  // elements per block

template <typename scalar_t>
__device__ __forceinline__ bool is_beyond(scalar_t x, scalar_t t, bool remove_largest) {
  return remove_largest ? x > t : x < t;
}

// counts[block] = {beyond, equal, non-finite} over the block's chunk of x.
template <typename scalar_t>
__global__ void count_kernel(const scalar_t* __restrict__ x, int64_t n, const scalar_t* __restrict__ threshold,
                             bool remove_largest, long long* __restrict__ counts) {
  __shared__ long long scratch[kThreads / 32];
  const scalar_t t = *threshold;
  const int64_t begin = blockIdx.x * kChunk;
  long long beyond = 0, equal = 0, nonfinite = 0;
  for (int64_t i = begin + threadIdx.x; i < n && i < begin + kChunk; i += kThreads) {
    const scalar_t v = x[i];
    beyond += is_beyond(v, t, remove_largest);
    equal += v == t;
    nonfinite += !isfinite(v);
  }
  long long total;
  block_exclusive_sum<kThreads>(beyond, scratch, &total);
  if (threadIdx.x == 0) counts[blockIdx.x * 3] = total;
  block_exclusive_sum<kThreads>(equal, scratch, &total);
  if (threadIdx.x == 0) counts[blockIdx.x * 3 + 1] = total;
  block_exclusive_sum<kThreads>(nonfinite, scratch, &total);
  if (threadIdx.x == 0) counts[blockIdx.x * 3 + 2] = total;
}

// Writes the block's chunk of the mask. ties_before[block]: ties in all earlier chunks (global order);
// the chunk removes its first max(0, min(ties_to_remove - ties_before, its ties)) ties.
template <typename scalar_t>
__global__ void write_kernel(const scalar_t* __restrict__ x, int64_t n, const scalar_t* __restrict__ threshold,
                             bool remove_largest, long long ties_to_remove, const long long* __restrict__ ties_before,
                             bool* __restrict__ mask, unsigned long long* __restrict__ kept_count) {
  __shared__ long long scratch[kThreads / 32];
  const scalar_t t = *threshold;
  const int64_t begin = blockIdx.x * kChunk + static_cast<int64_t>(threadIdx.x) * kPerThread;
  const int64_t end = min(begin + kPerThread, n);
  long long my_ties = 0;
  for (int64_t i = begin; i < end; ++i) my_ties += x[i] == t;
  const long long rank = block_exclusive_sum<kThreads>(my_ties, scratch, static_cast<long long*>(nullptr));
  const long long remove_here = max(0ll, ties_to_remove - ties_before[blockIdx.x]);
  long long tie = rank, kept = 0;
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t v = x[i];
    bool keep = !is_beyond(v, t, remove_largest);
    if (keep && v == t) keep = tie++ >= remove_here;
    mask[i] = keep;
    kept += keep;
  }
  long long block_kept;
  block_exclusive_sum<kThreads>(kept, scratch, &block_kept);
  if (threadIdx.x == 0 && block_kept) atomicAdd(kept_count, static_cast<unsigned long long>(block_kept));
}

std::tuple<std::vector<at::Tensor>, at::Tensor> masks_from_threshold_cuda(at::TensorList scores_in,
                                                                         const at::Tensor& threshold,
                                                                         int64_t num_remove, bool remove_largest) {
  const auto dtype = check_masks_from_threshold_args(scores_in, threshold, num_remove);
  const c10::cuda::CUDAGuard guard(scores_in[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> scores;
  std::vector<int64_t> first_block{0};  // chunk index where each tensor starts
  for (const auto& s : scores_in) {
    scores.push_back(s.contiguous());
    first_block.push_back(first_block.back() + (s.numel() + kChunk - 1) / kChunk);
  }
  const auto options = scores_in[0].options();
  const auto long_options = options.dtype(at::kLong);
  const int64_t blocks = first_block.back();
  auto counts = at::zeros({std::max<int64_t>(blocks, 1), 3}, long_options);
  auto kept_counts = at::zeros({static_cast<int64_t>(scores.size())}, long_options);
  std::vector<at::Tensor> masks;
  for (const auto& s : scores) masks.push_back(at::empty(s.sizes(), options.dtype(at::kBool)));

  AT_DISPATCH_FLOATING_TYPES(dtype, "masks_from_threshold_cuda", [&] {
    const auto t = threshold.to(dtype).reshape({});
    const scalar_t* t_ptr = t.const_data_ptr<scalar_t>();
    auto* c = reinterpret_cast<long long*>(counts.data_ptr<int64_t>());
    for (size_t i = 0; i < scores.size(); ++i) {
      const int64_t numel = scores[i].numel();
      const int64_t b = first_block[i + 1] - first_block[i];
      if (b == 0) continue;
      count_kernel<scalar_t><<<static_cast<unsigned>(b), kThreads, 0, stream>>>(
          scores[i].const_data_ptr<scalar_t>(), numel, t_ptr, remove_largest, c + first_block[i] * 3);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // Totals and whether the threshold is finite, in one copy to the host.
    const auto summary =
        at::cat({counts.sum(0), at::logical_not(at::isfinite(t)).to(at::kLong).view({1})}).cpu();
    const auto* s = summary.const_data_ptr<int64_t>();
    const int64_t total_beyond = s[0], total_equal = s[1], total_nonfinite = s[2];
    TORCH_CHECK(s[3] == 0, "threshold must be finite, got ", t.item<scalar_t>());
    if (total_nonfinite > 0) {
      for (size_t i = 0; i < scores.size(); ++i) {
        TORCH_CHECK(at::isfinite(scores[i]).all().item<bool>(), "scores[", i,
                    "] contains NaN or Inf values; scores must be finite to be ranked");
      }
    }
    TORCH_CHECK(total_beyond <= num_remove && num_remove <= total_beyond + total_equal, "threshold ",
                t.item<scalar_t>(), " cannot remove exactly num_remove=", num_remove, " scores: ", total_beyond,
                " lie strictly ", remove_largest ? "above" : "below", " it and ", total_equal,
                " equal it (use global_kth_value to choose the threshold)");
    const auto equal = counts.select(1, 1);
    const auto ties_before = at::sub(equal.cumsum(0), equal).contiguous();  // exclusive scan
    const auto* tb = reinterpret_cast<const long long*>(ties_before.const_data_ptr<int64_t>());
    auto* kept = reinterpret_cast<unsigned long long*>(kept_counts.data_ptr<int64_t>());
    for (size_t i = 0; i < scores.size(); ++i) {
      const int64_t numel = scores[i].numel();
      const int64_t b = first_block[i + 1] - first_block[i];
      if (b == 0) continue;
      write_kernel<scalar_t><<<static_cast<unsigned>(b), kThreads, 0, stream>>>(
          scores[i].const_data_ptr<scalar_t>(), numel, t_ptr, remove_largest, num_remove - total_beyond,
          tb + first_block[i], masks[i].data_ptr<bool>(), kept + i);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {masks, kept_counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("masks_from_threshold", &masks_from_threshold_cuda);
}

}  // namespace graspext::ops
