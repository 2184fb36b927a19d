// CPU driver of the sparse convolution ops: checks, batch-innermost layouts, stride/padding maps, threading,
// and the choice of SIMD kernels (isa/) by what this CPU supports.
#include <ATen/Dispatch.h>
#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/util/env.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "ops/cpu/sparse_conv2d_kernels.h"
#include "ops/sparse_conv2d.h"

namespace graspext::ops {
namespace {

using cpu::SparseConvKernels;

bool cpu_supports(const SparseConvKernels* k) {
  if (k == nullptr) return false;
#if defined(__x86_64__) && defined(__GNUC__)
  const std::string isa = k->isa;
  // GCC's checks also require the OS to save the wider registers (XCR0), not only the CPUID bits.
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  if (isa == "avx512_bf16") return avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  if (isa == "avx512") return avx512;
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return true;
}

std::vector<const SparseConvKernels*> supported_kernels() {  // best first
  std::vector<const SparseConvKernels*> out;
  for (const auto* k :
       {cpu::avx512_bf16_kernels(), cpu::avx512_kernels(), cpu::avx2_kernels(), cpu::baseline_kernels()}) {
    if (cpu_supports(k)) out.push_back(k);
  }
  return out;
}

const SparseConvKernels* select_kernels(const std::string& isa) {
  std::string names;
  for (const auto* k : supported_kernels()) {
    if (isa == k->isa) return k;
    names += names.empty() ? k->isa : std::string(", ") + k->isa;
  }
  TORCH_CHECK(false, "isa must be one this CPU supports (", names, "), got '", isa, "'");
}

std::atomic<const SparseConvKernels*>& active_kernels() {
  static std::atomic<const SparseConvKernels*> active = [] {
    // GRASPEXT_CPU_ISA pins a code path (e.g. to compare them); otherwise the widest the CPU runs.
    const auto env = c10::utils::get_env("GRASPEXT_CPU_ISA");
    return env && !env->empty() ? select_kernels(*env) : supported_kernels().front();
  }();
  return active;
}

std::string sparse_cpu_isa(c10::string_view isa) {
  if (!isa.empty()) active_kernels().store(select_kernels(std::string(isa)));
  return active_kernels().load()->isa;
}

cpu::ImageStrides image_strides(const at::Tensor& x) { return {x.stride(1), x.stride(2), x.stride(3)}; }

// map[k * dst + d] = source index of destination d through kernel offset k, or -1 outside the source.
// Forward: source = dst * stride - pad + k. Input gradient (transposed): source = (dst + pad - k) / stride when
// that divides exactly.
std::vector<int32_t> forward_map(int64_t kernel, int64_t dst, int64_t src, int64_t stride, int64_t pad) {
  std::vector<int32_t> map(kernel * dst, -1);
  for (int64_t k = 0; k < kernel; ++k)
    for (int64_t d = 0; d < dst; ++d) {
      const int64_t s = d * stride - pad + k;
      if (s >= 0 && s < src) map[k * dst + d] = static_cast<int32_t>(s);
    }
  return map;
}

std::vector<int32_t> transposed_map(int64_t kernel, int64_t dst, int64_t src, int64_t stride, int64_t pad) {
  std::vector<int32_t> map(kernel * dst, -1);
  for (int64_t k = 0; k < kernel; ++k)
    for (int64_t d = 0; d < dst; ++d) {
      const int64_t num = d + pad - k;
      if (num >= 0 && num % stride == 0 && num / stride < src) map[k * dst + d] = static_cast<int32_t>(num / stride);
    }
  return map;
}

// Whether a map sends every destination row to the same source row through the only kernel row (a 1x1
// kernel at stride 1 without padding): then the kernels skip filtering taps per row.
bool is_identity(const std::vector<int32_t>& map, int64_t kernel, int64_t dst, int64_t src) {
  if (kernel != 1 || dst != src) return false;
  for (int64_t d = 0; d < dst; ++d)
    if (map[d] != d) return false;
  return true;
}

int64_t max_row_nnz(const int64_t* ptr, int64_t rows) {
  int64_t m = 0;
  for (int64_t r = 0; r < rows; ++r) m = std::max(m, ptr[r + 1] - ptr[r]);
  return m;
}

template <typename T>
struct ScratchBuffers {
  std::vector<int64_t> offset;
  std::vector<int32_t> col, entry;
  std::vector<cpu::compute_t<T>> weight;
  explicit ScratchBuffers(int64_t n) : offset(n), col(n), entry(n), weight(n) {}
  cpu::TapScratch<T> view() { return {offset.data(), col.data(), entry.data(), weight.data()}; }
};

template <typename T>
cpu::GatherFn<T> gather_fn(const SparseConvKernels* k) {
  if constexpr (std::is_same_v<T, float>) return k->gather_f32;
  else if constexpr (std::is_same_v<T, cpu::Bf16>) return k->gather_bf16;
  else return k->gather_f64;
}

template <typename T>
cpu::SddmmFn<T> sddmm_fn(const SparseConvKernels* k) {
  if constexpr (std::is_same_v<T, float>) return k->sddmm_f32;
  else if constexpr (std::is_same_v<T, cpu::Bf16>) return k->sddmm_bf16;
  else return k->sddmm_f64;
}

// The kernels' element type for an ATen dtype (the same bits), and the dtype they multiply in: bfloat16
// images take float32 weights and bias and give float32 weight gradients.
template <typename scalar_t>
struct KernelElement {
  using type = scalar_t;
};
template <>
struct KernelElement<at::BFloat16> {
  using type = cpu::Bf16;
};

at::ScalarType compute_dtype(at::ScalarType image_dtype) {
  return image_dtype == at::kBFloat16 ? at::kFloat : image_dtype;
}

template <typename K, typename scalar_t>
const K* kernel_data(const at::Tensor& t) {
  return reinterpret_cast<const K*>(t.const_data_ptr<scalar_t>());
}

// Each entry's tap decoded once per call: the offset of its source channel and its kernel row and column.
struct DecodedTaps {
  std::vector<int64_t> base;
  std::vector<int32_t> r, s;
};

DecodedTaps decode_taps(const at::Tensor& taps, int64_t kernel_h, int64_t kernel_w, int64_t channel_stride) {
  const int64_t nnz = taps.numel();
  const auto* t = taps.const_data_ptr<int32_t>();
  DecodedTaps d{std::vector<int64_t>(nnz), std::vector<int32_t>(nnz), std::vector<int32_t>(nnz)};
  const int64_t khw = kernel_h * kernel_w;
  at::parallel_for(0, nnz, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t c = t[e] / khw;
      const int64_t rs = t[e] - c * khw;
      d.base[e] = c * channel_stride;
      d.r[e] = static_cast<int32_t>(rs / kernel_w);
      d.s[e] = static_cast<int32_t>(rs % kernel_w);
    }
  });
  return d;
}

