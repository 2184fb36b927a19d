// CUDA sparse convolution and linear ops (schemas and index layout in ops/sparse_conv2d.h): the same
// batch-innermost layout as the CPU kernels, with consecutive threads on consecutive samples so that every
// load and store of an image is coalesced, and the index walked uniformly by a warp (broadcast loads).
//   forward / input gradient: a block per (row, output row y), its row's kept taps decoded once into shared
//   memory, each thread accumulating a few output values;
//   weight gradient: one warp per (kept weight, band of output rows), reducing over the band's pixels and the
//   samples into a partial sum per band; the bands are summed in a fixed order (deterministic).
// float16 and bfloat16 accumulate in float32 (at::opmath_type), as cuDNN does; under autocast the ops run in
// autocast's dtype (the AutocastCUDA kernels at the end).
// Index structures are validated in full on first use (check_sparse_index, which then remembers them while
// they live unchanged, so the steady state has no host synchronisation); the kernels assert their bounds too.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "ops/cuda/launch.cuh"
#include "ops/sparse_conv2d.h"

namespace graspext::ops {
namespace {

struct Strides {
  int64_t channel, row, pixel;  // elements; the batch has stride 1
};

Strides strides_of(const at::Tensor& t) { return {t.stride(1), t.stride(2), t.stride(3)}; }

// dst[row, y, x, n] = bias[row] + sum over the row's entries of value * src[c, sy, sx, n]. Forward: the row
// is an output channel, tap = (c * kh + r) * kw + s, sy = y * stride - pad + r. Transposed (input gradient):
// the row is an input channel, tap = (o * kh + r) * kw + s over grad_output channels o, and
// sy = (y + pad - r) / stride where that divides exactly (likewise sx).
//
// A block owns one (row, y) and a tile of kGatherPerThread * blockDim consecutive (x, n) positions. The row's
// entries are decoded once per block, kGatherThreads at a time, into shared memory (the source row offset,
// or -1 where sy falls outside, the column tap and the value), so the inner loop is a load and an FMA.
constexpr int kGatherThreads = 128;
constexpr int kGatherPerThread = 4;

template <typename scalar_t, bool kTransposed>
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(
    const scalar_t* __restrict__ src, Strides ss, int src_h, int src_w, scalar_t* __restrict__ dst, Strides ds,
    int dst_w, int batch, const int64_t* __restrict__ ptr, const int32_t* __restrict__ taps,
    const int32_t* __restrict__ order, const scalar_t* __restrict__ values, const scalar_t* __restrict__ bias,
    int64_t nnz, int64_t taps_per_row, int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t entry_offset[kGatherThreads];
  __shared__ int entry_column[kGatherThreads];
  __shared__ acc_t entry_value[kGatherThreads];
  const int64_t row = blockIdx.z;
  const int y = blockIdx.y;
  const int positions = dst_w * batch;
  const int tile = blockIdx.x * kGatherThreads * kGatherPerThread;
  int x[kGatherPerThread], n[kGatherPerThread];
  acc_t acc[kGatherPerThread];
#pragma unroll
  for (int k = 0; k < kGatherPerThread; ++k) {
    const int i = tile + k * kGatherThreads + threadIdx.x;
    x[k] = i / batch;
    n[k] = i - x[k] * batch;
    acc[k] = bias ? static_cast<acc_t>(bias[row]) : acc_t(0);
  }
  const int64_t begin = ptr[row], end = ptr[row + 1];
  CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= nnz);
  for (int64_t chunk = begin; chunk < end; chunk += kGatherThreads) {
    const int count = static_cast<int>(end - chunk < kGatherThreads ? end - chunk : kGatherThreads);
    if (threadIdx.x < count) {
      const int64_t e = chunk + threadIdx.x;
      const int tap = taps[e];
      CUDA_KERNEL_ASSERT(0 <= tap && tap < taps_per_row);
      const int c = tap / (kh * kw), r = (tap / kw) % kh, s = tap % kw;
      int sy;
      bool inside;
      if constexpr (kTransposed) {
        const int ny = y + pad_h - r;
        sy = ny / stride_h;
        inside = ny >= 0 && ny % stride_h == 0 && sy < src_h;
      } else {
        sy = y * stride_h - pad_h + r;
        inside = sy >= 0 && sy < src_h;
      }
      const int64_t position = order ? order[e] : e;
      CUDA_KERNEL_ASSERT(0 <= position && position < nnz);
      entry_offset[threadIdx.x] = inside ? c * ss.channel + sy * ss.row : -1;
      entry_column[threadIdx.x] = s;
      entry_value[threadIdx.x] = static_cast<acc_t>(values[position]);
    }
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const int64_t offset = entry_offset[j];
      if (offset < 0) continue;
      const int s = entry_column[j];
      const acc_t v = entry_value[j];
#pragma unroll
      for (int k = 0; k < kGatherPerThread; ++k) {
        int sx;
        bool inside;
        if constexpr (kTransposed) {
          const int nx = x[k] + pad_w - s;
          sx = nx / stride_w;
          inside = nx >= 0 && nx % stride_w == 0 && sx < src_w;
        } else {
          sx = x[k] * stride_w - pad_w + s;
          inside = sx >= 0 && sx < src_w;
        }
        if (inside && x[k] < dst_w) acc[k] += v * static_cast<acc_t>(src[offset + sx * ss.pixel + n[k]]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kGatherPerThread; ++k) {
    if (tile + k * kGatherThreads + static_cast<int>(threadIdx.x) < positions) {
      dst[row * ds.channel + y * ds.row + x[k] * ds.pixel + n[k]] = static_cast<scalar_t>(acc[k]);
    }
  }
}

// partial[band, e] = sum over output rows y of the band, pixels x and samples n of
// grad_output[o, y, x, n] * input[c, sy, sx, n]; one warp per (band, entry). `partial` is in acc_t.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__global__ void sddmm_kernel(const scalar_t* __restrict__ go, Strides gs, const scalar_t* __restrict__ in,
                             Strides is, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t batch,
                             const int64_t* __restrict__ ptr, int64_t rows, const int32_t* __restrict__ taps,
                             int64_t nnz, int64_t taps_per_row, int64_t bands, int64_t rows_per_band, int kh, int kw,
                             int stride_h, int stride_w, int pad_h, int pad_w, acc_t* __restrict__ partial) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + (threadIdx.x >> 5); w < bands * nnz;
       w += warps) {
    const int64_t band = w / nnz, e = w % nnz;
    // The entry's row: the last row whose first entry is at or before e.
    int64_t lo = 0, hi = rows - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (ptr[mid] <= e) lo = mid; else hi = mid - 1;
    }
    const int tap = taps[e];
    CUDA_KERNEL_ASSERT(0 <= tap && tap < taps_per_row);
    const int c = tap / (kh * kw);
    const int r = (tap / kw) % kh;
    const int s = tap % kw;
    acc_t acc = 0;
    const int64_t y_end = min(out_h, (band + 1) * rows_per_band);
    for (int64_t y = band * rows_per_band; y < y_end; ++y) {
      const int64_t sy = y * stride_h - pad_h + r;
      if (sy < 0 || sy >= in_h) continue;
      for (int64_t x = 0; x < out_w; ++x) {
        const int64_t sx = x * stride_w - pad_w + s;
        if (sx < 0 || sx >= in_w) continue;
        const scalar_t* g = go + lo * gs.channel + y * gs.row + x * gs.pixel;
        const scalar_t* p = in + c * is.channel + sy * is.row + sx * is.pixel;
        for (int64_t n = lane; n < batch; n += 32) acc += static_cast<acc_t>(g[n]) * static_cast<acc_t>(p[n]);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) partial[band * nnz + e] = acc;
  }
}

