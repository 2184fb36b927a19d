#include "ops/sparse_conv2d.h"

#include <ATen/Functions.h>
#include <c10/util/intrusive_ptr.h>

#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace graspext::ops {
namespace {

// Device index structures already validated, as long as their tensors live unchanged: a full check costs a
// host synchronisation, and a module's index buffers are built once and then passed on every call. An entry
// holds weak references, so a freed tensor (whose address a new one may reuse) never matches, and the version
// counters, so an in-place change is checked again. The CUDA kernels also assert their bounds.
class ValidatedIndexCache {
 public:
  bool contains(const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor* order, int64_t taps_per_row) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& e : entries_) {
      if (e.taps_per_row == taps_per_row && e.ptr.matches(ptr) && e.taps.matches(taps) &&
          (order ? e.order.matches(*order) : !e.order.defined)) {
        return true;
      }
    }
    return false;
  }

  void add(const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor* order, int64_t taps_per_row) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= kCapacity) {
      entries_.erase(std::remove_if(entries_.begin(), entries_.end(), [](const Entry& e) { return e.expired(); }),
                     entries_.end());
      if (entries_.size() >= kCapacity) entries_.clear();
    }
    entries_.push_back({Seen(ptr), Seen(taps), order ? Seen(*order) : Seen(), taps_per_row, at::Tensor()});
  }

  // The rows of `ptr` longest first: computed on the first call for a validated index and kept with it.
  at::Tensor rows_by_length(const at::Tensor& ptr) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& e : entries_) {
      if (e.ptr.matches(ptr)) {
        if (!e.rows_by_length.defined()) e.rows_by_length = longest_first(ptr);
        return e.rows_by_length;
      }
    }
    return longest_first(ptr);  // not validated through the cache: computed for this call only
  }

 private:
  struct Seen {
    Seen() = default;
    explicit Seen(const at::Tensor& t)
        : impl(t.getIntrusivePtr()), data(t.const_data_ptr()), numel(t.numel()), version(t._version()),
          defined(true) {}
    bool matches(const at::Tensor& t) const {
      return !impl.expired() && impl._unsafe_get_target() == t.unsafeGetTensorImpl() &&
             data == t.const_data_ptr() && numel == t.numel() && version == t._version();
    }
    using Impl = c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl{Impl()};
    const void* data = nullptr;
    int64_t numel = 0;
    uint32_t version = 0;
    bool defined = false;
  };
  static at::Tensor longest_first(const at::Tensor& ptr) {
    return at::argsort(at::diff(ptr), /*stable=*/true, /*dim=*/0, /*descending=*/true).to(at::kInt);
  }

  struct Entry {
    Seen ptr, taps, order;
    int64_t taps_per_row;
    at::Tensor rows_by_length;  // on the index's device; undefined until asked for
    bool expired() const {
      return ptr.impl.expired() || taps.impl.expired() || (order.defined && order.impl.expired());
    }
  };
  static constexpr size_t kCapacity = 512;
  std::mutex mutex_;
  std::vector<Entry> entries_;
};

ValidatedIndexCache& validated_device_indices() {
  // Never destroyed: its entries hold device tensors, which must not be freed after the CUDA runtime at exit.
  static auto* cache = new ValidatedIndexCache;
  return *cache;
}

}  // namespace

at::Tensor rows_by_length(const at::Tensor& ptr) { return validated_device_indices().rows_by_length(ptr); }

