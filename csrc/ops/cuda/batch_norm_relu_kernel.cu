// CUDA kernels of the fused training-mode BatchNorm (+ residual, + ReLU) ops (schemas in ops/batch_norm_relu.cpp),
// computing what the CPU kernels compute, in the same order of sums.
//
// The input is a contiguous [P, C, L] tensor. The per-channel sums split P into a fixed number of ranges, one block
// each per channel; a block reduces its range in a fixed tree and the ranges are added in order by one thread per
// channel, so the result does not depend on scheduling (training stays bit-for-bit reproducible). Sums are shifted
// by each channel's first value, so that a large mean does not drown the variance, and reduced in float64 across
// threads. bfloat16 activations are computed in float32 with float32 statistics and parameters, each output
// rounded once. Consecutive threads take consecutive values of a row of L (the batch of a batch-innermost
// activation, the pixels of an NCHW one), so every access is coalesced.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ops/batch_norm_relu.h"
#include "ops/cuda/launch.cuh"

namespace graspext::ops {
namespace {

constexpr int kSumThreads = 256;
constexpr int64_t kRanges = 64;  // fixed split of P for the per-channel sums (as the CPU kernels')

__device__ __forceinline__ int64_t range_bound(int64_t P, int64_t ranges, int64_t r) { return P * r / ranges; }

// Sums a and b over the block in a fixed order (a tree over shared memory); thread 0 gets the totals.
__device__ void block_sum_pair(double& a, double& b) {
  __shared__ double sa[kSumThreads], sb[kSumThreads];
  sa[threadIdx.x] = a;
  sb[threadIdx.x] = b;
  __syncthreads();
  for (int half = kSumThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      sa[threadIdx.x] += sa[threadIdx.x + half];
      sb[threadIdx.x] += sb[threadIdx.x + half];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
}

// How a block's threads cover rows of length L (the [P, C, L] tensor is P * C such rows): min(L, blockDim)
// threads per row, as many rows at a time as fit, so that short rows (NCHW's small images) keep every thread busy
// and no index is divided in the loops.
struct RowLanes {
  int64_t lanes, rows, row, lane;  // threads per row, rows per step, this thread's row in the step and lane
  __device__ RowLanes(int64_t L, int threads)
      : lanes(L < threads ? L : threads), rows(threads / lanes), row(threadIdx.x / lanes), lane(threadIdx.x % lanes) {}
  __device__ bool active() const { return row < rows; }
};

// partial[(r * 2 + 0) * C + c] and [(r * 2 + 1) * C + c]: the sum of (x - shift_c) and of its square over range r
// of channel c. Grid (C, ranges).
template <typename scalar_t>
__global__ void __launch_bounds__(kSumThreads)
    moments_kernel(const scalar_t* __restrict__ x, int64_t P, int64_t C, int64_t L, int64_t ranges,
                   double* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x, r = blockIdx.y;
  const int64_t p1 = range_bound(P, ranges, r + 1);
  const acc_t shift = static_cast<acc_t>(x[c * L]);
  acc_t s = 0, q = 0;
  const RowLanes t(L, kSumThreads);
  if (t.active()) {
    for (int64_t p = range_bound(P, ranges, r) + t.row; p < p1; p += t.rows) {
      const scalar_t* row = x + (p * C + c) * L;
      for (int64_t l = t.lane; l < L; l += t.lanes) {
        const acc_t d = static_cast<acc_t>(row[l]) - shift;
        s += d;
        q += d * d;
      }
    }
  }
  double a = s, b = q;
  block_sum_pair(a, b);
  if (threadIdx.x == 0) {
    partial[(r * 2) * C + c] = a;
    partial[(r * 2 + 1) * C + c] = b;
  }
}

// The two sums of channel c over all ranges, added in range order.
__device__ __forceinline__ void sum_ranges(const double* partial, int64_t ranges, int64_t C, int64_t c, double& a,
                                           double& b) {
  a = b = 0;
  for (int64_t r = 0; r < ranges; ++r) {
    a += partial[(r * 2) * C + c];
    b += partial[(r * 2 + 1) * C + c];
  }
}

// Per channel: the batch mean and biased variance, and y = x * scale + offset. One thread per channel.
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
__global__ void statistics_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t L, int64_t ranges, double count,
                                  double eps, const double* __restrict__ partial, const T* __restrict__ weight,
                                  const T* __restrict__ bias, T* __restrict__ mean, T* __restrict__ var,
                                  T* __restrict__ scale, T* __restrict__ offset) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double sum, sq;
  sum_ranges(partial, ranges, C, c, sum, sq);
  const double shift = static_cast<T>(x[c * L]);
  const double d = sum / count;
  const double var_c = fmax(0.0, sq / count - d * d);
  const double mean_c = shift + d;
  const double invstd = 1.0 / sqrt(var_c + eps);
  const double w = weight ? static_cast<double>(weight[c]) : 1.0, b = bias ? static_cast<double>(bias[c]) : 0.0;
  mean[c] = static_cast<T>(mean_c);
  var[c] = static_cast<T>(var_c);
  scale[c] = static_cast<T>(w * invstd);
  offset[c] = static_cast<T>(b - mean_c * w * invstd);
}

// Calls fn(offset of the row, its channel, lane, lanes) for every row of a [P, C, L] tensor, blocks striding over
// the P * C rows.
template <typename Fn>
__device__ __forceinline__ void for_each_row(int64_t rows, int64_t C, int64_t L, const Fn& fn) {
  const RowLanes t(L, blockDim.x);
  if (!t.active()) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * t.rows;
  for (int64_t row = blockIdx.x * t.rows + t.row; row < rows; row += step) fn(row * L, row % C, t.lane, t.lanes);
}

template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ residual,
                                 scalar_t* __restrict__ y, int64_t rows, int64_t C, int64_t L,
                                 const T* __restrict__ scale, const T* __restrict__ offset, bool relu) {
  for_each_row(rows, C, L, [&](int64_t o, int64_t c, int64_t lane, int64_t lanes) {
    const T a = scale[c], b = offset[c];
    for (int64_t l = lane; l < L; l += lanes) {
      T v = static_cast<T>(x[o + l]) * a + b;
      if (residual) v += static_cast<T>(residual[o + l]);
      y[o + l] = static_cast<scalar_t>(relu && v < T(0) ? T(0) : v);
    }
  });
}

