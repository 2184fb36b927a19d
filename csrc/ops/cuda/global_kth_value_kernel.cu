// CUDA exact k-th smallest value over a list of tensors: most-significant-digit radix selection on the
// order-preserving keys of ops/radix_key.h, 11 key bits per pass (3 passes for float32, 6 for float64).
//
// A pass is one launch over every tensor of the list (a table of up to kMaxTensors pointers passed by value;
// longer lists take more launches) that counts the digit of every score whose higher digits match the prefix
// chosen so far, in per-block shared-memory histograms merged into a global one; a one-block kernel then picks
// the digit holding the rank on the device, so the passes run back to back on the current stream with no host
// round trip. The first two passes read every score (16-byte loads); the second also stashes the scores that
// match the first digit (a few percent of them for a network's scores) in per-block slices of a buffer of
// n / 8 values, and the later passes read only that stash, unless a block's slice overflowed (e.g. heavy
// ties), in which case they read everything again. One host synchronisation at the end reads the count of
// non-finite scores, to raise the same error as the CPU.

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

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kHistogramThreads = 512;
// Shared-memory copies of the histogram, the warps spread over them: scores cluster in few bins (a normal
// distribution's exponents), so a single copy would serialise the warps' atomics on them.
constexpr int kHistogramCopies = 4;
constexpr int kChooseThreads = 1024;
constexpr int kMaxTensors = 48;
constexpr int64_t kStashFraction = 8;  // the stash holds up to n / kStashFraction scores

// Device state carried between passes: the key prefix chosen so far, the rank still to find among the
// scores matching it, the number of non-finite scores seen in the first pass, and whether the stash overflowed.
struct SelectState {
  unsigned long long prefix;
  long long rank;
  unsigned long long nonfinite;
  unsigned long long stash_overflowed;
};

// Per-block slices of the stash: block b owns values[b * slice, b * slice + count[b]).
template <typename scalar_t>
struct Stash {
  scalar_t* values;
  int* count;
  int64_t slice;
  int num_slices;
};

enum class Pass { kFirst, kSecond, kLater };

struct TensorTable {
  const void* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int count;
};

// Calls fn(value) for every element of x[0, n), with 16-byte loads for the aligned body.
template <typename scalar_t, typename Fn>
__device__ __forceinline__ void for_each_score(const scalar_t* __restrict__ x, int64_t n, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  using vec_t = std::conditional_t<sizeof(scalar_t) == 4, float4, double2>;
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const auto misalignment = (reinterpret_cast<uintptr_t>(x) / sizeof(scalar_t)) % kVec;
  const int64_t head = std::min<int64_t>(n, misalignment ? kVec - static_cast<int64_t>(misalignment) : 0);
  if (tid < head) fn(x[tid]);
  const int64_t body = (n - head) / kVec;
  const auto* v = reinterpret_cast<const vec_t*>(x + head);
  for (int64_t i = tid; i < body; i += stride) {
    const vec_t chunk = v[i];
    const auto* values = reinterpret_cast<const scalar_t*>(&chunk);
#pragma unroll
    for (int j = 0; j < kVec; ++j) fn(values[j]);
  }
  const int64_t tail_begin = head + body * kVec;
  if (tid < n - tail_begin) fn(x[tail_begin + tid]);
}

// Adds to `hist` the digit at key bits [shift, shift + width) of every score whose bits above them equal the
// prefix chosen so far (every score in the first pass, which also counts the non-finite ones; the second pass
// stashes the matching scores; later passes read the stash unless it overflowed).
template <typename scalar_t>
__global__ void __launch_bounds__(kHistogramThreads) radix_histogram_kernel(
    TensorTable table, bool first_table, Stash<scalar_t> stash, Pass pass, int shift, int width,
    SelectState* __restrict__ state, unsigned long long* __restrict__ hist) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  __shared__ unsigned int local[kHistogramCopies][kBins];
  __shared__ unsigned int stashed;
  const bool from_stash = pass == Pass::kLater && !state->stash_overflowed;
  if (from_stash && !first_table) return;  // the stash is read once per pass, by the first table's launch
  for (int j = threadIdx.x; j < kHistogramCopies * kBins; j += blockDim.x) (&local[0][0])[j] = 0;
  // Slices fill across the second pass's launches (one per table): each block continues its own.
  if (threadIdx.x == 0) stashed = pass == Pass::kSecond ? stash.count[blockIdx.x] : 0;
  __syncthreads();
  unsigned int* mine = local[(threadIdx.x / 64) % kHistogramCopies];
  const bits_t prefix = static_cast<bits_t>(state->prefix);
  const int high = shift + width;  // < kBits except in the first pass, where no prefix is compared
  const bits_t digit_mask = (bits_t{1} << width) - 1;
  unsigned int nonfinite = 0;
  const auto count = [&](scalar_t value) {
    const bits_t key = RadixKey<scalar_t>::encode(value);
    if (pass == Pass::kFirst) {
      nonfinite += !isfinite(value);
    } else if ((key >> high) != prefix) {
      return;
    } else if (pass == Pass::kSecond) {
      const unsigned int slot = atomicAdd(&stashed, 1u);
      if (slot < stash.slice) stash.values[blockIdx.x * stash.slice + slot] = value;
    }
    atomicAdd(&mine[static_cast<int>((key >> shift) & digit_mask)], 1u);
  };
  if (from_stash) {
    for (int s = blockIdx.x; s < stash.num_slices; s += gridDim.x) {
      const scalar_t* values = stash.values + s * stash.slice;
      const int n = stash.count[s];
      for (int i = threadIdx.x; i < n; i += blockDim.x) count(values[i]);
    }
  } else {
    for (int t = 0; t < table.count; ++t) {
      for_each_score(static_cast<const scalar_t*>(table.data[t]), table.numel[t], count);
    }
  }
  if (pass == Pass::kFirst) {
    for (int offset = 16; offset > 0; offset >>= 1) nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, offset);
    if ((threadIdx.x & 31) == 0 && nonfinite) atomicAdd(&state->nonfinite, static_cast<unsigned long long>(nonfinite));
  }
  __syncthreads();
  if (pass == Pass::kSecond && threadIdx.x == 0) {
    stash.count[blockIdx.x] = static_cast<int>(min(static_cast<int64_t>(stashed), stash.slice));
    if (stashed > stash.slice) atomicExch(&state->stash_overflowed, 1ull);
  }
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    unsigned long long total = 0;
#pragma unroll
    for (int c = 0; c < kHistogramCopies; ++c) total += local[c][b];
    if (total) atomicAdd(&hist[b], total);
  }
}