ConvGeometry make_conv_geometry(at::IntArrayRef input_shape, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                at::IntArrayRef padding) {
  TORCH_CHECK(input_shape.size() == 4, "input must be 4-D (N, C, H, W), got shape ", input_shape);
  TORCH_CHECK(weight_shape.size() == 4, "weight_shape must be [out_channels, in_channels, kernel_h, kernel_w], got ",
              weight_shape);
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride must be two integers >= 1, got ",
              stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding must be two integers >= 0, got ",
              padding);
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(weight_shape[i] >= 1 || (i == 0 && weight_shape[i] == 0), "weight_shape must be positive, got ",
                weight_shape);
  }
  TORCH_CHECK(input_shape[1] == weight_shape[1], "input has ", input_shape[1],
              " channels but the weight expects in_channels = ", weight_shape[1]);
  ConvGeometry g{};
  g.batch = input_shape[0];
  g.in_channels = input_shape[1];
  g.in_h = input_shape[2];
  g.in_w = input_shape[3];
  g.out_channels = weight_shape[0];
  g.kernel_h = weight_shape[2];
  g.kernel_w = weight_shape[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  const int64_t span_h = g.in_h + 2 * g.pad_h - g.kernel_h;
  const int64_t span_w = g.in_w + 2 * g.pad_w - g.kernel_w;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "input of size ", g.in_h, "x", g.in_w, " with padding ", padding,
              " is smaller than the kernel ", g.kernel_h, "x", g.kernel_w);
  g.out_h = span_h / g.stride_h + 1;
  g.out_w = span_w / g.stride_w + 1;
  return g;
}

void check_sparse_index(const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor* order, int64_t rows,
                        int64_t taps_per_row, int64_t nnz, const char* ptr_name, const char* taps_name,
                        const char* order_name) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.numel() == rows + 1, ptr_name,
              " must be an int64 vector of ", rows + 1, " row offsets, got ", ptr.scalar_type(), " of shape ",
              ptr.sizes());
  TORCH_CHECK(taps.scalar_type() == at::kInt && taps.dim() == 1 && taps.numel() == nnz, taps_name,
              " must be an int32 vector of ", nnz, " taps (one per value), got ", taps.scalar_type(),
              " of shape ", taps.sizes());
  if (order) {
    TORCH_CHECK(order->scalar_type() == at::kInt && order->dim() == 1 && order->numel() == nnz, order_name,
                " must be an int32 vector of ", nnz, " value positions, got ", order->scalar_type(), " of shape ",
                order->sizes());
  }
  if (!ptr.device().is_cpu()) {
    if (validated_device_indices().contains(ptr, taps, order, taps_per_row)) return;
    // The same checks as below, as tensor ops on the device, with one copy of the verdicts to the host.
    const auto outside = [&](const at::Tensor& t, int64_t end) {  // any value outside [0, end), as int64
      return t.numel() ? at::logical_or(at::lt(t, 0), at::ge(t, end)).any().to(at::kLong)
                       : at::zeros({}, ptr.options());
    };
    const auto bad = at::stack({at::logical_or(at::ne(ptr[0], 0), at::ne(ptr[rows], nnz)).to(at::kLong),
                                at::lt(at::diff(ptr), 0).any().to(at::kLong), outside(taps, taps_per_row),
                                order ? outside(*order, nnz) : at::zeros({}, ptr.options())})
                         .cpu();
    const auto* b = bad.const_data_ptr<int64_t>();
    TORCH_CHECK(!b[0], ptr_name, " must start at 0 and end at the number of values (", nnz, ")");
    TORCH_CHECK(!b[1], ptr_name, " must be non-decreasing");
    TORCH_CHECK(!b[2], taps_name, " has a tap outside [0, ", taps_per_row, ")");
    TORCH_CHECK(!b[3], order_name, " has a position outside [0, ", nnz, ")");
    validated_device_indices().add(ptr, taps, order, taps_per_row);
    return;
  }
  const auto* p = ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(ptr.is_contiguous() && taps.is_contiguous(), ptr_name, " and ", taps_name, " must be contiguous");
  TORCH_CHECK(p[0] == 0 && p[rows] == nnz, ptr_name, " must start at 0 and end at the number of values (", nnz,
              "), got ", p[0], " and ", p[rows]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(p[r] <= p[r + 1], ptr_name, " must be non-decreasing; it falls at row ", r);
  }
  // One pass over the indices: a bad index would read outside the tensors, so it is never trusted.
  const auto* t = taps.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK(t[e] >= 0 && t[e] < taps_per_row, taps_name, "[", e, "] = ", t[e], " is outside [0, ",
                taps_per_row, ")");
  }
  if (order) {
    TORCH_CHECK(order->is_contiguous(), order_name, " must be contiguous");
    const auto* o = order->const_data_ptr<int32_t>();
    for (int64_t e = 0; e < nnz; ++e) {
      TORCH_CHECK(o[e] >= 0 && o[e] < nnz, order_name, "[", e, "] = ", o[e], " is outside [0, ", nnz, ")");
    }
  }
}