// The gradient that reaches the normalization: grad_out where the ReLU passed (as torch: NaN passes).
template <typename scalar_t, typename T>
__device__ __forceinline__ T passed_grad(const scalar_t* dy, const scalar_t* out, int64_t i, bool relu) {
  return relu && static_cast<T>(out[i]) <= T(0) ? T(0) : static_cast<T>(dy[i]);
}

// partial[(r * 2 + 0) * C + c] = sum of g, [(r * 2 + 1) * C + c] = sum of g * (x - mean_c), over range r of
// channel c. Grid (C, ranges).
template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
__global__ void __launch_bounds__(kSumThreads) grad_sums_kernel(const scalar_t* __restrict__ dy,
                                                                 const scalar_t* __restrict__ x,
                                                                 const scalar_t* __restrict__ out, int64_t P, int64_t C,
                                                                 int64_t L, int64_t ranges, const T* __restrict__ mean,
                                                                 bool relu, double* __restrict__ partial) {
  const int64_t c = blockIdx.x, r = blockIdx.y;
  const int64_t p1 = range_bound(P, ranges, r + 1);
  const T m = mean[c];
  T s = 0, q = 0;
  const RowLanes t(L, kSumThreads);
  if (t.active()) {
    for (int64_t p = range_bound(P, ranges, r) + t.row; p < p1; p += t.rows) {
      const int64_t o = (p * C + c) * L;
      for (int64_t l = t.lane; l < L; l += t.lanes) {
        const T g = passed_grad<scalar_t, T>(dy, out, o + l, relu);
        s += g;
        q += g * (static_cast<T>(x[o + l]) - m);
      }
    }
  }
  double a = s, b = q;
  block_sum_pair(a, b);
  if (threadIdx.x == 0) {
    partial[(r * 2) * C + c] = a;
    partial[(r * 2 + 1) * C + c] = b;
  }
}

