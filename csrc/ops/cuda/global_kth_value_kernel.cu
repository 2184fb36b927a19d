// CUDA exact k-th smallest value over a list of tensors: the CPU kernel's most-significant-digit radix
// selection (16 key bits per pass, ops/radix_key.h) with the histogram in global memory and the digit choice
// on the device, so the passes run back to back on the current stream without a copy of the scores. One
// host synchronisation at the end reads the count of non-finite scores, to raise the same error as the CPU.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/cuda/launch.cuh"
#include "ops/radix_key.h"

namespace graspext::ops {
namespace {

// Device state carried between passes: the key prefix chosen so far, the rank still to find within the
// elements matching it, and the number of non-finite scores seen in the first pass.
struct SelectState {
  unsigned long long prefix;
  long long rank;
  long long nonfinite;
};

template <typename scalar_t>
__global__ void radix_histogram_kernel(const scalar_t* __restrict__ x, int64_t n, int shift, bool match_prefix,
                                       const SelectState* __restrict__ state,
                                       unsigned long long* __restrict__ hist) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  const int high = shift + kRadixBits;
  const bits_t prefix = static_cast<bits_t>(state->prefix);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const bits_t key = RadixKey<scalar_t>::encode(x[i]);
    // The first pass has no prefix (and `key >> 32` of a 32-bit key would be undefined).
    if (match_prefix && (key >> high) != prefix) continue;
    atomicAdd(&hist[static_cast<uint32_t>(key >> shift) & (kRadixBins - 1)], 1ull);
  }
}

// One block: finds the digit whose bin holds the rank, appends it to the prefix, and clears the histogram
// for the next pass. On the last pass it also writes the decoded value.
template <typename scalar_t, int kThreads>
__global__ void choose_digit_kernel(unsigned long long* __restrict__ hist, SelectState* __restrict__ state,
                                    bool first_pass, bool last_pass, scalar_t* __restrict__ out) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  constexpr int kPerThread = kRadixBins / kThreads;
  __shared__ long long scan_scratch[kThreads / 32];
  __shared__ int chosen_digit;
  __shared__ long long rank_before_digit;
  const int t = threadIdx.x;
  long long local = 0;
  for (int j = 0; j < kPerThread; ++j) local += static_cast<long long>(hist[t * kPerThread + j]);
  long long total = 0;
  const long long before = block_exclusive_sum<kThreads>(local, scan_scratch, &total);
  const long long rank = state->rank;
  if (rank > before && rank <= before + local) {
    long long cum = before;
    int d = t * kPerThread;
    while (rank > cum + static_cast<long long>(hist[d])) cum += static_cast<long long>(hist[d++]);
    chosen_digit = d;
    rank_before_digit = cum;
  }
  if (first_pass) {
    // Bins of keys with an all-ones exponent (NaN, +-Inf) sit at both ends of the first pass's histogram.
    constexpr int side = nonfinite_bins_per_side<scalar_t>();
    long long bad = 0;
    for (int j = t; j < side; j += kThreads) bad += hist[j] + hist[kRadixBins - 1 - j];
    if (bad) atomicAdd(reinterpret_cast<unsigned long long*>(&state->nonfinite), static_cast<unsigned long long>(bad));
  }
  __syncthreads();
  for (int j = t; j < kRadixBins; j += kThreads) hist[j] = 0;
  if (t == 0) {
    const bits_t prefix = (static_cast<bits_t>(state->prefix) << kRadixBits) | static_cast<bits_t>(chosen_digit);
    state->prefix = prefix;
    state->rank = rank - rank_before_digit;
    if (last_pass) *out = RadixKey<scalar_t>::decode(prefix);
  }
}

at::Tensor global_kth_value_cuda(at::TensorList scores_in, int64_t k) {
  const auto dtype = check_score_list(scores_in, "scores");
  const int64_t n = total_numel(scores_in);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, ", n, "] (the total number of scores), got ", k);
  const c10::cuda::CUDAGuard guard(scores_in[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> scores;
  for (const auto& s : scores_in) scores.push_back(s.contiguous());
  const auto options = scores_in[0].options();
  auto hist = at::zeros({kRadixBins}, options.dtype(at::kLong));
  // prefix 0, rank k, no non-finite scores yet
  auto state = at::tensor({int64_t{0}, k, int64_t{0}}, at::TensorOptions().dtype(at::kLong)).to(options.device());
  auto result = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "global_kth_value_cuda", [&] {
    auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    auto* st = reinterpret_cast<SelectState*>(state.data_ptr<int64_t>());
    constexpr int kBits = RadixKey<scalar_t>::kBits;
    for (int shift = kBits - kRadixBits; shift >= 0; shift -= kRadixBits) {
      const bool first_pass = shift == kBits - kRadixBits;
      for (const auto& s : scores) {
        const int64_t numel = s.numel();
        if (numel == 0) continue;
        radix_histogram_kernel<scalar_t><<<grid_size(numel, kThreadsPerBlock), kThreadsPerBlock, 0, stream>>>(
            s.const_data_ptr<scalar_t>(), numel, shift, !first_pass, st, h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      choose_digit_kernel<scalar_t, 1024><<<1, 1024, 0, stream>>>(h, st, first_pass, shift == 0,
                                                                  result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const int64_t nonfinite = state[2].item<int64_t>();  // the one synchronisation
  if (nonfinite > 0) {
    for (size_t i = 0; i < scores.size(); ++i) {
      const int64_t bad = scores[i].numel() - at::isfinite(scores[i]).sum().item<int64_t>();
      TORCH_CHECK(bad == 0, "scores[", i, "] contains ", bad,
                  " NaN or Inf value(s); scores must be finite to be ranked (check the model and data)");
    }
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("global_kth_value", &global_kth_value_cuda);
}

}  // namespace graspext::ops