template <bool kTransposed>
void launch_gather(const at::Tensor& src, const at::Tensor& dst, const ConvGeometry& g, const at::Tensor& ptr,
                   const at::Tensor& taps, const at::Tensor* order, const at::Tensor& values,
                   const at::Tensor& bias) {
  const int64_t rows = kTransposed ? g.in_channels : g.out_channels;
  const int64_t dst_h = kTransposed ? g.in_h : g.out_h, dst_w = kTransposed ? g.in_w : g.out_w;
  const int64_t src_h = kTransposed ? g.out_h : g.in_h, src_w = kTransposed ? g.out_w : g.in_w;
  const int64_t positions = dst_w * g.batch;
  if (rows == 0 || dst_h == 0 || positions == 0) return;
  TORCH_CHECK(rows <= 65535 && dst_h <= 65535 && positions <= std::numeric_limits<int>::max() / 2,
              "sparse_conv2d (CUDA): at most 65535 channels and rows, and fewer pixels x samples per row");
  constexpr int64_t kTile = kGatherThreads * kGatherPerThread;
  const dim3 grid(static_cast<unsigned>((positions + kTile - 1) / kTile), static_cast<unsigned>(dst_h),
                  static_cast<unsigned>(rows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "sparse_conv2d_gather_cuda", [&] {
    gather_kernel<scalar_t, kTransposed><<<grid, kGatherThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        src.const_data_ptr<scalar_t>(), strides_of(src), static_cast<int>(src_h), static_cast<int>(src_w),
        dst.data_ptr<scalar_t>(), strides_of(dst), static_cast<int>(dst_w), static_cast<int>(g.batch),
        ptr.const_data_ptr<int64_t>(), taps.const_data_ptr<int32_t>(),
        order ? order->const_data_ptr<int32_t>() : nullptr, values.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, values.numel(),
        (kTransposed ? g.out_channels : g.in_channels) * g.kernel_h * g.kernel_w, static_cast<int>(g.kernel_h),
        static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h), static_cast<int>(g.stride_w),
        static_cast<int>(g.pad_h), static_cast<int>(g.pad_w));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Writes the forward product into `out`, any [N, C, H, W] tensor whose batch has stride 1 (checked arguments).
at::Tensor& sparse_conv2d_into_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                    const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                                    const ConvGeometry& g, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(input.device());
  launch_gather<false>(batch_innermost(input), out, g, row_ptr.contiguous(), row_taps.contiguous(), nullptr,
                       values.contiguous(), bias ? bias->contiguous() : at::Tensor());
  return out;
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                              const at::Tensor& col_order, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding) {
  (void)col_ptr, (void)col_taps, (void)col_order;  // for the backward pass
  return sparse_conv2d_via(&sparse_conv2d_into_cuda, input, values, row_ptr, row_taps, bias, weight_shape, stride,
                           padding, at::kCUDA);
}

at::Tensor sparse_conv2d_backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& values,
                                             const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                             const at::Tensor& col_order, at::IntArrayRef weight_shape,
                                             at::IntArrayRef input_shape, at::IntArrayRef stride,
                                             at::IntArrayRef padding) {
  const auto g = check_backward_input_args(grad_output, values, col_ptr, col_taps, col_order, weight_shape,
                                           input_shape, stride, padding, at::kCUDA);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  auto grad_input = empty_batch_innermost(g.batch, g.in_channels, g.in_h, g.in_w, grad_output.options());
  const auto order = col_order.contiguous();
  launch_gather<true>(batch_innermost(grad_output), grad_input, g, col_ptr.contiguous(), col_taps.contiguous(),
                      &order, values.contiguous(), at::Tensor());
  return grad_input;
}