// dx = w * invstd * (g - sum_g / M - xhat * sum(g * xhat) / M), xhat = (x - mean) * invstd, expanded to
// a * g + k * x + b per channel; and the parameter gradients. One thread per channel.
template <typename T>
__global__ void grad_coefficients_kernel(int64_t C, int64_t ranges, double count, double eps,
                                         const double* __restrict__ partial, const T* __restrict__ weight,
                                         const T* __restrict__ mean, const T* __restrict__ var, T* __restrict__ a,
                                         T* __restrict__ k, T* __restrict__ b, T* __restrict__ grad_weight,
                                         T* __restrict__ grad_bias) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= C) return;
  double sum_g, sum_gx;
  sum_ranges(partial, ranges, C, c, sum_g, sum_gx);
  const double invstd = 1.0 / sqrt(static_cast<double>(var[c]) + eps);
  const double sum_g_xhat = sum_gx * invstd;
  const double ac = (weight ? static_cast<double>(weight[c]) : 1.0) * invstd;
  const double kc = -ac * invstd * sum_g_xhat / count;
  a[c] = static_cast<T>(ac);
  k[c] = static_cast<T>(kc);
  b[c] = static_cast<T>(-ac * sum_g / count - kc * static_cast<double>(mean[c]));
  grad_weight[c] = static_cast<T>(sum_g_xhat);
  grad_bias[c] = static_cast<T>(sum_g);
}

template <typename scalar_t, typename T = at::opmath_type<scalar_t>>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ out, scalar_t* __restrict__ dx,
                                  scalar_t* __restrict__ dr, int64_t rows, int64_t C, int64_t L,
                                  const T* __restrict__ a, const T* __restrict__ k, const T* __restrict__ b,
                                  bool relu) {
  for_each_row(rows, C, L, [&](int64_t o, int64_t c, int64_t lane, int64_t lanes) {
    const T ac = a[c], kc = k[c], bc = b[c];
    for (int64_t l = lane; l < L; l += lanes) {
      const T g = passed_grad<scalar_t, T>(dy, out, o + l, relu);
      dx[o + l] = static_cast<scalar_t>(ac * g + kc * static_cast<T>(x[o + l]) + bc);
      if (dr) dr[o + l] = static_cast<scalar_t>(g);
    }
  });
}

// Blocks for an elementwise pass over P * C rows of length L: enough to fill the GPU, no more.
int row_blocks(int64_t rows, int64_t L) {
  const int64_t rows_per_block = kThreadsPerBlock / std::min<int64_t>(L, kThreadsPerBlock);
  return grid_size((rows + rows_per_block - 1) / rows_per_block, 1);
}

// A per-channel vector in the statistics dtype on the input's device, or an undefined tensor.
at::Tensor channel_vector(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t ? t->to(dtype).contiguous() : at::Tensor();
}

template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

int64_t ranges_of(int64_t P) { return std::min<int64_t>(P, kRanges); }

