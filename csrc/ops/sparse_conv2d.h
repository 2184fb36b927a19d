#pragma once
// Shared by every backend of the sparse convolution ops: the geometry and the argument checks.
//
// The weight [out, in, kh, kw] is stored as its kept values only, in two index structures built once per
// mask (graspext/nn/pattern.py):
//   by output channel (CSR): row_ptr [out + 1] int64, row_taps [nnz] int32, tap = (c * kh + r) * kw + s;
//     values[e] belongs to entry e of this order;
//   by input channel: col_ptr [in + 1] int64, col_taps [nnz] int32, tap = (o * kh + r) * kw + s, and
//     col_order [nnz] int32, the position in `values` of each of these entries.
// Activations are logically NCHW; the kernels work batch-innermost (batch stride 1) and return NCHW-shaped
// tensors with [H, W, C, N] storage, which the next sparse layer consumes without a copy.

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>

namespace graspext::ops {

struct ConvGeometry {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w;
};

// Checks the shapes, strides and paddings and returns the geometry; `input_shape` is NCHW.
ConvGeometry make_conv_geometry(at::IntArrayRef input_shape, at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                at::IntArrayRef padding);

// Checks one index structure against the number of rows, the number of taps per row and the values.
void check_sparse_index(const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor* order, int64_t rows,
                        int64_t taps_per_row, int64_t nnz, const char* ptr_name, const char* taps_name,
                        const char* order_name);

// The rows of a device index (the `ptr` of check_sparse_index) ordered longest first, ties by row, as int32 on
// its device: the CUDA kernels' block order. Kept with the validated index, so computed once per index.
at::Tensor rows_by_length(const at::Tensor& ptr);

void check_values(const at::Tensor& values, const at::Tensor& like, const char* like_name);

// A 4-D float32, float64 or bfloat16 (CUDA also float16) tensor on a device of type `device` (the backend checking
// it).
void check_image(const at::Tensor& t, const char* name, c10::DeviceType device);

// The argument checks of each op, shared by the backends; each returns the geometry.
ConvGeometry check_forward_args(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                c10::DeviceType device);
ConvGeometry check_backward_input_args(const at::Tensor& grad_output, const at::Tensor& values,
                                       const at::Tensor& col_ptr, const at::Tensor& col_taps,
                                       const at::Tensor& col_order, at::IntArrayRef weight_shape,
                                       at::IntArrayRef input_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                       c10::DeviceType device);
ConvGeometry check_backward_weight_args(const at::Tensor& grad_output, const at::Tensor& input,
                                        const at::Tensor& row_ptr, const at::Tensor& row_taps,
                                        at::IntArrayRef weight_shape, at::IntArrayRef stride,
                                        at::IntArrayRef padding, c10::DeviceType device);

// An NCHW-shaped tensor stored batch-innermost, as the ops write their outputs: [H, W, C, N] in memory, so that
// one pixel's channels and samples are contiguous. (A [C, H, W, N] order would put the same pixel of every
// channel a multiple of H*W*N*4 bytes apart: for CIFAR shapes a multiple of 128 KiB, so a CPU block's pixels
// of all channels would compete for the same few L2 sets.) It is also the layout in which torch's BatchNorm
// and pooling kernels run natively (graspext.nn.layout). Allocated with these strides rather than permuted,
// so it is no view and callers may modify it in place (e.g. ReLU(inplace=True)).
at::Tensor empty_batch_innermost(int64_t n, int64_t c, int64_t h, int64_t w, const at::TensorOptions& options);

// A backend's forward product into `out` (an [N, C, H, W] tensor whose batch has stride 1), arguments checked.
using ForwardInto = at::Tensor& (*)(const at::Tensor& input, const at::Tensor& values, const at::Tensor& row_ptr,
                                    const at::Tensor& row_taps, const std::optional<at::Tensor>& bias,
                                    const ConvGeometry& g, at::Tensor& out);

// sparse_conv2d through a backend's forward product: checks the arguments and writes a new [H, W, C, N] output.
at::Tensor sparse_conv2d_via(ForwardInto forward_into, const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& row_ptr, const at::Tensor& row_taps,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef weight_shape,
                             at::IntArrayRef stride, at::IntArrayRef padding, c10::DeviceType device);

// sparse_linear through a backend's forward product: the input [N, in] is an [N, in, 1, 1] image, and the
// output [N, out] has the batch innermost (the storage of the [N, out, 1, 1] image the product writes).
at::Tensor sparse_linear_via(ForwardInto forward_into, const at::Tensor& input, const at::Tensor& values,
                             const at::Tensor& row_ptr, const at::Tensor& row_taps,
                             const std::optional<at::Tensor>& bias, c10::DeviceType device);

// The kernels read any image whose batch has stride 1 in place (the outputs of these ops, in particular);
// others are copied into the ops' layout once.
at::Tensor batch_innermost(const at::Tensor& x);

}  // namespace graspext::ops
