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

void check_values(const at::Tensor& values, const at::Tensor& like, const char* like_name);

}  // namespace graspext::ops
