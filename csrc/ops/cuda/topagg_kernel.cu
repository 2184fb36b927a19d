// TopAgg on CUDA, with the CPU kernel's semantics and random numbers (ops/topagg.h). One block per row
// (sample, teacher): the k-th largest |g| by a 4-pass radix select over 8-bit digits of the magnitudes' keys in
// shared-memory histograms, then the ties at it kept by index, lowest first, through a block scan. The fused op
// adds each kept vote into the sample's int32 sums with atomics, and a second kernel adds the noise.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ops/checks.h"
#include "ops/cuda/launch.cuh"
#include "ops/radix_key.h"
#include "ops/topagg.h"

namespace graspext::ops {
namespace {

constexpr int kThreads = 256;

// The key of the k-th largest |g| of the row (keys are compared as unsigned: larger key, larger magnitude).
template <typename scalar_t>
__device__ typename RadixKey<scalar_t>::bits_t row_kth_key(const scalar_t* g, int64_t d, int64_t k,
                                                           unsigned* hist, typename RadixKey<scalar_t>::bits_t* found,
                                                           long long* remaining) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  constexpr int kBits = RadixKey<scalar_t>::kBits;
  bits_t prefix = 0, prefix_mask = 0;
  if (threadIdx.x == 0) *remaining = k;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const bits_t key = RadixKey<scalar_t>::encode(static_cast<scalar_t>(fabs(g[j])));
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the digit holding the k-th largest among the keys that match the prefix so far
      long long left = *remaining;
      int digit = 255;
      for (; digit > 0; --digit) {
        if (static_cast<long long>(hist[digit]) >= left) break;
        left -= hist[digit];
      }
      *remaining = left;
      *found = static_cast<bits_t>(digit);
    }
    __syncthreads();
    prefix |= *found << shift;
    prefix_mask |= static_cast<bits_t>(0xff) << shift;
    __syncthreads();
  }
  return prefix;
}

// Votes of one row: calls emit(j, vote) for its k kept coordinates. Every thread of the block must call it.
template <typename scalar_t, typename Emit>
__device__ void row_votes(const scalar_t* g, int64_t d, int64_t k, double max_grad, uint64_t key, uint64_t index0,
                          Emit emit) {
  using bits_t = typename RadixKey<scalar_t>::bits_t;
  __shared__ unsigned hist[256];
  __shared__ bits_t found;
  __shared__ long long remaining;
  __shared__ long long scan_scratch[kThreads / 32];
  __shared__ double max_scratch[kThreads / 32];
  const bits_t kth = row_kth_key(g, d, k, hist, &found, &remaining);

  // max |g| of the row, for the clipping bound b = min(max |g|, max_grad).
  double local_max = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) local_max = fmax(local_max, fabs(static_cast<double>(g[j])));
  for (int offset = 16; offset > 0; offset >>= 1) local_max = fmax(local_max, __shfl_down_sync(0xffffffffu, local_max, offset));
  if ((threadIdx.x & 31) == 0) max_scratch[threadIdx.x >> 5] = local_max;
  __syncthreads();
  double max_abs = 0;
  for (int w = 0; w < kThreads / 32; ++w) max_abs = fmax(max_abs, max_scratch[w]);
  const double b = fmin(max_abs, max_grad);

  // Ties at the k-th key: the first `remaining` of them by index are kept. Chunks of kThreads coordinates in
  // order, a block scan of the tie flags giving each tie its rank.
  const long long ties_kept = remaining;
  long long ties_before = 0;
  for (int64_t base = 0; base < d; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    bits_t key_j = 0;
    if (j < d) key_j = RadixKey<scalar_t>::encode(static_cast<scalar_t>(fabs(g[j])));
    const long long is_tie = (j < d && key_j == kth) ? 1 : 0;
    long long chunk_ties;
    const long long rank = block_exclusive_sum<kThreads>(is_tie, scan_scratch, &chunk_ties) + ties_before;
    if (j < d && (key_j > kth || (is_tie && rank < ties_kept))) {
      const double clipped = fmin(fmax(static_cast<double>(g[j]), -b), b);
      emit(j, topagg::stochastic_sign(clipped, b, key, index0 + static_cast<uint64_t>(j)));
    }
    ties_before += chunk_ties;
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void votes_kernel(const scalar_t* __restrict__ g, int64_t d, int64_t k, double max_grad, uint64_t key,
                             int8_t* __restrict__ votes) {
  const int64_t r = blockIdx.x;
  int8_t* out = votes + r * d;
  row_votes(g + r * d, d, k, max_grad, key, static_cast<uint64_t>(r * d),
            [&](int64_t j, int8_t v) { out[j] = v; });
}

template <typename scalar_t>
__global__ void sum_kernel(const scalar_t* __restrict__ g, int64_t teachers, int64_t d, int64_t k, double max_grad,
                           uint64_t key, int* __restrict__ sums) {
  const int64_t r = blockIdx.x;
  int* row_sum = sums + (r / teachers) * d;
  row_votes(g + r * d, d, k, max_grad, key, static_cast<uint64_t>(r * d),
            [&](int64_t j, int8_t v) { atomicAdd(&row_sum[j], static_cast<int>(v)); });
}

__global__ void noise_kernel(const int* __restrict__ sums, int64_t n, double sigma, double bound, uint64_t key,
                             int8_t* __restrict__ out, double* __restrict__ noisy) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    noisy[i] = static_cast<double>(sums[i]) + sigma * topagg::normal(key, static_cast<uint64_t>(i));
    out[i] = topagg::threshold_vote(noisy[i], bound);
  }
}