namespace {
// bfloat16 images on the CPU multiply in float32: their weights and bias may be float32 (autocast's master
// weights, read without a cast) or bfloat16. Otherwise the weights' dtype is the image's.
bool weight_dtype_fits(at::ScalarType weight, const at::Tensor& image) {
  return weight == image.scalar_type() ||
         (image.scalar_type() == at::kBFloat16 && image.is_cpu() && weight == at::kFloat);
}
}  // namespace

void check_values(const at::Tensor& values, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(values.dim() == 1, "values must be a 1-D tensor of the kept weights, got shape ", values.sizes());
  TORCH_CHECK(weight_dtype_fits(values.scalar_type(), like), "values has dtype ", values.scalar_type(), " but ",
              like_name, " has ", like.scalar_type(), "; they must match",
              like.is_cpu() && like.scalar_type() == at::kBFloat16 ? " (or values be float32)" : "");
  TORCH_CHECK(values.device() == like.device(), "values is on ", values.device(), " but ", like_name, " is on ",
              like.device());
}

void check_image(const at::Tensor& t, const char* name, c10::DeviceType device) {
  TORCH_CHECK(t.dim() == 4, name, " must be 4-D (N, C, H, W), got shape ", t.sizes());
  // Reduced precision accumulates in float32: bfloat16 on both backends, float16 on CUDA only.
  const auto dtype = t.scalar_type();
  const bool cuda = device == c10::DeviceType::CUDA;
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || (dtype == at::kHalf && cuda),
              name, " must be float32, float64 or bfloat16", cuda ? " (or float16)" : "", ", got ", dtype);
  TORCH_CHECK(t.device().type() == device, name, " must be a ", c10::DeviceTypeName(device),
              " tensor here, got ", t.device());
}

namespace {
void check_grad_output_shape(const at::Tensor& grad_output, const ConvGeometry& g) {
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({g.batch, g.out_channels, g.out_h, g.out_w}),
              "grad_output must have shape [", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w,
              "], got ", grad_output.sizes());
}
}  // namespace

ConvGeometry check_forward_args(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                c10::DeviceType device) {
  check_image(input, "input", device);
  const auto g = make_conv_geometry(input.sizes(), weight_shape, stride, padding);
  check_values(values, input, "input");
  check_sparse_index(row_ptr, row_taps, nullptr, g.out_channels, g.in_channels * g.kernel_h * g.kernel_w,
                     values.numel(), "row_ptr", "row_taps", "");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == g.out_channels, "bias must have shape [", g.out_channels,
                "], got ", bias->sizes());
    TORCH_CHECK(weight_dtype_fits(bias->scalar_type(), input), "bias has dtype ", bias->scalar_type(),
                " but input has ", input.scalar_type(), "; they must match");
    TORCH_CHECK(bias->device() == input.device(), "bias is on ", bias->device(), " but input is on ",
                input.device());
  }
  return g;
}

ConvGeometry check_backward_input_args(const at::Tensor& grad_output, const at::Tensor& values,
                                       const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                       const at::Tensor& col_order, at::IntArrayRef weight_shape,
                                       at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                       c10::DeviceType device) {
  check_image(grad_output, "grad_output", device);
  check_values(values, grad_output, "grad_output");
  const auto g = make_conv_geometry(input_shape, weight_shape, stride, padding);
  check_grad_output_shape(grad_output, g);
  check_sparse_index(col_ptr, col_taps, &col_order, g.in_channels, g.out_channels * g.kernel_h * g.kernel_w,
                     values.numel(), "col_ptr", "col_taps", "col_order");
  return g;
}