// Bytes of L2 one block's source pixels may fill: half of this CPU's L2, for the output and the rest.
int64_t l2_budget() {
  static const int64_t budget = [] {
    long l2 = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 > 0 ? std::max<int64_t>(l2 / 2, 128 << 10) : int64_t{512} << 10;
  }();
  return budget;
}

// Shrinks the x block, then the batch chunk, until the source pixels that one block reads across all
// output rows -- src_channels x kernel_h rows of (x_block * stride + kernel_w - 1) pixels -- fit the budget.
// The batch chunk is halved no further than `min_chunk` samples.
template <typename T>
cpu::CacheBlocking cache_blocking(int64_t src_channels, int64_t kernel_h, int64_t kernel_w, int64_t stride_w,
                                  int64_t batch, int64_t dst_w, int64_t min_chunk) {
  cpu::CacheBlocking b{batch, dst_w};
  const auto bytes = [&] {
    return src_channels * kernel_h * (b.x_block * stride_w + kernel_w - 1) * b.batch_chunk *
           static_cast<int64_t>(sizeof(T));
  };
  while (bytes() > l2_budget()) {
    if (b.x_block > 8) {
      b.x_block = (b.x_block + 1) / 2;
    } else if (b.batch_chunk / 2 >= min_chunk) {
      b.batch_chunk /= 2;
    } else {
      break;
    }
  }
  return b;
}