at::Tensor sparse_conv2d_backward_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                              const at::Tensor& row_ptr, const at::Tensor& row_taps,
                                              at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                              at::IntArrayRef padding) {
  const auto g =
      check_backward_weight_args(grad_output, input, row_ptr, row_taps, weight_shape, stride, padding, at::kCUDA);
  const int64_t nnz = row_taps.numel();
  const c10::cuda::CUDAGuard guard(input.device());
  if (nnz == 0 || g.batch == 0) return at::zeros({nnz}, input.options());
  const auto dy = batch_innermost(grad_output);
  const auto x = batch_innermost(input);
  const auto ptr = row_ptr.contiguous();
  const auto taps = row_taps.contiguous();
  // Bands of output rows: enough (entry, band) warps to fill the GPU when few weights are kept.
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, input.get_device()));
  const int64_t target_warps = static_cast<int64_t>(sm_count) * 64;
  const int64_t wanted_bands = std::clamp<int64_t>((target_warps + nnz - 1) / nnz, 1, std::max<int64_t>(g.out_h, 1));
  const int64_t rows_per_band = (g.out_h + wanted_bands - 1) / wanted_bands;
  const int64_t bands = std::max<int64_t>(1, (g.out_h + rows_per_band - 1) / rows_per_band);
  // Partial sums in the accumulation type; the sum over bands is rounded to the input's dtype once.
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  auto partial = at::empty({bands, nnz}, input.options().dtype(acc_dtype));
  constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
  const int blocks = grid_size(bands * nnz, kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "sparse_conv2d_backward_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sddmm_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), strides_of(dy), x.const_data_ptr<scalar_t>(), strides_of(x), g.in_h, g.in_w,
        g.out_h, g.out_w, g.batch, ptr.const_data_ptr<int64_t>(), g.out_channels, taps.const_data_ptr<int32_t>(),
        nnz, g.in_channels * g.kernel_h * g.kernel_w, bands, rows_per_band, static_cast<int>(g.kernel_h),
        static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h), static_cast<int>(g.stride_w),
        static_cast<int>(g.pad_h), static_cast<int>(g.pad_w), partial.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const auto total = bands == 1 ? partial.view({nnz}) : partial.sum(0);
  return acc_dtype == input.scalar_type() ? total : total.to(input.scalar_type());
}