void check_finite(const at::Tensor& grads) {
  TORCH_CHECK_VALUE(at::isfinite(grads).all().item<bool>(), "grads contains NaN or Inf; the votes need finite "
                    "gradients");
}

at::Tensor topagg_votes_cuda(const at::Tensor& grads_in, int64_t k, double max_grad, int64_t seed) {
  check_topagg_args(grads_in, k, max_grad, /*fused=*/false);
  c10::cuda::CUDAGuard guard(grads_in.device());
  const auto grads = grads_in.contiguous();
  check_finite(grads);
  const int64_t d = grads.size(-1), rows = grads.numel() / d;
  auto votes = at::zeros(grads.sizes(), grads.options().dtype(at::kChar));
  if (rows == 0) return votes;
  const uint64_t key = topagg::stream_key(static_cast<uint64_t>(seed), topagg::kSignStream);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "topagg_votes_cuda", [&] {
    votes_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(grads.const_data_ptr<scalar_t>(), d, k, max_grad, key,
                                                         votes.data_ptr<int8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return votes;
}

std::tuple<at::Tensor, at::Tensor> topagg_cuda(const at::Tensor& grads_in, int64_t k, double max_grad, double sigma,
                                               double beta, int64_t seed) {
  check_topagg_args(grads_in, k, max_grad, /*fused=*/true, sigma, beta);
  c10::cuda::CUDAGuard guard(grads_in.device());
  const auto grads = grads_in.contiguous();
  check_finite(grads);
  const int64_t samples = grads.size(0), teachers = grads.size(1), d = grads.size(2);
  auto sums = at::zeros({samples, d}, grads.options().dtype(at::kInt));
  auto out = at::empty({samples, d}, grads.options().dtype(at::kChar));
  auto noisy = at::empty({samples, d}, grads.options().dtype(at::kDouble));
  if (samples == 0) return {out, noisy};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const uint64_t sign_key = topagg::stream_key(static_cast<uint64_t>(seed), topagg::kSignStream);
  AT_DISPATCH_FLOATING_TYPES(grads.scalar_type(), "topagg_cuda", [&] {
    sum_kernel<scalar_t><<<samples * teachers, kThreads, 0, stream>>>(grads.const_data_ptr<scalar_t>(), teachers, d,
                                                                      k, max_grad, sign_key, sums.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t n = samples * d;
  noise_kernel<<<grid_size(n, kThreads), kThreads, 0, stream>>>(
      sums.data_ptr<int>(), n, sigma, beta * static_cast<double>(teachers),
      topagg::stream_key(static_cast<uint64_t>(seed), topagg::kNoiseStream), out.data_ptr<int8_t>(),
      noisy.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, noisy};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("topagg_votes", &topagg_votes_cuda);
  m.impl("topagg", &topagg_cuda);
}

}  // namespace graspext::ops
