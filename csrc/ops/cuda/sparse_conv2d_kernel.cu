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
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

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
//
// The grid runs the rows fastest: the blocks resident at one time are all rows of a few (y, tile) slices, so an
// input slice that several rows read at a tap stays in L2 between them (a tile of the input, reused across the
// output channels that share it). Within a slice, the rows go longest first (`row_order`, Sputnik's row swizzle),
// so that no long row is left over for the last wave. With kVec = 4 each thread owns groups of four consecutive
// samples of one pixel and moves them with one vector load or store (the batch is innermost: 16 bytes of float32,
// 8 of bfloat16); kVec = 1 is the fallback for batches not a multiple of four and unaligned views.
constexpr int kGatherThreads = 128;
constexpr int kGatherPerThread = 4;

// kVec consecutive elements, loaded or stored as one aligned access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename scalar_t, bool kTransposed, int kVec>
__global__ void __launch_bounds__(kGatherThreads) gather_kernel(
    const scalar_t* __restrict__ src, Strides ss, int src_h, int src_w, scalar_t* __restrict__ dst, Strides ds,
    int dst_w, int batch, const int64_t* __restrict__ ptr, const int32_t* __restrict__ taps,
    const int32_t* __restrict__ order, const int32_t* __restrict__ row_order, int64_t rows,
    const scalar_t* __restrict__ values, const scalar_t* __restrict__ bias, int64_t nnz, int64_t taps_per_row, int kh,
    int kw, int stride_h, int stride_w, int pad_h, int pad_w) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, kVec>;
  constexpr int kGroups = kGatherPerThread / kVec;  // groups of kVec samples per thread
  __shared__ int64_t entry_offset[kGatherThreads];
  __shared__ int entry_column[kGatherThreads];
  __shared__ acc_t entry_value[kGatherThreads];
  const int64_t row = row_order[blockIdx.x];
  CUDA_KERNEL_ASSERT(0 <= row && row < rows);
  const int y = blockIdx.y;
  const int tile = blockIdx.z * kGatherThreads * kGatherPerThread;
  int x[kGroups], n[kGroups];
  acc_t acc[kGroups][kVec];
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    // batch % kVec == 0, so the group's samples n .. n + kVec - 1 share the pixel x.
    const int i = tile + (k * kGatherThreads + static_cast<int>(threadIdx.x)) * kVec;
    x[k] = i / batch;
    n[k] = i - x[k] * batch;
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[k][j] = bias ? static_cast<acc_t>(bias[row]) : acc_t(0);
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
      for (int k = 0; k < kGroups; ++k) {
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
        if (inside && x[k] < dst_w) {
          const pack_t p = *reinterpret_cast<const pack_t*>(src + offset + sx * ss.pixel + n[k]);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc[k][q] += v * static_cast<acc_t>(p.v[q]);
        }
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int k = 0; k < kGroups; ++k) {
    if (x[k] < dst_w) {  // x < dst_w <=> the group lies inside the row's dst_w * batch positions
      pack_t out;
#pragma unroll
      for (int q = 0; q < kVec; ++q) out.v[q] = static_cast<scalar_t>(acc[k][q]);
      *reinterpret_cast<pack_t*>(dst + row * ds.channel + y * ds.row + x[k] * ds.pixel + n[k]) = out;
    }
  }
}

// Packs are at most 16 bytes (the widest load): float64 always takes the scalar kernels.
template <typename scalar_t, int kVec>
constexpr bool kPacks = sizeof(scalar_t) * kVec <= 16;

// Whether kVec-wide accesses along the batch are aligned in these tensors: the batch a multiple of kVec, every
// other stride too (but that of a dimension of size 1, never stepped: a linear layer's 1x1 image), and the data
// pointers aligned to the pack (an offset view may not be).
template <typename scalar_t, int kVec>
bool packs_fit(int64_t batch, std::initializer_list<const at::Tensor*> tensors) {
  static_assert(kPacks<scalar_t, kVec>);
  if (batch % kVec) return false;
  for (const auto* t : tensors) {
    for (int d = 1; d < 4; ++d) {
      if (t->size(d) > 1 && t->stride(d) % kVec) return false;
    }
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (sizeof(scalar_t) * kVec)) return false;
  }
  return true;
}