// One block: finds the digit whose bin holds the rank, appends it to the prefix, and clears the histogram
// for the next pass. On the last pass it also writes the decoded value.
template <typename scalar_t>
__global__ void __launch_bounds__(kChooseThreads) choose_digit_kernel(
    unsigned long long* __restrict__ hist, SelectState* __restrict__ state, int width, bool last_pass,
    scalar_t* __restrict__ out) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  constexpr int kPerThread = kBins / kChooseThreads;
  __shared__ long long scan_scratch[kChooseThreads / 32];
  __shared__ int chosen_digit;
  __shared__ long long rank_before_digit;
  const int t = threadIdx.x;
  long long counts[kPerThread];
  long long local = 0;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    counts[j] = static_cast<long long>(hist[t * kPerThread + j]);
    local += counts[j];
  }
  const long long before = block_exclusive_sum<kChooseThreads>(local, scan_scratch, static_cast<long long*>(nullptr));
  const long long rank = state->rank;  // 1-based, and always within the matching scores
  if (rank > before && rank <= before + local) {
    long long cum = before;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (rank > cum && rank <= cum + counts[j]) {
        chosen_digit = t * kPerThread + j;
        rank_before_digit = cum;
      }
      cum += counts[j];
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) hist[t * kPerThread + j] = 0;
  if (t == 0) {
    const bits_t prefix = (static_cast<bits_t>(state->prefix) << width) | static_cast<bits_t>(chosen_digit);
    state->prefix = prefix;
    state->rank = rank - rank_before_digit;
    if (last_pass) *out = RadixKey<scalar_t>::decode(prefix);
  }
}

at::Tensor global_kth_value_cuda(at::TensorList scores_in, int64_t k) {
  const auto dtype = check_global_kth_value_args(scores_in, k);
  const int64_t n = total_numel(scores_in);
  const c10::cuda::CUDAGuard guard(scores_in[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  std::vector<at::Tensor> scores;
  for (const auto& s : scores_in) {
    if (s.numel() > 0) scores.push_back(s.contiguous());
  }
  const auto options = scores_in[0].options();
  auto hist = at::zeros({kBins}, options.dtype(at::kLong));
  // prefix 0, rank k, no non-finite scores yet, no overflow
  auto state = at::tensor({int64_t{0}, k, int64_t{0}, int64_t{0}}, at::TensorOptions().dtype(at::kLong))
                   .to(options.device());
  auto result = at::empty({}, options);
  // Enough resident blocks to keep every SM's loads in flight; each strides over every tensor of its table.
  const int blocks = grid_size(n, kHistogramThreads * 16 / static_cast<int>(scores_in[0].element_size()));
  const int64_t slice = std::max<int64_t>(64, (n / kStashFraction + blocks - 1) / blocks);
  auto stash_values = at::empty({blocks * slice}, options);
  auto stash_count = at::zeros({blocks}, options.dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(dtype, "global_kth_value_cuda", [&] {
    auto* h = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
    auto* st = reinterpret_cast<SelectState*>(state.data_ptr<int64_t>());
    const Stash<scalar_t> stash{stash_values.data_ptr<scalar_t>(), stash_count.data_ptr<int>(), slice, blocks};
    constexpr int kBits = RadixKey<scalar_t>::kBits;
    for (int high = kBits; high > 0; high -= kDigitBits) {
      const int width = std::min(kDigitBits, high), shift = high - width;
      const Pass pass = high == kBits ? Pass::kFirst : high == kBits - kDigitBits ? Pass::kSecond : Pass::kLater;
      for (size_t first = 0; first < scores.size(); first += kMaxTensors) {
        TensorTable table{};
        table.count = static_cast<int>(std::min<size_t>(kMaxTensors, scores.size() - first));
        for (int t = 0; t < table.count; ++t) {
          table.data[t] = scores[first + t].const_data_ptr();
          table.numel[t] = scores[first + t].numel();
        }
        radix_histogram_kernel<scalar_t><<<blocks, kHistogramThreads, 0, stream>>>(table, first == 0, stash, pass,
                                                                                    shift, width, st, h);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      choose_digit_kernel<scalar_t><<<1, kChooseThreads, 0, stream>>>(h, st, width, shift == 0,
                                                                      result.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const int64_t nonfinite = state[2].item<int64_t>();  // the one synchronisation
  if (nonfinite > 0) check_scores_finite(scores_in);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("global_kth_value", &global_kth_value_cuda);
}

}  // namespace graspext::ops