ConvGeometry check_backward_weight_args(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& row_ptr, const at::Tensor& row_taps,
                                        at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                        at::IntArrayRef padding, c10::DeviceType device) {
  check_image(grad_output, "grad_output", device);
  check_image(input, "input", device);
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output has dtype ",
              grad_output.scalar_type(), " but input has ", input.scalar_type());
  const auto g = make_conv_geometry(input.sizes(), weight_shape, stride, padding);
  check_grad_output_shape(grad_output, g);
  check_sparse_index(row_ptr, row_taps, nullptr, g.out_channels, g.in_channels * g.kernel_h * g.kernel_w,
                     row_taps.numel(), "row_ptr", "row_taps", "");
  return g;
}

at::Tensor empty_batch_innermost(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options) {
  return at::empty_strided({n, c, h, w}, {1, n, w * c * n, c * n}, options);
}

at::Tensor batch_innermost(const at::Tensor& x) {
  if (x.stride(0) == 1 || x.size(0) == 1) return x;
  auto out = empty_batch_innermost(x.size(0), x.size(1), x.size(2), x.size(3), x.options());
  out.copy_(x);
  return out;
}

at::Tensor sparse_conv2d_via(ForwardInto forward_into, const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& row_ptr, const at::Tensor& row_taps,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef weight_shape,
                             at::IntArrayRef stride, at::IntArrayRef padding, c10::DeviceType device) {
  const auto g = check_forward_args(input, values, row_ptr, row_taps, bias, weight_shape, stride, padding, device);
  auto out = empty_batch_innermost(g.batch, g.out_channels, g.out_h, g.out_w, input.options());
  return forward_into(input, values, row_ptr, row_taps, bias, g, out);
}

at::Tensor sparse_linear_via(ForwardInto forward_into, const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& row_ptr, const at::Tensor& row_taps,
                             const std::optional<at::Tensor>& bias, c10::DeviceType device) {
  TORCH_CHECK(input.dim() == 2, "input must be 2-D (N, in_features), got shape ", input.sizes());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 1, "row_ptr must be a vector of out_features + 1 offsets");
  const int64_t n = input.size(0), out_features = row_ptr.numel() - 1;
  const auto image_in = input.unsqueeze(2).unsqueeze(3);
  const auto g = check_forward_args(image_in, values, row_ptr, row_taps, bias, {out_features, input.size(1), 1, 1},
                                    {1, 1}, {0, 0}, device);
  auto out = at::empty_strided({n, out_features}, {1, n}, input.options());
  auto image = out.as_strided({n, out_features, 1, 1}, {1, n, n, n});
  forward_into(image_in, values, row_ptr, row_taps, bias, g, image);
  return out;
}

TORCH_LIBRARY_FRAGMENT(graspext, m) {
  m.def(
      "sparse_conv2d(Tensor input, Tensor values, Tensor row_ptr, Tensor row_taps, Tensor col_ptr, "
      "Tensor col_taps, Tensor col_order, Tensor? bias, int[4] weight_shape, int[2] stride, int[2] padding) "
      "-> Tensor");
  // A linear layer is the convolution of a 1x1 image: [N, in] -> [N, out] (batch-innermost strides); its
  // backward uses the convolution's backward ops on [N, C, 1, 1] views.
  m.def(
      "sparse_linear(Tensor input, Tensor values, Tensor row_ptr, Tensor row_taps, Tensor col_ptr, "
      "Tensor col_taps, Tensor col_order, Tensor? bias) -> Tensor");
  m.def(
      "sparse_conv2d_backward_input(Tensor grad_output, Tensor values, Tensor col_ptr, Tensor col_taps, "
      "Tensor col_order, int[4] weight_shape, int[4] input_shape, int[2] stride, int[2] padding) -> Tensor");
  m.def(
      "sparse_conv2d_backward_weight(Tensor grad_output, Tensor input, Tensor row_ptr, Tensor row_taps, "
      "int[4] weight_shape, int[2] stride, int[2] padding) -> Tensor");
}

}  // namespace graspext::ops