template <typename T>
void run_gather(const cpu::GatherConvArgs<T>& args, int64_t src_channels, int64_t stride_w) {
  const auto* kernels = active_kernels().load();
  const auto fn = gather_fn<T>(kernels);
  const int64_t lanes = kernels->vector_bytes / static_cast<int64_t>(sizeof(T));
  // Chunks stay at least 8 vectors wide where the image is (the register tile spans the batch); a 1-wide
  // image (a linear layer) may go down to 2 vectors, as its tile then has nothing else to span.
  const int64_t min_chunk = (args.dst_w == 1 ? 2 : 8) * lanes;
  const auto blk = cache_blocking<T>(src_channels, args.kernel_h, args.kernel_w, stride_w, args.batch, args.dst_w,
                                     min_chunk);
  const int64_t chunks = (args.batch + blk.batch_chunk - 1) / blk.batch_chunk;
  const int64_t x_blocks = (args.dst_w + blk.x_block - 1) / blk.x_block;
  const int64_t scratch = max_row_nnz(args.row_ptr, args.dst_rows);
  // Contiguous item ranges per thread: each thread sweeps its own blocks, all rows of each.
  at::parallel_for(0, chunks * args.dst_h * x_blocks * args.dst_rows, 1, [&](int64_t begin, int64_t end) {
    ScratchBuffers<T> buffers(scratch);
    fn(args, blk, begin, end, buffers.view());
  });
}

// A batch-innermost image (batch stride 1) and its [N, C, H, W] sizes but the batch.
struct Image {
  const at::Tensor& data;
  int64_t channels, h, w;
};

// The gather product (GatherConvArgs) of src into dst through the index (ptr, tap_index, values in its order).
// `block_stride_w` is the source columns per destination column that cache blocking assumes.
void gather_product(const Image& src, const Image& dst, int64_t batch, int64_t kernel_h, int64_t kernel_w,
                    const at::Tensor& ptr, const at::Tensor& tap_index, const at::Tensor& values,
                    const at::Tensor& bias, const std::vector<int32_t>& row_map, const std::vector<int32_t>& col_map,
                    int64_t col_step, int64_t block_stride_w) {
  const auto taps = decode_taps(tap_index, kernel_h, kernel_w, src.data.stride(1));
  const bool rows_direct = is_identity(row_map, kernel_h, dst.h, src.h);
  const auto compute = compute_dtype(src.data.scalar_type());
  const auto v = values.to(compute).contiguous();
  const auto b = bias.defined() ? bias.to(compute).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, src.data.scalar_type(), "sparse_conv2d_gather_cpu", [&] {
    using K = typename KernelElement<scalar_t>::type;
    using C = cpu::compute_t<K>;
    cpu::GatherConvArgs<K> args{batch,
                                src.h,
                                src.w,
                                dst.channels,
                                dst.h,
                                dst.w,
                                kernel_h,
                                kernel_w,
                                kernel_data<K, scalar_t>(src.data),
                                reinterpret_cast<K*>(dst.data.data_ptr<scalar_t>()),
                                image_strides(src.data),
                                image_strides(dst.data),
                                ptr.const_data_ptr<int64_t>(),
                                taps.base.data(),
                                taps.r.data(),
                                taps.s.data(),
                                v.const_data_ptr<C>(),
                                b.defined() ? b.const_data_ptr<C>() : nullptr,
                                row_map.data(),
                                col_map.data(),
                                rows_direct,
                                col_step};
    run_gather(args, src.channels, block_stride_w);
  });
}

// Writes the forward product into `out`, any [N, C, H, W] tensor whose batch has stride 1 (checked arguments).
at::Tensor& sparse_conv2d_into(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                               const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                               const ConvGeometry& g, at::Tensor& out) {
  if (out.numel() == 0) return out;
  const auto x = batch_innermost(input);
  const auto row_map = forward_map(g.kernel_h, g.out_h, g.in_h, g.stride_h, g.pad_h);
  const auto col_map = forward_map(g.kernel_w, g.out_w, g.in_w, g.stride_w, g.pad_w);
  gather_product({x, g.in_channels, g.in_h, g.in_w}, {out, g.out_channels, g.out_h, g.out_w}, g.batch, g.kernel_h,
                 g.kernel_w, row_ptr, row_taps, values, bias ? *bias : at::Tensor(), row_map, col_map, g.stride_w,
                 g.stride_w);
  return out;
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                             const at::Tensor& col_order, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding) {
  (void)col_ptr, (void)col_taps, (void)col_order;  // for the backward pass
  return sparse_conv2d_via(&sparse_conv2d_into, input, values, row_ptr, row_taps, bias, weight_shape, stride, padding,
                           at::kCPU);
}