// The grid of the per-channel sums: a block per (channel, range of P).
dim3 sums_grid(int64_t C, int64_t ranges) {
  TORCH_CHECK(C <= std::numeric_limits<int32_t>::max(), "batch_norm_relu (CUDA): at most 2^31 - 1 channels, got ", C);
  return dim3(static_cast<unsigned>(C), static_cast<unsigned>(ranges));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_cuda(const at::Tensor& input,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias,
                                                                    const std::optional<at::Tensor>& residual,
                                                                    double eps, bool relu) {
  check_batch_norm_forward_args(input, weight, bias, residual, eps, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto r = residual ? residual->contiguous() : at::Tensor();
  const int64_t P = input.size(0), C = input.size(1), L = input.size(2);
  const auto stats = batch_norm_stats_dtype(input);
  auto out = at::empty_like(input);
  auto mean = at::empty({C}, input.options().dtype(stats));
  auto var = at::empty({C}, input.options().dtype(stats));
  if (C == 0) return {out, mean, var};
  const int64_t ranges = ranges_of(P);
  auto partial = at::empty({ranges * 2 * C}, input.options().dtype(at::kDouble));
  auto scale = at::empty({C}, input.options().dtype(stats));
  auto offset = at::empty({C}, input.options().dtype(stats));
  const auto w = channel_vector(weight, stats), b = channel_vector(bias, stats);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "batch_norm_relu_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    moments_kernel<scalar_t><<<sums_grid(C, ranges), kSumThreads, 0, stream>>>(x, P, C, L, ranges,
                                                                               partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    statistics_kernel<scalar_t><<<static_cast<unsigned>((C + kThreadsPerBlock - 1) / kThreadsPerBlock),
                                  kThreadsPerBlock, 0, stream>>>(
        x, C, L, ranges, static_cast<double>(P * L), eps, partial.const_data_ptr<double>(), data_or_null<T>(w),
        data_or_null<T>(b), mean.data_ptr<T>(), var.data_ptr<T>(), scale.data_ptr<T>(), offset.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_kernel<scalar_t><<<row_blocks(P * C, L), kThreadsPerBlock, 0, stream>>>(
        x, r.defined() ? r.const_data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), P * C, C, L,
        scale.const_data_ptr<T>(), offset.const_data_ptr<T>(), relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& out,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
    bool residual_grad) {
  check_batch_norm_backward_args(grad_out, input, out, weight, mean, var, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = input.size(0), C = input.size(1), L = input.size(2);
  const auto stats = batch_norm_stats_dtype(input);
  const auto dy = grad_out.contiguous();
  const auto y = out.contiguous();
  auto grad_input = at::empty_like(input);
  auto grad_weight = at::empty({C}, input.options().dtype(stats));
  auto grad_bias = at::empty({C}, input.options().dtype(stats));
  auto grad_residual = residual_grad ? at::empty_like(input) : at::empty({0}, input.options());
  if (C == 0) return {grad_input, grad_weight, grad_bias, grad_residual};
  const int64_t ranges = ranges_of(P);
  auto partial = at::empty({ranges * 2 * C}, input.options().dtype(at::kDouble));
  auto coefficients = at::empty({3, C}, input.options().dtype(stats));
  const auto w = channel_vector(weight, stats), m = mean.to(stats).contiguous(), v = var.to(stats).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "batch_norm_relu_backward_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    grad_sums_kernel<scalar_t><<<sums_grid(C, ranges), kSumThreads, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x, y.const_data_ptr<scalar_t>(), P, C, L, ranges, m.const_data_ptr<T>(), relu,
        partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    T* coef = coefficients.data_ptr<T>();
    grad_coefficients_kernel<T><<<static_cast<unsigned>((C + kThreadsPerBlock - 1) / kThreadsPerBlock),
                                  kThreadsPerBlock, 0, stream>>>(
        C, ranges, static_cast<double>(P * L), eps, partial.const_data_ptr<double>(), data_or_null<T>(w),
        m.const_data_ptr<T>(), v.const_data_ptr<T>(), coef, coef + C, coef + 2 * C, grad_weight.data_ptr<T>(),
        grad_bias.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_input_kernel<scalar_t><<<row_blocks(P * C, L), kThreadsPerBlock, 0, stream>>>(
        dy.const_data_ptr<scalar_t>(), x, y.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
        residual_grad ? grad_residual.data_ptr<scalar_t>() : nullptr, P * C, C, L, coef, coef + C, coef + 2 * C,
        relu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_input, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("batch_norm_relu", &batch_norm_relu_cuda);
  m.impl("batch_norm_relu_backward", &batch_norm_relu_backward_cuda);
}

}  // namespace graspext::ops
