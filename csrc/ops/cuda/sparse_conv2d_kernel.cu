// CUDA sparse convolution and linear ops (schemas and index layout in ops/sparse_conv2d.h), a first,
// straightforward version: the same batch-innermost layout as the CPU kernels, with consecutive threads on
// consecutive samples so that every load and store of an image is coalesced, and the index walked
// uniformly by a warp (broadcast loads).
//   forward / input gradient: one thread per output value, looping over its row's kept taps;
//   weight gradient: one warp per kept weight, reducing over pixels and samples.
// Indices are validated on the device before use (check_sparse_index: one host synchronisation per index),
// as the CPU op validates them on every call. Not yet run on a GPU: graspext.nn uses these kernels only with
// GRASPEXT_CUDA_SPARSE=1 until they are verified.

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
// sy = (y + pad - r) / stride where that divides exactly.
template <typename scalar_t, bool kTransposed>
__global__ void gather_kernel(const scalar_t* __restrict__ src, Strides ss, int64_t src_h, int64_t src_w,
                              scalar_t* __restrict__ dst, Strides ds, int64_t rows, int64_t dst_h, int64_t dst_w,
                              int64_t batch, const int64_t* __restrict__ ptr, const int32_t* __restrict__ taps,
                              const int32_t* __restrict__ order, const scalar_t* __restrict__ values,
                              const scalar_t* __restrict__ bias, int kh, int kw, int stride_h, int stride_w,
                              int pad_h, int pad_w) {
  const int64_t total = rows * dst_h * dst_w * batch;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t n = i % batch;
    int64_t rest = i / batch;
    const int64_t x = rest % dst_w;
    rest /= dst_w;
    const int64_t y = rest % dst_h;
    const int64_t row = rest / dst_h;
    scalar_t acc = bias ? bias[row] : scalar_t(0);
    for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e) {
      const int tap = taps[e];
      const int c = tap / (kh * kw);
      const int r = (tap / kw) % kh;
      const int s = tap % kw;
      int64_t sy, sx;
      if constexpr (kTransposed) {
        const int64_t ny = y + pad_h - r, nx = x + pad_w - s;
        if (ny < 0 || nx < 0 || ny % stride_h || nx % stride_w) continue;
        sy = ny / stride_h;
        sx = nx / stride_w;
      } else {
        sy = y * stride_h - pad_h + r;
        sx = x * stride_w - pad_w + s;
      }
      if (sy < 0 || sy >= src_h || sx < 0 || sx >= src_w) continue;
      const scalar_t v = values[order ? order[e] : e];
      acc += v * src[c * ss.channel + sy * ss.row + sx * ss.pixel + n];
    }
    dst[row * ds.channel + y * ds.row + x * ds.pixel + n] = acc;
  }
}

// grad_values[e] = sum over (y, x, n) of grad_output[o, y, x, n] * input[c, sy, sx, n], one warp per entry.
template <typename scalar_t>
__global__ void sddmm_kernel(const scalar_t* __restrict__ go, Strides gs, const scalar_t* __restrict__ in,
                             Strides is, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t batch,
                             const int64_t* __restrict__ ptr, int64_t rows, const int32_t* __restrict__ taps,
                             int64_t nnz, int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w,
                             scalar_t* __restrict__ grad_values) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + (threadIdx.x >> 5); e < nnz; e += warps) {
    // The entry's row: the last row whose first entry is at or before e.
    int64_t lo = 0, hi = rows - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (ptr[mid] <= e) lo = mid; else hi = mid - 1;
    }
    const int tap = taps[e];
    const int c = tap / (kh * kw);
    const int r = (tap / kw) % kh;
    const int s = tap % kw;
    scalar_t acc = 0;
    for (int64_t y = 0; y < out_h; ++y) {
      const int64_t sy = y * stride_h - pad_h + r;
      if (sy < 0 || sy >= in_h) continue;
      for (int64_t x = 0; x < out_w; ++x) {
        const int64_t sx = x * stride_w - pad_w + s;
        if (sx < 0 || sx >= in_w) continue;
        const scalar_t* g = go + lo * gs.channel + y * gs.row + x * gs.pixel;
        const scalar_t* p = in + c * is.channel + sy * is.row + sx * is.pixel;
        for (int64_t n = lane; n < batch; n += 32) acc += g[n] * p[n];
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) grad_values[e] = acc;
  }
}

template <bool kTransposed>
void launch_gather(const at::Tensor& src, const at::Tensor& dst, const ConvGeometry& g, const at::Tensor& ptr,
                   const at::Tensor& taps, const at::Tensor* order, const at::Tensor& values,
                   const at::Tensor& bias) {
  const int64_t rows = kTransposed ? g.in_channels : g.out_channels;
  const int64_t dst_h = kTransposed ? g.in_h : g.out_h, dst_w = kTransposed ? g.in_w : g.out_w;
  const int64_t src_h = kTransposed ? g.out_h : g.in_h, src_w = kTransposed ? g.out_w : g.in_w;
  const int64_t total = rows * dst_h * dst_w * g.batch;
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "sparse_conv2d_gather_cuda", [&] {
    gather_kernel<scalar_t, kTransposed>
        <<<grid_size(total, kThreadsPerBlock), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
            src.const_data_ptr<scalar_t>(), strides_of(src), src_h, src_w, dst.data_ptr<scalar_t>(),
            strides_of(dst), rows, dst_h, dst_w, g.batch, ptr.const_data_ptr<int64_t>(),
            taps.const_data_ptr<int32_t>(), order ? order->const_data_ptr<int32_t>() : nullptr,
            values.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
            static_cast<int>(g.kernel_h), static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h),
            static_cast<int>(g.stride_w), static_cast<int>(g.pad_h), static_cast<int>(g.pad_w));
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
  auto grad_values = at::zeros({nnz}, input.options());
  if (nnz == 0 || g.batch == 0) return grad_values;
  const auto dy = batch_innermost(grad_output);
  const auto x = batch_innermost(input);
  const auto ptr = row_ptr.contiguous();
  const auto taps = row_taps.contiguous();
  constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;
  const int blocks = grid_size(nnz, kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sparse_conv2d_backward_weight_cuda", [&] {
    sddmm_kernel<scalar_t><<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dy.const_data_ptr<scalar_t>(), strides_of(dy), x.const_data_ptr<scalar_t>(), strides_of(x), g.in_h, g.in_w,
        g.out_h, g.out_w, g.batch, ptr.const_data_ptr<int64_t>(), g.out_channels, taps.const_data_ptr<int32_t>(),
        nnz, static_cast<int>(g.kernel_h), static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h),
        static_cast<int>(g.stride_w), static_cast<int>(g.pad_h), static_cast<int>(g.pad_w),
        grad_values.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_values;
}

at::Tensor sparse_linear_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                              const at::Tensor& col_order, const std::optional<at::Tensor>& bias) {
  (void)col_ptr, (void)col_taps, (void)col_order;  // for the backward pass
  return sparse_linear_via(&sparse_conv2d_into_cuda, input, values, row_ptr, row_taps, bias, at::kCUDA);
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cuda);
  m.impl("sparse_conv2d_backward_weight", &sparse_conv2d_backward_weight_cuda);
}

}  // namespace graspext::ops