at::Tensor sparse_conv2d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& values,
                                            const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                            const at::Tensor& col_order, at::IntArrayRef weight_shape,
                                            at::IntArrayRef input_shape, at::IntArrayRef stride,
                                            at::IntArrayRef padding) {
  const auto g = check_backward_input_args(grad_output, values, col_ptr, col_taps, col_order, weight_shape,
                                           input_shape, stride, padding, at::kCPU);
  auto grad_input = empty_batch_innermost(g.batch, g.in_channels, g.in_h, g.in_w, grad_output.options());
  if (grad_input.numel() == 0) return grad_input;
  const auto dy = batch_innermost(grad_output);
  // The values in the order of the input-channel index, gathered once per call.
  const auto v = values.index_select(0, col_order);
  const auto row_map = transposed_map(g.kernel_h, g.in_h, g.out_h, g.stride_h, g.pad_h);
  const auto col_map = transposed_map(g.kernel_w, g.in_w, g.out_w, g.stride_w, g.pad_w);
  // The transposed map is affine only at stride 1 (x + pad - s); each input position then reads about
  // kernel_w / stride_w output pixels per kernel row, so blocks are sized for stride 1.
  gather_product({dy, g.out_channels, g.out_h, g.out_w}, {grad_input, g.in_channels, g.in_h, g.in_w}, g.batch,
                 g.kernel_h, g.kernel_w, col_ptr, col_taps, v, at::Tensor(), row_map, col_map,
                 g.stride_w == 1 ? 1 : 0, 1);
  return grad_input;
}

// Splits rows into `parts` contiguous ranges with about equal numbers of entries.
std::vector<int64_t> balanced_row_ranges(const int64_t* ptr, int64_t rows, int64_t parts) {
  std::vector<int64_t> bounds{0};
  const int64_t nnz = ptr[rows];
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = (nnz * p + parts - 1) / parts;
    const int64_t row = std::lower_bound(ptr, ptr + rows + 1, target) - ptr;
    bounds.push_back(std::clamp(row, bounds.back(), rows));
  }
  bounds.push_back(rows);
  return bounds;
}

at::Tensor sparse_conv2d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& row_ptr, const at::Tensor& row_taps,
                                             at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                             at::IntArrayRef padding) {
  const auto g =
      check_backward_weight_args(grad_output, input, row_ptr, row_taps, weight_shape, stride, padding, at::kCPU);
  const int64_t nnz = row_taps.numel();
  auto grad_values = at::zeros({nnz}, input.options().dtype(compute_dtype(input.scalar_type())));
  if (nnz == 0 || g.batch == 0) return grad_values;
  const auto dy = batch_innermost(grad_output);
  const auto x = batch_innermost(input);
  const auto row_map = forward_map(g.kernel_h, g.out_h, g.in_h, g.stride_h, g.pad_h);
  const auto col_map = forward_map(g.kernel_w, g.out_w, g.in_w, g.stride_w, g.pad_w);
  const auto* ptr = row_ptr.const_data_ptr<int64_t>();
  const auto* kernels = active_kernels().load();
  const auto ranges = balanced_row_ranges(ptr, g.out_channels, at::get_num_threads());
  const int64_t scratch = max_row_nnz(ptr, g.out_channels);
  const auto taps = decode_taps(row_taps, g.kernel_h, g.kernel_w, x.stride(1));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "sparse_conv2d_backward_weight_cpu", [&] {
    using K = typename KernelElement<scalar_t>::type;
    using C = cpu::compute_t<K>;
    cpu::SddmmConvArgs<K> args{g.batch,
                               g.in_h,
                               g.in_w,
                               g.out_h,
                               g.out_w,
                               g.kernel_h,
                               g.kernel_w,
                               kernel_data<K, scalar_t>(dy),
                               kernel_data<K, scalar_t>(x),
                               image_strides(dy),
                               image_strides(x),
                               ptr,
                               taps.base.data(),
                               taps.r.data(),
                               taps.s.data(),
                               row_map.data(),
                               col_map.data(),
                               is_identity(row_map, g.kernel_h, g.out_h, g.in_h),
                               g.stride_w,
                               grad_values.data_ptr<C>()};
    const auto fn = sddmm_fn<K>(kernels);
    // Partial sums per entry: one vector of the compute type.
    const int64_t lanes = kernels->vector_bytes / static_cast<int64_t>(sizeof(C));
    // The whole batch per block: every extra chunk is another pass over the per-entry partial sums.
    const auto blk = cache_blocking<K>(g.in_channels, g.kernel_h, g.kernel_w, g.stride_w, g.batch, g.out_w, g.batch);
    const int64_t parts = static_cast<int64_t>(ranges.size()) - 1;
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      ScratchBuffers<K> buffers(scratch);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t rows_nnz = ptr[ranges[p + 1]] - ptr[ranges[p]];
        if (rows_nnz == 0) continue;
        // One vector of partial sums per entry, aligned to the vector size (64 bytes covers every ISA).
        std::vector<C> partial(rows_nnz * lanes + 64 / sizeof(C));
        auto* aligned = reinterpret_cast<C*>((reinterpret_cast<uintptr_t>(partial.data()) + 63) & ~uintptr_t{63});
        fn(args, blk, ranges[p], ranges[p + 1], buffers.view(), aligned);
      }
    });
  });
  return grad_values;
}

