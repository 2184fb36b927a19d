#include "ops/sparse_conv2d.h"

#include <torch/library.h>

namespace graspext::ops {

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
  if (!ptr.device().is_cpu()) return;  // the CUDA kernels check the same on the device
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

void check_values(const at::Tensor& values, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(values.dim() == 1, "values must be a 1-D tensor of the kept weights, got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), "values has dtype ", values.scalar_type(), " but ",
              like_name, " has ", like.scalar_type(), "; they must match");
  TORCH_CHECK(values.device() == like.device(), "values is on ", values.device(), " but ", like_name, " is on ",
              like.device());
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