at::Tensor sparse_linear_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                              const at::Tensor& col_order, const std::optional<at::Tensor>& bias) {
  (void)col_ptr, (void)col_taps, (void)col_order;  // for the backward pass
  return sparse_linear_via(&sparse_conv2d_into_cuda, input, values, row_ptr, row_taps, bias, at::kCUDA);
}

// Autocast: the products run in autocast's lower-precision dtype (float16 or bfloat16, float32 accumulation), as
// cuDNN convolutions do; float64 stays float64. Autograd records the casts, so float32 weights get float32
// gradients.
at::Tensor autocast_cast(const at::Tensor& t) {
  return at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(c10::DeviceType::CUDA), t,
                                   c10::DeviceType::CUDA);
}

std::optional<at::Tensor> autocast_cast(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(autocast_cast(*t)) : std::nullopt;
}

at::Tensor sparse_conv2d_autocast(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                  const at::Tensor& col_order, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("graspext::sparse_conv2d", "")
                             .typed<decltype(sparse_conv2d_autocast)>();
  return op.call(autocast_cast(input), autocast_cast(values), row_ptr, row_taps, col_ptr, col_taps, col_order,
                 autocast_cast(bias), weight_shape, stride, padding);
}

at::Tensor sparse_linear_autocast(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                  const at::Tensor& col_order, const std::optional<at::Tensor>& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("graspext::sparse_linear", "")
                             .typed<decltype(sparse_linear_autocast)>();
  return op.call(autocast_cast(input), autocast_cast(values), row_ptr, row_taps, col_ptr, col_taps, col_order,
                 autocast_cast(bias));
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, AutocastCUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autocast);
  m.impl("sparse_linear", &sparse_linear_autocast);
}

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cuda);
  m.impl("sparse_conv2d_backward_weight", &sparse_conv2d_backward_weight_cuda);
}

}  // namespace graspext::ops
