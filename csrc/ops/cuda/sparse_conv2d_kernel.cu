// CUDA sparse convolution and linear ops (schemas and index layout in ops/sparse_conv2d.h), a first,
// straightforward version: the same batch-innermost layout as the CPU kernels, with consecutive threads on
// consecutive samples so that every load and store of an image is coalesced, and the index walked
// uniformly by a warp (broadcast loads).
//   forward / input gradient: one thread per output value, looping over its row's kept taps;
//   weight gradient: one warp per kept weight, reducing over pixels and samples.
// Indices are validated on the device before use (one host synchronisation per index), as the CPU op
// validates them on every call. Not yet run on a GPU: graspext.nn computes densely on CUDA until it is.

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

// The ops' output layout, as on the CPU: [H, W, C, N] storage for an [N, C, H, W] tensor.
at::Tensor empty_batch_innermost(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options) {
  return at::empty_strided({n, c, h, w}, {1, n, w * c * n, c * n}, options);
}

at::Tensor batch_innermost(const at::Tensor& x) {
  if (x.stride(0) == 1 || x.size(0) == 1) return x;
  auto out = empty_batch_innermost(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  out.copy_(x);
  return out;
}

void check_cuda_image(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor here, got ", t.device());
}

// The host-side checks of check_sparse_index cover shapes and dtypes; the values are checked here.
void check_index_values(const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor* order, int64_t rows,
                        int64_t taps_per_row, int64_t nnz, const char* ptr_name, const char* taps_name,
                        const char* order_name) {
  TORCH_CHECK(ptr.is_cuda() && taps.is_cuda() && (!order || order->is_cuda()), ptr_name, ", ", taps_name,
              " and the values must be on the same CUDA device");
  const auto steps = at::diff(ptr);
  const auto outside = [&](const at::Tensor& t, int64_t end) {  // any value outside [0, end), as int64
    return t.numel() ? at::logical_or(at::lt(t, 0), at::ge(t, end)).any().to(at::kLong)
                     : at::zeros({}, ptr.options());
  };
  auto bad = at::stack({at::logical_or(at::ne(ptr[0], 0), at::ne(ptr[rows], nnz)).to(at::kLong),
                        at::lt(steps, 0).any().to(at::kLong), outside(taps, taps_per_row),
                        order ? outside(*order, nnz) : at::zeros({}, ptr.options())})
                 .cpu();
  const auto* b = bad.const_data_ptr<int64_t>();
  TORCH_CHECK(!b[0], ptr_name, " must start at 0 and end at the number of values (", nnz, ")");
  TORCH_CHECK(!b[1], ptr_name, " must be non-decreasing");
  TORCH_CHECK(!b[2], taps_name, " has a tap outside [0, ", taps_per_row, ")");
  TORCH_CHECK(!b[3], order_name, " has a position outside [0, ", nnz, ")");
}

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

at::Tensor& sparse_conv2d_into_cuda(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                    const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                                    const ConvGeometry& g, at::Tensor& out) {
  check_cuda_image(input, "input");
  check_values(values, input, "input");
  const int64_t khw = g.kernel_h * g.kernel_w;
  check_sparse_index(row_ptr, row_taps, nullptr, g.out_channels, g.in_channels * khw, values.numel(), "row_ptr",
                     "row_taps", "");
  check_index_values(row_ptr, row_taps, nullptr, g.out_channels, g.in_channels * khw, values.numel(), "row_ptr",
                     "row_taps", "");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.out_channels, "bias must have shape [", g.out_channels,
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                "bias must match input's dtype and device");
  }
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
  TORCH_CHECK(input.dim() == 4, "input must be 4-D (N, C, H, W), got shape ", input.sizes());
  const auto g = make_conv_geometry(input.sizes(), weight_shape, stride, padding);
  auto out = empty_batch_innermost(g.batch, g.out_channels, g.out_h, g.out_w, input.options());
  return sparse_conv2d_into_cuda(input, values, row_ptr, row_taps, bias, g, out);
}

at::Tensor sparse_conv2d_backward_input_cuda(const at::Tensor& grad_output, const at::Tensor& values,
                                             const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                             const at::Tensor& col_order, at::IntArrayRef weight_shape,
                                             at::IntArrayRef input_shape, at::IntArrayRef stride,
                                             at::IntArrayRef padding) {
  check_cuda_image(grad_output, "grad_output");
  check_values(values, grad_output, "grad_output");
  const auto g = make_conv_geometry(input_shape, weight_shape, stride, padding);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}),
              "grad_output must have shape [", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w,
              "], got ", grad_output.sizes());
  const int64_t taps_per_row = g.out_channels * g.kernel_h * g.kernel_w;
  check_sparse_index(col_ptr, col_taps, &col_order, g.in_channels, taps_per_row, values.numel(), "col_ptr",
                     "col_taps", "col_order");
  check_index_values(col_ptr, col_taps, &col_order, g.in_channels, taps_per_row, values.numel(), "col_ptr",
                     "col_taps", "col_order");
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
  check_cuda_image(grad_output, "grad_output");
  check_cuda_image(input, "input");
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output has dtype ",
              grad_output.scalar_type(), " but input has ", input.scalar_type());
  const auto g = make_conv_geometry(input.sizes(), weight_shape, stride, padding);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}),
              "grad_output must have shape [", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w,
              "], got ", grad_output.sizes());
  const int64_t nnz = row_taps.numel();
  const int64_t taps_per_row = g.in_channels * g.kernel_h * g.kernel_w;
  check_sparse_index(row_ptr, row_taps, nullptr, g.out_channels, taps_per_row, nnz, "row_ptr", "row_taps", "");
  check_index_values(row_ptr, row_taps, nullptr, g.out_channels, taps_per_row, nnz, "row_ptr", "row_taps", "");
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
  TORCH_CHECK(input.dim() == 2, "input must be 2-D (N, in_features), got shape ", input.sizes());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a vector of out_features + 1 offsets");
  const int64_t n = input.size(0), out_features = row_ptr.numel() - 1;
  const auto g = make_conv_geometry({n, input.size(1), 1, 1}, {out_features, input.size(1), 1, 1}, {1, 1}, {0, 0});
  // [N, out] with the batch innermost: the same storage as the [N, out, 1, 1] image the product writes.
  auto out = at::empty_strided({n, out_features}, {1, n}, input.options());
  auto image = out.as_strided({n, out_features, 1, 1}, {1, n, n, n});
  sparse_conv2d_into_cuda(input.unsqueeze(2).unsqueeze(3), values, row_ptr, row_taps, bias, g, image);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cuda);
  m.impl("sparse_conv2d_backward_weight", &sparse_conv2d_backward_weight_cuda);
}

}  // namespace graspext::ops
