// CPU layout conversions between NCHW and [H, W, C, N] storage (schemas in ops/layout.cpp). Per channel each
// is a transpose of an [N, H*W] matrix, done in cache tiles, one pass over memory: torch's copy of the
// equivalent 4-D permutation takes several times longer.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/sparse_conv2d.h"

namespace graspext::ops {
namespace {

constexpr int64_t kTile = 32;

// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols.
template <typename T>
void transpose(const T* __restrict src, int64_t src_ld, T* __restrict dst, int64_t dst_ld, int64_t rows,
               int64_t cols) {
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    }
  }
}

void check_4d(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C, H, W), got shape ", x.sizes());
}

// out = x with, per channel, an [rows, cols] matrix at x + c * src_step (row stride src_ld) transposed to
// out + c * dst_step (row stride dst_ld).
void transpose_channels(const at::Tensor& x, at::Tensor& out, int64_t src_step, int64_t src_ld, int64_t dst_step,
                        int64_t dst_ld, int64_t rows, int64_t cols) {
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, x.scalar_type(), "batch_innermost_layout_cpu", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(1), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        transpose(src + ch * src_step, src_ld, dst + ch * dst_step, dst_ld, rows, cols);
      }
    });
  });
}

at::Tensor to_batch_innermost_cpu(const at::Tensor& x_in) {
  check_4d(x_in);
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto out = empty_batch_innermost(n, c, x.size(2), x.size(3), x.options());
  // Channel c: [N, H*W] rows of stride C*H*W -> [H*W, N] rows of stride C*N.
  transpose_channels(x, out, hw, c * hw, n, c * n, n, hw);
  return out;
}

at::Tensor from_batch_innermost_cpu(const at::Tensor& x) {
  check_4d(x);
  // Another layout: a plain copy (never x itself: an op's output must not alias its input).
  if (!x.permute({2, 3, 1, 0}).is_contiguous()) return x.clone(at::MemoryFormat::Contiguous);
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  auto out = at::empty(x.sizes(), x.options());
  // Channel c: [H*W, N] rows of stride C*N -> [N, H*W] rows of stride C*H*W.
  transpose_channels(x, out, n, c * n, hw, c * hw, hw, n);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(graspext, CPU, m) {
  m.impl("to_batch_innermost", &to_batch_innermost_cpu);
  m.impl("from_batch_innermost", &from_batch_innermost_cpu);
}

}  // namespace graspext::ops