// partial[band, e] = sum over output rows y of the band, pixels x and samples n of
// grad_output[o, y, x, n] * input[c, sy, sx, n]; one warp per (band, entry), its lanes on consecutive samples
// (kVec at a time where packs fit). `partial` is in acc_t. Consecutive warps take consecutive entries of one
// band: mostly one row o, so the band's grad_output slice is read from L2 once per row, not once per entry.
template <typename scalar_t, int kVec, typename acc_t = at::opmath_type<scalar_t>>
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
        for (int64_t n = lane * kVec; n < batch; n += 32 * kVec) {  // batch % kVec == 0
          const auto gp = *reinterpret_cast<const Pack<scalar_t, kVec>*>(g + n);
          const auto pp = *reinterpret_cast<const Pack<scalar_t, kVec>*>(p + n);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc += static_cast<acc_t>(gp.v[q]) * static_cast<acc_t>(pp.v[q]);
        }
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
  constexpr int64_t kTile = kGatherThreads * kGatherPerThread;
  const int64_t tiles = (positions + kTile - 1) / kTile;
  TORCH_CHECK(dst_h <= 65535 && tiles <= 65535 && positions <= std::numeric_limits<int>::max() / 2,
              "sparse_conv2d (CUDA): the output height must be at most 65535 and its width x batch at most ",
              65535 * kTile, "; got ", dst_h, " and ", positions);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(dst_h), static_cast<unsigned>(tiles));
  const auto row_order = rows_by_length(ptr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "sparse_conv2d_gather_cuda", [&] {
    const auto launch = [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      gather_kernel<scalar_t, kTransposed, kVec><<<grid, kGatherThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          src.const_data_ptr<scalar_t>(), strides_of(src), static_cast<int>(src_h), static_cast<int>(src_w),
          dst.data_ptr<scalar_t>(), strides_of(dst), static_cast<int>(dst_w), static_cast<int>(g.batch),
          ptr.const_data_ptr<int64_t>(), taps.const_data_ptr<int32_t>(),
          order ? order->const_data_ptr<int32_t>() : nullptr, row_order.const_data_ptr<int32_t>(), rows,
          values.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
          values.numel(), (kTransposed ? g.out_channels : g.in_channels) * g.kernel_h * g.kernel_w,
          static_cast<int>(g.kernel_h), static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h),
          static_cast<int>(g.stride_w), static_cast<int>(g.pad_h), static_cast<int>(g.pad_w));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (kPacks<scalar_t, 4>) {
      if (packs_fit<scalar_t, 4>(g.batch, {&src, &dst})) return launch(std::integral_constant<int, 4>());
    }
    launch(std::integral_constant<int, 1>());
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
    const auto launch = [&](auto vec) {
      sddmm_kernel<scalar_t, decltype(vec)::value>
          <<<blocks, kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
              dy.const_data_ptr<scalar_t>(), strides_of(dy), x.const_data_ptr<scalar_t>(), strides_of(x), g.in_h,
              g.in_w, g.out_h, g.out_w, g.batch, ptr.const_data_ptr<int64_t>(), g.out_channels,
              taps.const_data_ptr<int32_t>(), nnz, g.in_channels * g.kernel_h * g.kernel_w, bands, rows_per_band,
              static_cast<int>(g.kernel_h), static_cast<int>(g.kernel_w), static_cast<int>(g.stride_h),
              static_cast<int>(g.stride_w), static_cast<int>(g.pad_h), static_cast<int>(g.pad_w),
              partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if constexpr (kPacks<scalar_t, 4>) {
      if (packs_fit<scalar_t, 4>(g.batch, {&dy, &x})) return launch(std::integral_constant<int, 4>());
    }
    launch(std::integral_constant<int, 1>());
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