at::Tensor sparse_linear_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& row_taps, const at::Tensor& col_ptr, const at::Tensor& col_taps,
                             const at::Tensor& col_order, const std::optional<at::Tensor>& bias) {
  (void)col_ptr, (void)col_taps, (void)col_order;  // for the backward pass
  return sparse_linear_via(&sparse_conv2d_into, input, values, row_ptr, row_taps, bias, at::kCPU);
}

// Autocast on the CPU. bfloat16: float32 images are cast to bfloat16 and the float32 values and bias are read
// as they are (the kernels multiply in float32), so autograd gives float32 weights float32 gradients without a
// cast of the weights; float64 stays float64. float16 (which the CPU kernels lack): everything in float32 (the
// Python wrappers warn once), rather than a silent change of precision.
struct CpuAutocastCasts {
  at::Tensor input, values;
  std::optional<at::Tensor> bias;
};

CpuAutocastCasts cpu_autocast_casts(const at::Tensor& input, const at::Tensor& values,
                                    const std::optional<at::Tensor>& bias) {
  const auto dtype = at::autocast::get_lower_precision_fp_from_device_type(c10::DeviceType::CPU);
  if (dtype == at::kBFloat16) return {at::autocast::cached_cast(dtype, input, c10::DeviceType::CPU), values, bias};
  const auto to_float = [](const at::Tensor& t) {
    return at::isReducedFloatingType(t.scalar_type()) ? t.to(at::kFloat) : t;
  };
  return {to_float(input), to_float(values), bias ? std::optional<at::Tensor>(to_float(*bias)) : std::nullopt};
}

at::Tensor sparse_conv2d_autocast_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                      const at::Tensor& row_taps, const at::Tensor& col_ptr,
                                      const at::Tensor& col_taps, const at::Tensor& col_order,
                                      const std::optional<at::Tensor>& bias, at::IntArrayRef weight_shape,
                                      at::IntArrayRef stride, at::IntArrayRef padding) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("graspext::sparse_conv2d", "")
                             .typed<decltype(sparse_conv2d_autocast_cpu)>();
  const auto c = cpu_autocast_casts(input, values, bias);
  return op.call(c.input, c.values, row_ptr, row_taps, col_ptr, col_taps, col_order, c.bias, weight_shape, stride,
                 padding);
}

at::Tensor sparse_linear_autocast_cpu(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                      const at::Tensor& row_taps, const at::Tensor& col_ptr,
                                      const at::Tensor& col_taps, const at::Tensor& col_order,
                                      const std::optional<at::Tensor>& bias) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("graspext::sparse_linear", "")
                             .typed<decltype(sparse_linear_autocast_cpu)>();
  const auto c = cpu_autocast_casts(input, values, bias);
  return op.call(c.input, c.values, row_ptr, row_taps, col_ptr, col_taps, col_order, c.bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, AutocastCPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_autocast_cpu);
  m.impl("sparse_linear", &sparse_linear_autocast_cpu);
}

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_linear", &sparse_linear_cpu);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cpu);
  m.impl("sparse_conv2d_backward_weight", &sparse_conv2d_backward_weight_cpu);
}

// The instruction set the CPU kernels use: returns the active one; a non-empty `isa` ("avx512_bf16", "avx512",
// "avx2", "baseline") selects it first, so that tests and benchmarks can run every code path on one machine.
TORCH_LIBRARY_FRAGMENT(graspext, m) { m.def("sparse_cpu_isa(str isa=\"\") -> str", &sparse_cpu_isa); }

}  // namespace graspext::ops
